"""Profiles of stored models: what each load group costs on each placement (``ptmserve profile``).

``profile_model`` measures every load group (``embeddings``, ``layers.{i}``, ``head``) of a stored model
at a few batch shapes (B inputs of T tokens each; a decoder's B prompts of T tokens, prefilled in one
step) and returns a ``memory.placement.ModelProfile``:

- ``bytes``: the group's tensors as the device tier holds them (floating tensors in the serve dtype);
- ``shared_bytes``: of those, the tensors another group needs too: the same content stored in another
  group, or a tensor another group's stage reads (the tied LM head of GPT-2, SmolLM2 and other LLaMAs
  reads the embedding table), so leaving the group on the host cannot save them;
- ``device_seconds``: its stage computed from the **device copy** (on ``device``, in the serve dtype);
- ``host_seconds``: the same stage, on the same inputs, computed from the **host copy** (on the CPU in
  the stored dtype, pinned on CUDA: what the host tier holds), its activations moved there first;
- ``transfer_seconds``: moving the stage's input activations to the host copy's device and dtype and its
  outputs back. Exactly 0 where both copies have one device and dtype (the CPU serving the stored dtype):
  the host copy is then used in place and nothing moves. On the CPU serving another dtype it is the
  casts; on CUDA, the copies, timed with the device synchronised.

The two copies are separate buffers even where they could be one, so each time is measured on its own
weights. Times are medians of ``repeats`` passes after a warm-up pass; a pass runs the model's stages in
order, each load group's stage on the device copy, then on the host copy from the same inputs; the
device copy's outputs flow on. The warm-up pass also records which parameters each stage reads.

A model with early exits is profiled with every row running every layer (no row leaves early), so every
pass computes the same tokens.

``ensure_profile`` is the engine's lazy path: the stored profile while it matches the model's weights,
device and dtype, else a quick profile, stored.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ptmserve import errors
from ptmserve.memory.placement import GroupProfile, ModelProfile, weights_id
from ptmserve.memory.skeleton import Skeleton
from ptmserve.models import registry
from ptmserve.models.config import Pooling
from ptmserve.models.exits import EarlyExit, exits_of
from ptmserve.models.packed import pack
from ptmserve.models.paged import KVCache, SeqStep, blocks_needed, make_step_batch
from ptmserve.models.runner import Activations, Stage
from ptmserve.store.manifest import ModelManifest, dtype_name, torch_dtype
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 16), (8, 64), (32, 128))  # (inputs, tokens per input)
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((1, 16), (4, 64))
DEFAULT_REPEATS = 5
QUICK_REPEATS = 2
SEED = 0
KV_BLOCK_SIZE = 16

DTypeLike = torch.dtype | str | None


def manifest_weights_id(manifest: ModelManifest) -> str:
    """``placement.weights_id`` of a stored model: it changes when a re-import changes its weights."""
    return weights_id((e.sha256 for e in manifest.tensors), manifest.architecture, manifest.config)


def serve_dtype(dtype: DTypeLike, manifest: ModelManifest) -> torch.dtype:
    """The dtype floating tensors are held in on the device: ``dtype``, or the stored one when None."""
    if dtype is None:
        return torch_dtype(manifest.dtype)
    return torch_dtype(dtype) if isinstance(dtype, str) else dtype


def stored_profile(repo: Repository, name: str) -> ModelProfile | None:
    """Model ``name``'s stored profile, or None when it has none.

    Raises:
        errors.CorruptData: the stored profile is unreadable or malformed (the message names the model).
    """
    doc = repo.profile(name)
    if doc is None:
        return None
    try:
        return ModelProfile.from_dict(doc)
    except errors.CorruptData as exc:
        if repr(name) in exc.message:
            raise
        raise errors.CorruptData(f"model {name!r}: {exc.message}") from None


def profile_model(
    repo: Repository,
    name: str,
    *,
    device: torch.device | str = "cpu",
    dtype: DTypeLike = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    repeats: int | None = None,
    quick: bool = False,
) -> ModelProfile:
    """Measure every load group of stored model ``name`` (module docstring). Prints nothing.

    Args:
        repo: the repository holding the model (tensors are read and checked against their sha256).
        name: the model.
        device: where the device copy computes.
        dtype: the serve dtype (torch dtype or manifest name); None: the stored dtype.
        shapes: ``(inputs, tokens per input)`` of each measured batch; tokens are capped at the model's
            longest input. Default ``DEFAULT_SHAPES`` (``QUICK_SHAPES`` with ``quick``).
        repeats: timed passes per shape (default ``DEFAULT_REPEATS``, ``QUICK_REPEATS`` with ``quick``).
        quick: fewer shapes and passes (``ensure_profile``'s lazy profile).

    Returns:
        The profile; not stored (``repo.save_profile(name, profile.to_dict())`` stores it).

    Raises:
        errors.ModelNotFound: no such model.
        errors.InvalidInput: no shapes, a shape below 1x1, or ``repeats`` < 1.
        errors.CorruptData: a stored tensor is damaged, or the tensors do not match the architecture.
    """
    device = torch.device(device)
    manifest = repo.manifest(name)
    dtype = serve_dtype(dtype, manifest)
    repeats = repeats if repeats is not None else QUICK_REPEATS if quick else DEFAULT_REPEATS
    if repeats < 1:
        raise errors.InvalidInput(f"repeats must be at least 1, got {repeats}")
    wanted = _checked_shapes(shapes if shapes is not None else QUICK_SHAPES if quick else DEFAULT_SHAPES)
    model = _Model.load(repo, manifest, device, dtype)
    shapes = _checked_shapes(wanted, model.config.max_tokens)
    groups = manifest.group_names()
    times: dict[str, list[tuple[float, float, float]]] = {g: [] for g in groups}
    reads: dict[str, set[str]] = {}
    for i, (b, t) in enumerate(shapes):
        gen = torch.Generator().manual_seed(SEED + i)
        ids = torch.randint(0, model.config.vocab_size, (b, t), generator=gen).tolist()
        shape_times = _measure(model, model.workload(ids), repeats, reads if i == 0 else None)
        for g in groups:
            times[g].append(shape_times.get(g, (0.0, 0.0, 0.0)))
    needed = _needed_elsewhere(manifest, reads)
    return ModelProfile(
        model=name,
        weights_id=manifest_weights_id(manifest),
        device=device.type,
        dtype=dtype_name(dtype),
        shapes=shapes,
        groups=tuple(
            GroupProfile(
                name=g,
                bytes=sum(model.nbytes[e.name] for e in manifest.entries(g)),
                shared_bytes=sum(model.nbytes[e.name] for e in manifest.entries(g) if e.name in needed),
                device_seconds=tuple(x[0] for x in times[g]),
                host_seconds=tuple(x[1] for x in times[g]),
                transfer_seconds=tuple(x[2] for x in times[g]),
            )
            for g in groups
        ),
    )


_locks_guard = threading.Lock()
_locks: dict[tuple[str, str], threading.Lock] = {}


def ensure_profile(
    repo: Repository, name: str, *, device: torch.device | str, dtype: DTypeLike
) -> ModelProfile:
    """Model ``name``'s stored profile if it matches its current weights, ``device``'s type and
    ``dtype``; else a quick profile, measured now (under a second for MiniLM on two cores) and stored.

    Safe to call from several threads: one measures, the others wait for it and read its profile. A
    damaged stored profile is measured anew (with a warning). While it measures, it holds a copy of the
    model on the device and one on the host besides the tiers (outside their budgets).

    Raises:
        errors.ModelNotFound: no such model.
        errors.CorruptData: a stored tensor is damaged.
    """
    device = torch.device(device)
    with _locks_guard:
        lock = _locks.setdefault((str(repo.root), name), threading.Lock())
    with lock:
        manifest = repo.manifest(name)
        wanted = (manifest_weights_id(manifest), device.type, dtype_name(serve_dtype(dtype, manifest)))
        try:
            stored = stored_profile(repo, name)
        except errors.CorruptData as exc:
            logger.warning("measuring model %s again: %s", name, exc.message)
            stored = None
        if stored is not None and stored.matches(*wanted):
            return stored
        t0 = time.perf_counter()
        profile = profile_model(repo, name, device=device, dtype=dtype, quick=True)
        repo.save_profile(name, profile.to_dict())
        logger.info("profiled model %s on %s in %s in %.2fs", name, *wanted[1:], time.perf_counter() - t0)
        return profile


# ------------------------------------------------------------------------------------ the two copies


@dataclass(slots=True)
class _Workload:
    """One batch shape's inputs, as each copy reads them."""

    device_batch: Any  # PackedBatch (encoders) or StepBatch (decoders) on the device
    host_batch: Any  # the same on the CPU (the same object when the device is the CPU)
    device_cache: KVCache | None = None  # decoders: the KV cache each copy's layers write
    host_cache: KVCache | None = None


@dataclass(slots=True)
class _Model:
    """A stored model bound twice: to its device copy and to its host copy."""

    manifest: ModelManifest
    config: Any
    generates: bool
    pooling: Pooling
    device: torch.device
    dtype: torch.dtype  # the device copy's floating dtype
    host_dtype: torch.dtype  # the host copy's (the stored model dtype)
    device_module: nn.Module
    host_module: nn.Module
    param_names: dict[int, str]  # id of a device-copy parameter -> a tensor name
    nbytes: dict[str, int]  # tensor name -> bytes in the device copy

    @classmethod
    def load(
        cls, repo: Repository, manifest: ModelManifest, device: torch.device, dtype: torch.dtype
    ) -> _Model:
        try:
            family = registry.get(manifest.architecture, manifest.weights)
            config = family.config_from_dict(manifest.config)
        except errors.InvalidCheckpoint as exc:
            raise errors.CorruptData(f"model {manifest.name!r}: its stored config: {exc.message}") from None
        host, dev = _read_copies(repo, manifest, device, dtype)
        modules = []
        for params in (dev, host):
            skeleton = Skeleton(family, config)
            skeleton.check(manifest.name, {n: tuple(p.shape) for n, p in params.items()})
            modules.append(skeleton.bind(manifest.name, params))
        return cls(
            manifest=manifest,
            config=config,
            generates=family.generates,
            pooling=Pooling.from_dict(manifest.pooling),
            device=device,
            dtype=dtype,
            host_dtype=torch_dtype(manifest.dtype),
            device_module=modules[0],  # type: ignore[arg-type]
            host_module=modules[1],  # type: ignore[arg-type]
            param_names={id(p): n for n, p in reversed(dev.items())},
            nbytes={n: p.numel() * p.element_size() for n, p in dev.items()},
        )

    @property
    def in_place(self) -> bool:
        """The host copy computes on the device's activations as they are (nothing moves)."""
        return self.device.type == "cpu" and self.dtype == self.host_dtype

    def workload(self, ids: list[list[int]]) -> _Workload:
        """Inputs of ``ids`` (B lists of T token ids) for both copies."""
        if not self.generates:
            batch = pack(ids, position_offset=self.config.position_offset, device=self.device)
            return _Workload(batch, batch if self.device.type == "cpu" else batch.to("cpu"))
        per_seq = blocks_needed(len(ids[0]), KV_BLOCK_SIZE)
        steps = [SeqStep(seq, 0, range(b * per_seq, (b + 1) * per_seq)) for b, seq in enumerate(ids)]
        batch = make_step_batch(steps, KV_BLOCK_SIZE, self.device)
        cache = KVCache.for_config(self.config, len(ids) * per_seq, KV_BLOCK_SIZE, self.dtype, self.device)
        if self.in_place:
            return _Workload(batch, batch, cache, cache)
        host_cache = KVCache.for_config(self.config, len(ids) * per_seq, KV_BLOCK_SIZE, self.host_dtype)
        return _Workload(batch, batch.to("cpu"), cache, host_cache)

    def stages(self, work: _Workload, *, host: bool) -> Sequence[Stage]:
        """Fresh stages of one pass (a forward pass, or a prefill step) on one copy."""
        module: Any = self.host_module if host else self.device_module
        batch = work.host_batch if host else work.device_batch
        if self.generates:
            return module.step_stages(batch, work.host_cache if host else work.device_cache)
        classify = bool(self.config.labels)
        if classify and exits_of(self.config):  # every row runs every layer
            return module.stages(
                classify=True, pooling=self.pooling, early_exit=EarlyExit(allowed=[False] * batch.num_seqs)
            )
        return module.stages(classify=classify, pooling=self.pooling)

    def to_host(self, acts: Activations, batch: Any) -> Activations:
        """``acts`` as the host copy reads them: token states on the CPU in the host copy's dtype."""
        hidden = acts.hidden
        if hidden is not None and not self.in_place:
            hidden = hidden.to(device="cpu", dtype=self.host_dtype)
        return Activations(batch, hidden, acts.embeddings, acts.logits)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _read_copies(
    repo: Repository, manifest: ModelManifest, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """The host copy (CPU, stored dtypes, pinned on CUDA) and the device copy (``device``, floating
    tensors in ``dtype``) of every tensor, read group by group with checksums; identical tensors are
    held once per copy, as the tiers hold them."""
    pinned = device.type == "cuda"
    by_key: dict[Hashable, tuple[nn.Parameter, nn.Parameter]] = {}
    host: dict[str, nn.Parameter] = {}
    dev: dict[str, nn.Parameter] = {}
    for group in manifest.group_names():
        entries = manifest.entries(group)
        fresh = {}
        for e in entries:
            key = (e.sha256, e.dtype, e.shape)
            if key not in by_key and key not in fresh:
                fresh[key] = (e, torch.empty(e.shape, dtype=torch_dtype(e.dtype), pin_memory=pinned))
        if fresh:
            repo.read_into(
                [e for e, _ in fresh.values()], {e.name: t for e, t in fresh.values()}, model=manifest.name
            )
        for key, (_, t) in fresh.items():
            held = dtype if t.is_floating_point() else t.dtype
            copy = t.to(device=device, dtype=held, copy=True)
            by_key[key] = (nn.Parameter(t, requires_grad=False), nn.Parameter(copy, requires_grad=False))
        for e in entries:
            host[e.name], dev[e.name] = by_key[(e.sha256, e.dtype, e.shape)]
    return host, dev


def _checked_shapes(
    shapes: Sequence[tuple[int, int]], max_tokens: int | None = None
) -> tuple[tuple[int, int], ...]:
    """``shapes`` with tokens capped at ``max_tokens``, duplicates dropped, in order."""
    out: dict[tuple[int, int], None] = {}
    for b, t in shapes:
        if b < 1 or t < 1:
            raise errors.InvalidInput(f"a batch shape needs at least 1 input of 1 token, got {b}x{t}")
        out[(int(b), int(t if max_tokens is None else min(t, max_tokens)))] = None
    if not out:
        raise errors.InvalidInput("no batch shapes to profile")
    return tuple(out)


# --------------------------------------------------------------------------------------- measuring


def _measure(
    model: _Model, work: _Workload, repeats: int, reads: dict[str, set[str]] | None
) -> dict[str, tuple[float, float, float]]:
    """Median (device, host, transfer) seconds of each load group's stage at one shape. With ``reads``,
    the warm-up pass records there which tensors each stage reads."""
    groups = set(model.manifest.group_names())
    samples: dict[str, list[tuple[float, float, float]]] = {}
    for p in range(repeats + 1):
        acts = Activations(work.device_batch)
        host_stages = model.stages(work, host=True)
        for stage, host_stage in zip(model.stages(work, host=False), host_stages, strict=True):
            if stage.group not in groups:
                stage.run(acts)  # pooling: needs no weights
                continue
            before = Activations(acts.batch, acts.hidden, acts.embeddings, acts.logits)
            recorder = _Reads(model.param_names) if p == 0 and reads is not None else None
            with recorder or nullcontext():
                device_s = _timed(model, stage.run, acts)
            if recorder is not None and reads is not None:
                reads.setdefault(stage.group, set()).update(recorder.seen)
            host_in = model.to_host(before, work.host_batch)
            host_out = Activations(host_in.batch, host_in.hidden, host_in.embeddings, host_in.logits)
            host_s = _timed(model, host_stage.run, host_out)
            transfer_s = 0.0 if model.in_place else _transfer_seconds(model, before, host_in, host_out)
            if p > 0:
                samples.setdefault(stage.group, []).append((device_s, host_s, transfer_s))
    medians = {}
    for group, runs in samples.items():
        device_s, host_s, transfer_s = zip(*runs, strict=True)
        medians[group] = (
            statistics.median(device_s),
            statistics.median(host_s),
            statistics.median(transfer_s),
        )
    return medians


def _timed(model: _Model, run: Callable[[Activations], None], acts: Activations) -> float:
    with torch.inference_mode():
        model.sync()
        t0 = time.perf_counter()
        run(acts)
        model.sync()
        return time.perf_counter() - t0


def _transfer_seconds(
    model: _Model, before: Activations, host_in: Activations, host_out: Activations
) -> float:
    """Seconds to move a stage's input token states to the host copy and the outputs it set back."""
    outputs = [
        (new, model.dtype if name == "hidden" else new.dtype)
        for name in ("hidden", "embeddings", "logits")
        if (new := getattr(host_out, name)) is not None and new is not getattr(host_in, name)
    ]

    def move(_: Activations) -> None:
        if before.hidden is not None:
            before.hidden.to(device="cpu", dtype=model.host_dtype)
        for tensor, dtype in outputs:
            tensor.to(device=model.device, dtype=dtype)

    return _timed(model, move, before)


class _Reads(TorchFunctionMode):
    """Records which of the named parameters the torch calls made inside it receive."""

    def __init__(self, names: Mapping[int, str]) -> None:
        super().__init__()
        self._names = names
        self.seen: set[str] = set()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        for value in tree_flatten((args, kwargs))[0]:
            name = self._names.get(id(value))
            if name is not None:
                self.seen.add(name)
        return func(*args, **kwargs)


def _needed_elsewhere(manifest: ModelManifest, reads: Mapping[str, set[str]]) -> set[str]:
    """Tensors another group needs too: stored in another group as well, or read by another group's stage."""
    holders: dict[str, set[str]] = {}
    for e in manifest.tensors:
        holders.setdefault(e.sha256, set()).add(e.group)
    readers: dict[str, set[str]] = {}
    for group, names in reads.items():
        for n in names:
            readers.setdefault(n, set()).add(group)
    return {
        e.name
        for e in manifest.tensors
        if len(holders[e.sha256]) > 1 or readers.get(e.name, set()) - {e.group}
    }
