"""A content-addressed tensor cache under a byte budget: one memory tier.

Tensors are keyed by content (the sha256 of their stored bytes, plus the dtype they are held in), so a
tensor that several models share (a frozen backbone under several classifier heads) is held once per
tier and moved once. Each entry records the models that use it; it is freed when the last one lets go.
Freed buffers are not returned to the allocator right away: they wait on a free list keyed by
(shape, dtype) and are reused by the next tensor of that shape, so switching between models of one
architecture allocates nothing. Free-listed buffers count against the budget; they are released to the
allocator only when room is needed for tensors of other shapes.

The cache does no locking of its own: the weight manager calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

import torch

from ptmserve.memory.copy import Fence
from ptmserve.memory.records import TierUsage
from ptmserve.memory.shared import SharedBuffer, SharedFiles

Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
BufferKey = tuple[tuple[int, ...], torch.dtype]


@dataclass(slots=True, frozen=True)
class TensorSpec:
    """What a tier needs to hold one tensor: its content key, shape and the dtype held in this tier."""

    key: Hashable
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


@dataclass(slots=True, eq=False)
class Entry:
    """One tensor held by a tier. ``ready`` is set once its bytes are valid (failed if they never
    will be); until then only the load that created it writes to ``tensor``."""

    spec: TensorSpec
    tensor: torch.Tensor
    ready: Fence
    users: set[str] = field(default_factory=set)
    param: torch.nn.Parameter | None = None  # the device tier binds skeletons to this; made once
    shared: SharedBuffer | None = None  # its file, when the tier is in shared memory

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes

    def parameter(self) -> torch.nn.Parameter:
        """``tensor`` as a frozen Parameter, created once, so binding a skeleton copies no data."""
        if self.param is None:
            self.param = torch.nn.Parameter(self.tensor, requires_grad=False)
        return self.param


class TensorCache:
    """One tier's tensors, their users and its free list, under a hard budget of accounted bytes.

    Accounted bytes = bytes of live entries + bytes waiting on the free list; they never exceed
    ``budget`` (``claim`` refuses rather than overshoot).

    With ``shared`` (the host tier of ``serve --workers``, ``shared.py``) every buffer is a file that
    other processes may map: an entry another process already filled is ready at once, and a freed
    entry's buffer is unmapped rather than free-listed (its file is named by the content it held).
    """

    def __init__(
        self, name: str, budget: int, allocate: Allocator, shared: SharedFiles | None = None
    ) -> None:
        self.name = name
        self.budget = budget
        self._allocate = allocate
        self.shared = shared
        self._entries: dict[Hashable, Entry] = {}
        self._by_model: dict[str, dict[Hashable, Entry]] = {}
        self._free: dict[BufferKey, list[torch.Tensor]] = {}
        self.live_bytes = 0
        self.free_bytes = 0
        self.allocations = 0  # buffers ever taken from the allocator (not from the free list)
        self.allocated_bytes = 0

    # -- queries ---------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Accounted bytes: live entries plus the free list."""
        return self.live_bytes + self.free_bytes

    def get(self, key: Hashable) -> Entry | None:
        return self._entries.get(key)

    def models(self) -> list[str]:
        """Models that hold at least one entry here."""
        return list(self._by_model)

    def entries_of(self, model: str) -> dict[Hashable, Entry]:
        return self._by_model.get(model, {})

    def model_bytes(self, model: str) -> int:
        """Bytes of the entries ``model`` uses (a shared entry counts for each of its users)."""
        return sum(e.nbytes for e in self._by_model.get(model, {}).values())

    def usage(self) -> TierUsage:
        """Accounted bytes, budget, free list, allocations and bytes per model, now."""
        return TierUsage(
            name=self.name,
            used_bytes=self.used_bytes,
            budget_bytes=self.budget,
            free_list_bytes=self.free_bytes,
            allocations=self.allocations,
            per_model={m: self.model_bytes(m) for m in self._by_model},
        )

    def holds_all(self, model: str, keys: Iterable[Hashable]) -> bool:
        """True when every key is held for ``model`` and its bytes are valid."""
        mine = self._by_model.get(model, {})
        return all(k in mine and mine[k].ready.is_set() and mine[k].ready.error is None for k in keys)

    def shortfall(self, specs: Iterable[TensorSpec]) -> int:
        """Bytes that must be freed (by evicting models) before ``claim(specs)`` can succeed; 0 if
        it fits now. Free-listed buffers of matching shape are reused; others can be released."""
        reuse: dict[BufferKey, int] = {}
        new_bytes = reused_bytes = 0
        for spec in specs:
            if spec.key in self._entries:
                continue
            bkey = (spec.shape, spec.dtype)
            if reuse.get(bkey, 0) < len(self._free.get(bkey, ())):
                reuse[bkey] = reuse.get(bkey, 0) + 1
                reused_bytes += spec.nbytes
            else:
                new_bytes += spec.nbytes
        return max(0, self.live_bytes + reused_bytes + new_bytes - self.budget)

    # -- changes ---------------------------------------------------------------------------------

    def claim(self, model: str, specs: Iterable[TensorSpec]) -> tuple[dict[Hashable, Entry], list[Entry]]:
        """Make ``model`` a user of one entry per spec, creating the missing ones.

        Returns ``(entries by key, created)``; created entries have an unset ``ready`` fence and a
        buffer (reused from the free list where possible) that the caller must fill and then set or
        fail; an entry of shared memory that another process filled is not "created": it is ready.
        Raises ``MemoryError`` if the specs do not fit; call ``shortfall`` first.
        """
        specs = list(specs)
        if self.shortfall(specs):
            raise MemoryError(f"{self.name} tier: claim does not fit its budget")
        mine = self._by_model.setdefault(model, {})
        created: list[Entry] = []
        fresh: list[TensorSpec] = []
        for spec in specs:
            entry = self._entries.get(spec.key)
            if entry is None:
                buf = self._reuse_buffer(spec)
                if buf is None:
                    fresh.append(spec)  # allocated below, once every reusable buffer is taken
                    continue
                entry = self._add(spec, buf)
                created.append(entry)
            entry.users.add(model)
            mine[spec.key] = entry
        for spec in fresh:
            entry = self._entries.get(spec.key)  # a duplicate spec within this claim
            if entry is None:
                self._make_room(spec.nbytes)
                self.allocations += 1
                self.allocated_bytes += spec.nbytes
                if self.shared is None:
                    entry = self._add(spec, self._allocate(spec.shape, spec.dtype))
                    created.append(entry)
                else:
                    buf, mapped, filled = self.shared.open(spec.key, spec.shape, spec.dtype)
                    entry = self._add(spec, buf)
                    entry.shared = mapped
                    if filled:
                        entry.ready.set()
                    else:
                        created.append(entry)
            entry.users.add(model)
            mine[spec.key] = entry
        return {spec.key: mine[spec.key] for spec in specs}, created

    def publish(self, entry: Entry) -> None:
        """``entry``'s bytes are filled and checked: with shared memory, other processes may map them."""
        if self.shared is not None and entry.shared is not None:
            self.shared.publish(entry.shared)

    def drop(self, entry: Entry) -> None:
        """Stop offering ``entry`` to new claims (its bytes turned out bad); its users keep their
        reference until they ``release``."""
        if self._entries.get(entry.spec.key) is entry:
            del self._entries[entry.spec.key]

    def retain(self, model: str, keys: Iterable[Hashable]) -> list[Hashable]:
        """Make ``model`` a user of the entries already held under ``keys`` (so evicting another
        model cannot free them). Returns the keys it was not a user of before."""
        mine = self._by_model.setdefault(model, {})
        added = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and key not in mine:
                entry.users.add(model)
                mine[key] = entry
                added.append(key)
        if not mine:
            del self._by_model[model]
        return added

    def release(self, model: str, keys: Iterable[Hashable] | None = None) -> int:
        """``model`` stops using its entries (only those under ``keys`` if given); entries nobody
        uses any more go to the free list. Returns the bytes that became free.
        """
        mine = self._by_model.get(model, {})
        if keys is None:
            dropped = self._by_model.pop(model, {})
        else:
            dropped = {k: mine.pop(k) for k in keys if k in mine}
            if not mine:
                self._by_model.pop(model, None)
        freed = 0
        for key, entry in dropped.items():
            entry.users.discard(model)
            if entry.users:
                continue
            if self._entries.get(key) is entry:
                del self._entries[key]
            self.live_bytes -= entry.nbytes
            entry.param = None
            freed += entry.nbytes
            if self.shared is not None:
                if entry.shared is not None:
                    self.shared.release(entry.shared)
                continue
            self.free_bytes += entry.nbytes
            self._free.setdefault((entry.spec.shape, entry.spec.dtype), []).append(entry.tensor)
        return freed

    def trim(self) -> int:
        """Return every free-listed buffer to the allocator. Returns the bytes released."""
        released = self.free_bytes
        self._free.clear()
        self.free_bytes = 0
        return released

    def _add(self, spec: TensorSpec, buf: torch.Tensor) -> Entry:
        entry = Entry(spec=spec, tensor=buf, ready=Fence())
        self._entries[spec.key] = entry
        self.live_bytes += spec.nbytes
        return entry

    def _reuse_buffer(self, spec: TensorSpec) -> torch.Tensor | None:
        bkey = (spec.shape, spec.dtype)
        pool = self._free.get(bkey)
        if not pool:
            return None
        self.free_bytes -= spec.nbytes
        buf = pool.pop()
        if not pool:
            del self._free[bkey]
        return buf

    def _make_room(self, nbytes: int) -> None:
        """Release free-listed buffers (largest first) until ``nbytes`` more fit the budget."""
        keys = sorted(self._free, key=lambda k: -self._free[k][0].nbytes)
        for bkey in keys:
            pool = self._free[bkey]
            while pool and self.used_bytes + nbytes > self.budget:
                self.free_bytes -= pool.pop().nbytes
            if not pool:
                del self._free[bkey]
            if self.used_bytes + nbytes <= self.budget:
                return
