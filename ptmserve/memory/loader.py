"""Load jobs: bring one model's tensors into a tier, layer group by layer group.

A job is planned under the weight manager's lock (which entries it must read from disk, which it must
copy to the device, which other jobs it must wait for) and executed on a loader thread without the lock.
Group ``g`` is read from the repository into the host tier; a verifier thread checks it against its
sha256 and queues its copies on the copy engine, while the loader moves on to read group ``g + 1`` and
an earlier group computes.
Compute waits only for the fences of the group it is about to run: that is the pipelining.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Hashable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import torch
from torch import nn

from ptmserve import errors
from ptmserve.memory.cache import Entry, TensorSpec
from ptmserve.memory.copy import CopyEngine, Fence
from ptmserve.models import quant, registry
from ptmserve.models.config import Pooling
from ptmserve.models.registry import Family, ModelConfig
from ptmserve.store import segments
from ptmserve.store.manifest import ModelManifest, TensorEntry, torch_dtype
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class ModelRecord:
    """What the manager knows about one model. Mutable fields change only under the manager's lock."""

    name: str
    manifest: ModelManifest
    family: Family
    config: ModelConfig
    pooling: Pooling
    host_specs: dict[str, TensorSpec]  # tensor name -> spec in the host tier (stored dtype)
    # tensor name -> spec in the device tier, device-placed: floating tensors in the serve dtype, integer
    # ones (quantized weights) as stored
    device_specs: dict[str, TensorSpec]
    # load groups that compute from the host tier in place (``placement.py``); their tensors are not in
    # ``device_specs`` unless a device-placed group uses them too
    host_groups: frozenset[str] = frozenset()
    placement_asked: frozenset[str] = frozenset()  # what the placement asked for (before tied groups)
    pins: int = 0  # acquired and not yet released: never evicted while > 0
    jobs: int = 0  # loads in flight that read or fill this model's entries
    device_job: LoadJob | None = None  # the load that made (or is making) the model device-resident
    host_job: LoadJob | None = None  # a host-only prefetch in flight
    checked: bool = False  # tensor names and shapes checked against the skeleton

    @classmethod
    def from_manifest(
        cls,
        manifest: ModelManifest,
        serve_dtype: torch.dtype | None,
        host_groups: frozenset[str] = frozenset(),
    ) -> ModelRecord:
        """The record of ``manifest`` computing in ``serve_dtype`` (None: as stored), with ``host_groups``
        left in the host tier. A tensor that a device-placed group uses is on the device even if a
        host-placed group uses it too (a tied LM head keeps the embedding table on the device)."""
        try:
            family = registry.get(manifest.architecture, manifest.weights)
            config = family.config_from_dict(manifest.config)
        except errors.InvalidCheckpoint as exc:
            raise errors.CorruptData(f"model {manifest.name!r}: its stored config: {exc.message}") from None
        if manifest.weights != "fp":
            wrong = quant.check_stored_dtypes({e.name: torch_dtype(e.dtype) for e in manifest.tensors})
            if wrong:
                raise errors.CorruptData(
                    f"model {manifest.name!r}: tensors of the wrong dtype for {manifest.weights} weights: "
                    f"{wrong}"
                )
        asked = frozenset(host_groups)
        host_groups = asked - family.tied_groups(config)
        host: dict[str, TensorSpec] = {}
        device: dict[str, TensorSpec] = {}
        on_device = {
            e.sha256 for g in manifest.group_names() if g not in host_groups for e in manifest.entries(g)
        }
        for group in manifest.group_names():
            for e in manifest.entries(group):
                stored = torch_dtype(e.dtype)
                held = serve_dtype if serve_dtype is not None and stored.is_floating_point else stored
                host[e.name] = TensorSpec((e.sha256, stored, e.shape), e.shape, stored)
                if group not in host_groups or e.sha256 in on_device:
                    device[e.name] = TensorSpec((e.sha256, stored, e.shape, held), e.shape, held)
        return cls(
            name=manifest.name,
            manifest=manifest,
            family=family,
            config=config,
            pooling=Pooling.from_dict(manifest.pooling),
            host_specs=host,
            device_specs=device,
            host_groups=frozenset(host_groups) & set(manifest.group_names()),
            placement_asked=asked,
        )

    def in_place_specs(self) -> list[TensorSpec]:
        """Host specs of the tensors that host-placed groups compute from in place (not on the device)."""
        return self.unique({n: s for n, s in self.host_specs.items() if n not in self.device_specs})

    @staticmethod
    def unique(specs: dict[str, TensorSpec]) -> list[TensorSpec]:
        """Specs with duplicate content keys removed (identical tensors are held once)."""
        return list({s.key: s for s in specs.values()}.values())

    def device_ready(self) -> bool:
        job = self.device_job
        return job is not None and job.done.is_set() and job.done.error is None


@dataclass(slots=True)
class GroupPlan:
    """The work of one layer group."""

    name: str
    reads: list[tuple[TensorEntry, Entry]] = field(default_factory=list)  # disk -> host entry (ours)
    sources: list[Entry] = field(default_factory=list)  # host entries another job fills; wait first
    copies: list[tuple[Entry, Entry]] = field(default_factory=list)  # (device entry ours, host source)
    ready: list[Fence] = field(default_factory=list)  # what compute must wait for before this group


class LoadJob:
    """One load of one model: disk -> host tier, then (for a device load) host -> device tier."""

    def __init__(self, model: str, groups: list[GroupPlan], params: dict[str, nn.Parameter]) -> None:
        self.model = model
        self.groups = {g.name: g for g in groups}
        self.params = params  # tensor name -> device parameter, for binding a skeleton
        self.owned_host = list({id(h): h for g in groups for _, h in g.reads}.values())
        self.owned_device = [d for g in groups for d, _ in g.copies]
        self.bytes_read = sum(h.nbytes for h in self.owned_host)
        self.bytes_copied = sum(d.nbytes for d in self.owned_device)
        self.done = Fence()
        self.started = time.perf_counter()

    def wait_group(self, group: str) -> None:
        """Block until ``group``'s weights are usable on the device; raise the load's error if not."""
        plan = self.groups.get(group)
        if plan is None:
            return
        for fence in plan.ready:
            fence.wait()

    def execute(self, repo: Repository, copier: CopyEngine, verifier: Executor | None) -> None:
        """Run the plan. Group ``g + 1`` is read while ``g`` is checked against its sha256 on the
        ``verifier`` thread (None: no checks) and then copied; nothing unchecked reaches a fence.

        On failure, wait for the checks and copies already queued (none may write into a buffer once it
        is freed) and raise the typed error; the caller frees the bytes, then calls ``fail``.
        """
        submitted: list[Fence] = []  # copy fences, appended by this thread and the verifier
        stages: list[Future[None]] = []
        try:
            for plan in self.groups.values():
                if any(s.done() and s.exception() for s in stages):
                    break  # a check failed: stop reading, report it below
                self._load_group(plan, repo, copier, verifier, stages, submitted)
            for stage in stages:
                stage.result()
            for plan in self.groups.values():
                for fence in plan.ready:
                    fence.synchronize()
        except BaseException as exc:
            for stage in stages:
                stage.exception()  # waits; no check may queue a copy after we return
            for fence in submitted:
                with contextlib.suppress(BaseException):
                    fence.synchronize()
            error = as_load_error(exc, self.model)
            if error is exc:
                raise
            raise error from exc

    def fail(self, error: BaseException) -> None:
        """Fail every fence of this job not yet set: its waiters, and other jobs sharing its entries,
        raise ``error``."""
        for entry in self.owned_host + self.owned_device:
            entry.ready.fail(error)

    def _load_group(
        self,
        plan: GroupPlan,
        repo: Repository,
        copier: CopyEngine,
        verifier: Executor | None,
        stages: list[Future[None]],
        submitted: list[Fence],
    ) -> None:
        for h in plan.sources:
            h.ready.wait()
        if plan.reads:
            out = {e.name: h.tensor for e, h in plan.reads}
            repo.read_into([e for e, _ in plan.reads], out, verify=False, model=self.model)
            if verifier is not None:
                stages.append(verifier.submit(self._check_and_copy, plan, copier, submitted))
                return
            for _, h in plan.reads:
                h.ready.set()
        self._copy(plan, copier, submitted)

    def _check_and_copy(self, plan: GroupPlan, copier: CopyEngine, submitted: list[Fence]) -> None:
        """Verifier thread: check the bytes just read, publish them, queue the group's copies."""
        for e, h in plan.reads:
            if segments.sha256_hex(segments.tensor_bytes(h.tensor)) != e.sha256:
                raise errors.CorruptData(
                    f"model {self.model!r} group {plan.name!r} tensor {e.name!r}: checksum mismatch "
                    f"(segment {e.segment})"
                )
        for _, h in plan.reads:
            h.ready.set()
        self._copy(plan, copier, submitted)

    @staticmethod
    def _copy(plan: GroupPlan, copier: CopyEngine, submitted: list[Fence]) -> None:
        if plan.copies:
            fences = [d.ready for d, _ in plan.copies]
            copier.submit([(d.tensor, h.tensor) for d, h in plan.copies], fences)
            submitted.extend(fences)


def as_load_error(exc: BaseException, model: str) -> errors.PtmError:
    """The typed error every waiter of a failed load sees."""
    if isinstance(exc, errors.PtmError):
        return exc
    return errors.NotReady(f"loading model {model!r} failed: {type(exc).__name__}: {exc}")


def plan_load(
    model: ModelRecord,
    host_entries: dict[Hashable, Entry],
    host_created: list[Entry],
    device_entries: dict[Hashable, Entry] | None,
    device_created: list[Entry],
) -> LoadJob:
    """Plan a load of ``model`` given the entries its claims returned.

    Reads each host entry this job created once (in the first group that uses it), copies each device
    entry it created from its host source, and makes each group wait for all of its device entries,
    including those another job is still filling. Without ``device_entries`` it is a host-only load,
    whose parameters and fences are the host entries' (what zero-copy serving binds to); a tensor left
    on the host by placement (not in ``device_specs``) binds to its host entry the same way.
    """
    mine_host = {id(h) for h in host_created}
    mine_dev = {id(d) for d in device_created}
    done: set[int] = set()  # entries already read, copied or waited for by an earlier tensor
    params: dict[str, nn.Parameter] = {}
    groups = []
    for group in model.manifest.group_names():
        plan = GroupPlan(group)
        for e in model.manifest.entries(group):
            h = host_entries.get(model.host_specs[e.name].key)
            dspec = model.device_specs.get(e.name)
            d = None if device_entries is None or dspec is None else device_entries[dspec.key]
            target = d if d is not None else h
            assert target is not None, f"no entry claimed for {e.name}"
            params[e.name] = target.parameter()
            if id(target) not in done:
                plan.ready.append(target.ready)
            if d is not None and (id(d) in done or id(d) not in mine_dev):
                done.add(id(d))
                continue  # already planned, or filled by another job: waiting is enough
            if d is not None:
                done.add(id(d))
                assert h is not None, "a device entry to fill needs a host source"
                plan.copies.append((d, h))
            if h is not None and id(h) not in done:
                done.add(id(h))
                if id(h) in mine_host:
                    plan.reads.append((e, h))
                elif d is not None:
                    plan.sources.append(h)
        groups.append(plan)
    return LoadJob(model.name, groups, params)
