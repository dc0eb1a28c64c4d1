"""Scheduling policies, chosen by name: ``fastptm`` (ours, the default), and the baselines ``fifo-lru``,
``edf-lru`` and ``fifo-naive``."""

from __future__ import annotations

from enum import Enum

from ptmserve.engine.policies.base import Context, ModelStats, Plan, Policy, StepKind
from ptmserve.engine.policies.baselines import EdfLru, FifoLru, FifoNaive
from ptmserve.engine.policies.fastptm import FastPtm, FastPtmOptions
from ptmserve.errors import InvalidConfig

__all__ = [
    "Context",
    "EdfLru",
    "FastPtm",
    "FastPtmOptions",
    "FifoLru",
    "FifoNaive",
    "ModelStats",
    "Plan",
    "Policy",
    "PolicyName",
    "StepKind",
    "make_policy",
]


class PolicyName(str, Enum):
    FASTPTM = "fastptm"
    FIFO_LRU = "fifo-lru"
    EDF_LRU = "edf-lru"
    FIFO_NAIVE = "fifo-naive"


_POLICIES: dict[PolicyName, type[Policy]] = {
    PolicyName.FASTPTM: FastPtm,
    PolicyName.FIFO_LRU: FifoLru,
    PolicyName.EDF_LRU: EdfLru,
    PolicyName.FIFO_NAIVE: FifoNaive,
}


def make_policy(name: str | PolicyName, *, predictive_expiry: bool | None = None) -> Policy:
    """A fresh policy object for ``name`` (policies keep state between steps: one per scheduler).

    ``predictive_expiry`` overrides the policy's own expiry rule (None keeps it): fastptm predicts,
    the baselines expire only what is already late, as the peers do.

    Raises:
        InvalidConfig: ``name`` is not a known policy.
    """
    try:
        key = PolicyName(name)
    except ValueError:
        known = ", ".join(p.value for p in PolicyName)
        raise InvalidConfig(f"unknown scheduling policy {name!r}; choose one of {known}") from None
    return _POLICIES[key](predictive_expiry=predictive_expiry)
