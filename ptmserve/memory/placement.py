"""Where each load group of a model lives while the model is on the device (ECTransformer's partition).

A group is **device**-placed (its tensors are copied into the device tier and it computes there) or
**host**-placed (its tensors stay in the host tier; it computes from them in place, and only its
activations cross). Leaving a group on the host saves its device bytes and costs the difference between
computing it on the host and on the device, plus moving its inputs and outputs.

``ModelProfile`` is what ``ptmserve profile`` measures (``engine/profiling.py``) and the repository
stores next to the model. ``host_groups`` turns a profile into a placement:

- ``device``: every group on the device (the placement before profiles existed);
- ``host-embeddings``: the ``embeddings`` group on the host, whatever the profile says;
- ``auto``: groups on the host that are *memory-heavy and compute-light* and cost little there.
  A group qualifies when its bytes per second of device compute are at least ``INTENSITY_RATIO`` times
  the model's (it holds many bytes and reads few of them per request: an embedding table gathers a few
  rows of a large matrix), and it saves device bytes that no device group needs. Qualifying groups are
  taken by bytes saved per second of extra time, while the extra time summed over them stays within
  ``tolerance`` of the model's whole device time at every profiled shape.

On a GPU the time test is what keeps layers on the device (they compute many times slower on the host).
On a CPU the host and device tiers are the same memory, so no group computes slower from the host copy
and the time test alone would put the whole model on the host, which is what ``--zero-copy`` already
does; the intensity test keeps the groups that do work in proportion to their bytes in the device tier,
whose budget then still says which models are ready to compute.

Pure Python: no torch, so the scheduler and the simulator can use it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ptmserve import errors

DEVICE = "device"
HOST_EMBEDDINGS = "host-embeddings"
AUTO = "auto"
PLACEMENTS = (AUTO, DEVICE, HOST_EMBEDDINGS)
EMBEDDINGS_GROUP = "embeddings"

DEFAULT_TOLERANCE = 0.04  # extra time allowed for host-placed groups, as a share of the model's time
INTENSITY_RATIO = 4.0  # bytes per device-second, against the model's, for a group to be a host candidate
PROFILE_VERSION = 1


@dataclass(frozen=True, slots=True)
class GroupProfile:
    """One load group measured at each of the profile's shapes (seconds per batch, medians)."""

    name: str
    bytes: int  # its tensors' bytes on the device, in the serve dtype
    shared_bytes: int  # of those, bytes of tensors another group uses too (host placement cannot save them)
    device_seconds: tuple[float, ...]  # computing it with its weights in the device tier
    host_seconds: tuple[float, ...]  # computing it with its weights in the host tier, where it would run
    transfer_seconds: tuple[float, ...]  # moving its inputs to and its outputs from the host (0 on a CPU)

    @property
    def saved_bytes(self) -> int:
        """Device bytes that leaving this group on the host saves."""
        return self.bytes - self.shared_bytes

    def extra_seconds(self, shape: int) -> float:
        """Time host placement adds at shape index ``shape`` (never below 0: noise is not a gain)."""
        return max(0.0, self.host_seconds[shape] + self.transfer_seconds[shape] - self.device_seconds[shape])


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """The measured cost of each load group of one stored model on one device and dtype."""

    model: str
    weights_id: str  # ``weights_id(manifest)`` of the stored model it was measured on
    device: str  # the device type: "cpu", "cuda"
    dtype: str  # the serve dtype
    shapes: tuple[tuple[int, int], ...]  # (inputs, tokens per input) of each measured batch
    groups: tuple[GroupProfile, ...]  # in execution order

    def group(self, name: str) -> GroupProfile | None:
        return next((g for g in self.groups if g.name == name), None)

    def device_seconds(self, shape: int) -> float:
        """The whole model's time at shape index ``shape`` with every group on the device."""
        return sum(g.device_seconds[shape] for g in self.groups)

    def matches(self, weights: str, device: str, dtype: str) -> bool:
        """Whether this profile was measured on these weights, device type and dtype."""
        return (self.weights_id, self.device, self.dtype) == (weights, device, dtype)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION,
            "model": self.model,
            "weights_id": self.weights_id,
            "device": self.device,
            "dtype": self.dtype,
            "shapes": [list(s) for s in self.shapes],
            "groups": [
                {
                    "name": g.name,
                    "bytes": g.bytes,
                    "shared_bytes": g.shared_bytes,
                    "device_seconds": list(g.device_seconds),
                    "host_seconds": list(g.host_seconds),
                    "transfer_seconds": list(g.transfer_seconds),
                }
                for g in self.groups
            ],
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ModelProfile:
        """Raises ``errors.CorruptData`` naming what is wrong with a stored profile."""
        try:
            if doc.get("version") != PROFILE_VERSION:
                raise ValueError(f"version {doc.get('version')!r} is not {PROFILE_VERSION}")
            shapes = tuple((int(b), int(t)) for b, t in doc["shapes"])
            groups = []
            for g in doc["groups"]:
                times = [
                    tuple(float(x) for x in g[k])
                    for k in ("device_seconds", "host_seconds", "transfer_seconds")
                ]
                if any(len(t) != len(shapes) for t in times) or any(
                    not math.isfinite(x) or x < 0 for t in times for x in t
                ):
                    raise ValueError(
                        f"group {g.get('name')!r}: times must be one finite value >= 0 per shape"
                    )
                groups.append(GroupProfile(str(g["name"]), int(g["bytes"]), int(g["shared_bytes"]), *times))
            if not shapes or not groups:
                raise ValueError("no shapes or no groups")
            return cls(
                str(doc["model"]),
                str(doc["weights_id"]),
                str(doc["device"]),
                str(doc["dtype"]),
                shapes,
                tuple(groups),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.CorruptData(
                f"stored profile of model {doc.get('model')!r} is malformed: {exc}"
            ) from None


def weights_id(tensor_digests: Iterable[str], architecture: str, config: Mapping[str, Any]) -> str:
    """A short id of a stored model's weights and shape: a profile is valid while it is unchanged."""
    h = hashlib.sha256(architecture.encode())
    h.update(repr(sorted(config.items())).encode())
    for digest in tensor_digests:
        h.update(digest.encode())
    return h.hexdigest()[:16]


def host_groups(
    placement: str,
    groups: Iterable[str],
    profile: ModelProfile | None = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> frozenset[str]:
    """The groups of a model to leave in the host tier under ``placement``.

    ``auto`` without a profile places like ``host-embeddings`` (the case every profile so far agrees
    with); the engine profiles the model and places by the profile from its next load on.

    Raises:
        errors.InvalidConfig: an unknown placement.
    """
    names = list(groups)
    if placement == DEVICE:
        return frozenset()
    if placement == HOST_EMBEDDINGS or (placement == AUTO and profile is None):
        return frozenset(n for n in names if n == EMBEDDINGS_GROUP)
    if placement != AUTO:
        raise errors.InvalidConfig(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    assert profile is not None
    return frozenset(g for g in choose_host_groups(profile, tolerance=tolerance) if g in names)


def choose_host_groups(profile: ModelProfile, *, tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """The ``auto`` rule (module docstring), in the order the groups were chosen."""
    shapes = range(len(profile.shapes))
    total_bytes = sum(g.bytes for g in profile.groups)
    total_seconds = sum(profile.device_seconds(s) for s in shapes)
    if total_bytes <= 0 or total_seconds <= 0:
        return []
    model_intensity = total_bytes / total_seconds

    def intensity(g: GroupProfile) -> float:
        seconds = sum(g.device_seconds)
        return math.inf if seconds <= 0 else g.bytes / seconds

    candidates = [
        g for g in profile.groups if g.saved_bytes > 0 and intensity(g) >= INTENSITY_RATIO * model_intensity
    ]

    def worth(g: GroupProfile) -> float:
        extra = max(g.extra_seconds(s) / profile.device_seconds(s) for s in shapes)
        return math.inf if extra <= 0 else g.saved_bytes / extra

    chosen: list[str] = []
    spent = [0.0 for _ in shapes]
    for g in sorted(candidates, key=worth, reverse=True):
        after = [spent[s] + g.extra_seconds(s) for s in shapes]
        if all(after[s] <= tolerance * profile.device_seconds(s) for s in shapes):
            chosen.append(g.name)
            spent = after
    return chosen
