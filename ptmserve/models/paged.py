"""Paged decoding: the KV cache in blocks, the padding-free step batch, and causal attention over the
cache (the decoders' counterpart of ``packed.py``).

One step runs the new tokens of several sequences in one flat row (no padding in the linears). A whole
prompt, a chunk of a long prompt (positions ``p0..p1`` with ``0..p0-1`` already cached) and a decode
token are the same thing: ``q_len >= 1`` new tokens whose attention covers the cache up to their own
position. Each layer writes the new keys and values into their cache slots first, then attends.

The KV cache is paged (vLLM's layout): ``num_blocks`` blocks of ``block_size`` token slots per layer; a
sequence owns a list of blocks (its block table) handed out by a ``BlockAllocator``. Token ``p`` of a
sequence lives in slot ``table[p // block_size] * block_size + p % block_size``.

Everything here runs on any device with plain torch ops; the CUDA kernels come later.
"""

from __future__ import annotations

import math
import mmap
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ptmserve.errors import InvalidInput, Overloaded

# ----------------------------------------------------------------------------------------- KV cache


class OutOfKVBlocks(Overloaded):
    """The KV cache has fewer free blocks than asked for; nothing was allocated."""


class BlockAllocator:
    """Hands out KV cache block ids ``0 .. num_blocks - 1``; a block is never out twice at a time.

    Not thread-safe: one owner (the engine's step loop) allocates and frees.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise InvalidInput(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        """``n`` distinct free block ids, now in use.

        Raises:
            OutOfKVBlocks: fewer than ``n`` blocks are free (nothing is allocated then).
        """
        if n < 0:
            raise InvalidInput(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfKVBlocks(
                f"the KV cache has {len(self._free)} free blocks of {self.num_blocks}; {n} were asked for"
            )
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Give ``blocks`` back.

        Raises:
            InvalidInput: a block is not in use (a double free or a foreign id); nothing is freed then.
        """
        blocks = list(blocks)
        bad = [b for b in blocks if b not in self._used]
        if bad or len(set(blocks)) != len(blocks):
            raise InvalidInput(f"blocks {bad or blocks} are not allocated (double free?)")
        self._used.difference_update(blocks)
        self._free.extend(blocks)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` token slots."""
    return -(-num_tokens // block_size)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor. On the CPU it lives in anonymous memory that the kernel zero-fills page by page on
    first touch: a large cache costs neither a memset nor resident memory until blocks are written."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = itemsize * math.prod(shape)
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes)
    tensor = torch.frombuffer(memory, dtype=dtype).view(shape)  # keeps ``memory`` alive
    return tensor


class KVCache:
    """Keys and values of every layer of one model, ``(num_layers, num_blocks, block_size, kv_heads,
    head_dim)`` each, zero-filled (slots never written hold finite values, so masked padding is safe;
    on the CPU, pages become resident only when written)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = _zeros(shape, dtype, device)
        self.v = _zeros(shape, dtype, device)
        self.block_size = block_size
        # per-layer views made once: a decode step asks for them in every layer
        self._blocks = [(self.k[i], self.v[i]) for i in range(num_layers)]
        flat = (num_blocks * block_size, num_kv_heads, head_dim)
        self._flat = [(k.view(flat), v.view(flat)) for k, v in self._blocks]

    @classmethod
    def for_config(
        cls,
        config: Any,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """A cache for a decoder ``config`` (one with ``num_layers``, ``num_kv_heads``, ``head_dim``)."""
        return cls(
            config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype, device
        )

    @staticmethod
    def bytes_for(
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> int:
        """Bytes of a cache of this shape (keys and values)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_blocks * block_size * num_kv_heads * head_dim * itemsize

    @staticmethod
    def blocks_within(budget_bytes: int, config: Any, block_size: int, dtype: torch.dtype) -> int:
        """The most blocks a cache for ``config`` can have within ``budget_bytes``."""
        one = KVCache.bytes_for(config.num_layers, 1, block_size, config.num_kv_heads, config.head_dim, dtype)
        return max(0, budget_bytes // one)

    @property
    def num_blocks(self) -> int:
        return int(self.k.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer_blocks(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s keys and values by block ``(num_blocks, block_size, kv_heads, head_dim)`` (views)."""
        return self._blocks[i]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s keys and values as flat slots ``(num_blocks * block_size, kv_heads, head_dim)``
        (views: writing them writes the cache)."""
        return self._flat[i]


# --------------------------------------------------------------------------------------- step batch


@dataclass(frozen=True, slots=True)
class SeqStep:
    """One sequence's part of a step: its new tokens, where they start, and the blocks it owns."""

    token_ids: Sequence[int]  # the new tokens (at least one)
    start: int  # absolute position of the first new token (tokens 0..start-1 are cached)
    block_table: Sequence[int]  # its cache blocks in order; must cover start + len(token_ids) slots


@dataclass(slots=True)
class StepBatch:
    """The new tokens of B sequences (T in all) in one flat row, with where their keys go in the cache.

    Sequence ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``; its new tokens sit at absolute positions
    ``context_lens[b] - q_len .. context_lens[b] - 1``.
    """

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64 absolute positions
    cu_seqlens: torch.Tensor  # (B+1,) int32 cumulative new-token counts starting at 0
    context_lens: torch.Tensor  # (B,) int32 each sequence's length after this step
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with block 0 (read only as masked padding)
    slot_mapping: torch.Tensor  # (T,) int64 flat cache slot of each new token
    block_size: int
    query_lens: tuple[int, ...]  # B host-side new-token counts
    context_lens_host: tuple[int, ...]  # B host-side context lengths (no device sync to plan attention)
    _plan: PagedPlan | None = field(default=None, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_host)

    def last_rows(self) -> torch.Tensor:
        """``(B,)`` int64 row of each sequence's last new token (the one whose logits are wanted)."""
        return self.cu_seqlens[1:].long() - 1

    def attention_plan(self) -> PagedPlan:
        """How attention runs over the cache (built once per batch, then shared by every layer)."""
        if self._plan is None:
            self._plan = make_paged_plan(self)
        return self._plan

    def to(self, device: torch.device | str) -> StepBatch:
        """The same batch with its tensors on ``device``."""
        return StepBatch(
            input_ids=self.input_ids.to(device),
            positions=self.positions.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            context_lens=self.context_lens.to(device),
            block_tables=self.block_tables.to(device),
            slot_mapping=self.slot_mapping.to(device),
            block_size=self.block_size,
            query_lens=self.query_lens,
            context_lens_host=self.context_lens_host,
        )


def make_step_batch(
    sequences: Sequence[SeqStep | tuple[Sequence[int], int, Sequence[int]]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> StepBatch:
    """A step batch of ``sequences``, each a ``SeqStep`` or ``(new_token_ids, start_position,
    block_table)``.

    Raises:
        InvalidInput: no sequences, a sequence without new tokens, a negative start, or a block table
            too short for ``start + len(new_token_ids)`` tokens.
    """
    if not sequences:
        raise InvalidInput("a step needs at least one sequence")
    if block_size <= 0:
        raise InvalidInput(f"block_size must be positive, got {block_size}")
    steps = [s if isinstance(s, SeqStep) else SeqStep(*s) for s in sequences]
    tables = [[int(x) for x in s.block_table] for s in steps]
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    for b, (s, table) in enumerate(zip(steps, tables, strict=True)):
        n = len(s.token_ids)
        if n == 0 or s.start < 0:
            raise InvalidInput(f"sequence {b}: {n} new tokens from position {s.start}; need >= 1 from >= 0")
        if len(table) * block_size < s.start + n:
            raise InvalidInput(
                f"sequence {b}: {len(table)} blocks of {block_size} cannot hold {s.start + n} tokens"
            )
        ids.extend(int(t) for t in s.token_ids)
        for p in range(s.start, s.start + n):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
    query_lens = tuple(len(s.token_ids) for s in steps)
    context_lens = tuple(s.start + len(s.token_ids) for s in steps)
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_size=block_size,
        query_lens=query_lens,
        context_lens_host=context_lens,
    )


# ------------------------------------------------------------------------------ paged attention plan


@dataclass(slots=True)
class PrefillPart:
    """A sequence with several new tokens: one attention call of its own."""

    rows: tuple[int, int]  # its rows start:end in the step
    slots: torch.Tensor | None  # (L,) int64 cache slots of its whole context; None when it starts at 0
    mask: torch.Tensor | None  # (q, L) bool, True where a query may see a key (causal by position)


@dataclass(slots=True)
class DecodeBucket:
    """Single-token sequences of similar context length: one padded attention call for all of them."""

    rows: torch.Tensor  # (n,) int64 their rows in the step, ascending
    blocks: torch.Tensor  # (n, nb) int64 cache blocks of each context, in order (padding: block 0)
    mask: torch.Tensor | None  # (n, 1, 1, nb * block_size) bool, True on real keys; None: none padded
    # One sequence whose blocks are consecutive ids: its keys are read in place, no gather.
    first_block: int | None = None  # its first block
    length: int = 0  # its context length (the keys read in place)
    # (cache, keys, values): every layer's keys and values read in place, made by the first layer
    in_place: tuple[KVCache, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)


@dataclass(slots=True)
class PagedPlan:
    prefills: list[PrefillPart]
    decodes: list[DecodeBucket]
    all_decode: bool = False  # one bucket holds every row of the step, in row order


def _context_slots(batch: StepBatch, rows: torch.Tensor, width: int) -> torch.Tensor:
    """``(n, width)`` int64 cache slots of positions ``0..width-1`` of sequences ``rows``; positions past
    a sequence's table read block 0 (finite values, for masked padding only)."""
    bs = batch.block_size
    pos = torch.arange(width, device=rows.device)
    tables = batch.block_tables.index_select(0, rows).long()  # (n, max_blocks)
    return tables[:, pos // bs] * bs + pos % bs


def make_paged_plan(batch: StepBatch) -> PagedPlan:
    """Group a step's sequences for attention: each multi-token sequence alone (causal), and the
    single-token ones (decodes) in buckets whose longest context is under twice their shortest, so the
    padding of a bucket never exceeds its real keys."""
    device = batch.input_ids.device
    starts = [0]
    for n in batch.query_lens:
        starts.append(starts[-1] + n)
    prefills: list[PrefillPart] = []
    decodes: list[int] = []
    for b, (q, ctx) in enumerate(zip(batch.query_lens, batch.context_lens_host, strict=True)):
        if q == 1:
            decodes.append(b)
            continue
        rows = (starts[b], starts[b] + q)
        if ctx == q:  # the whole prompt is new: attend over the fresh keys, causal
            prefills.append(PrefillPart(rows, None, None))
            continue
        slots = _context_slots(batch, torch.tensor([b], device=device), ctx)[0]  # (L,)
        qpos = torch.arange(ctx - q, ctx, device=device)
        mask = torch.arange(ctx, device=device)[None, :] <= qpos[:, None]  # (q, L)
        prefills.append(PrefillPart(rows, slots, mask))
    buckets: list[DecodeBucket] = []
    order = sorted(decodes, key=lambda b: -batch.context_lens_host[b])
    while order:
        longest = batch.context_lens_host[order[0]]
        members = [b for b in order if 2 * batch.context_lens_host[b] > longest]
        order = order[len(members) :]
        members.sort()  # in row order: a bucket of every row needs no scatter back
        buckets.append(_decode_bucket(batch, members, [starts[b] for b in members], longest))
    all_decode = not prefills and len(buckets) == 1 and len(decodes) == batch.num_seqs
    return PagedPlan(prefills, buckets, all_decode)


def _decode_bucket(batch: StepBatch, members: list[int], rows: list[int], longest: int) -> DecodeBucket:
    """The bucket of decoding sequences ``members`` (at ``rows`` of the step)."""
    device = batch.input_ids.device
    lengths = [batch.context_lens_host[b] for b in members]
    nb = blocks_needed(longest, batch.block_size)
    width = nb * batch.block_size  # whole blocks are read: keys past a context's end are masked
    tables = batch.block_tables.index_select(0, torch.tensor(members, device=device))[:, :nb]
    row_ids = torch.tensor(rows, dtype=torch.int64, device=device)
    if len(members) == 1:
        table = tables[0].tolist()  # host-side, once per step (tiny)
        if table == list(range(table[0], table[0] + nb)):
            return DecodeBucket(row_ids, tables.long(), None, first_block=table[0], length=lengths[0])
    mask = None
    if min(lengths) < width:
        lens = torch.tensor(lengths, device=device)
        mask = (torch.arange(width, device=device)[None, :] < lens[:, None])[:, None, None, :]
    return DecodeBucket(row_ids, tables.long(), mask)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: StepBatch, cache: KVCache
) -> torch.Tensor:
    """Write the new ``k, v`` ``(T, kv_heads, d)`` into layer ``layer`` of ``cache``, then return causal
    attention of the new queries ``q`` ``(T, heads, d)`` over each sequence's cache: ``(T, heads * d)``.

    A query at position ``p`` sees its sequence's keys ``0..p`` and nothing of any other sequence. With
    grouped-query attention (``kv_heads < heads``), query head ``h`` uses kv head ``h // (heads //
    kv_heads)``, as Hugging Face's ``repeat_kv``. Scale ``1/sqrt(d)``.

    Raises:
        InvalidInput: the cache's dtype is not the activations' dtype.
    """
    if cache.dtype != k.dtype:
        raise InvalidInput(f"KV cache dtype {cache.dtype} differs from the model's activations {k.dtype}")
    t, nh, d = q.shape
    kvh = k.shape[1]
    rep = nh // kvh
    kc, vc = cache.layer(layer)  # (S, kvh, d)
    kc.index_copy_(0, batch.slot_mapping, k)
    vc.index_copy_(0, batch.slot_mapping, v)
    plan = batch.attention_plan()
    if plan.all_decode:  # every row decodes, in one bucket: no scatter into ``out``
        return _decode_attention(q, plan.decodes[0], cache, layer, everything=True).reshape(t, nh * d)
    out = q.new_empty(t, nh, d)
    for part in plan.prefills:
        s, e = part.rows
        if part.slots is None:
            ks, vs = k[s:e], v[s:e]  # (L, kvh, d)
        else:
            ks, vs = kc.index_select(0, part.slots), vc.index_select(0, part.slots)
        # 4-D inputs (a batch of one): torch's fused CPU attention takes them; 3-D ones fall back to the
        # unfused path, 2-5x slower on long prompts. Grouped-query attention without repeating k and v.
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1)[None],
            ks.transpose(0, 1)[None],
            vs.transpose(0, 1)[None],
            attn_mask=part.mask,
            is_causal=part.slots is None,
            enable_gqa=rep > 1,
        )[0]  # (nh, q, d)
        out[s:e] = o.transpose(0, 1)
    for bucket in plan.decodes:
        o = _decode_attention(q, bucket, cache, layer, everything=False)  # (n, kvh, rep, d)
        out.index_copy_(0, bucket.rows, o.reshape(-1, nh, d))
    return out.view(t, nh * d)


def _decode_attention(
    q: torch.Tensor, bucket: DecodeBucket, cache: KVCache, layer: int, *, everything: bool
) -> torch.Tensor:
    """Attention of a bucket's single-token queries over their keys in layer ``layer`` of ``cache``:
    ``(n, kvh, rep, d)``. ``everything``: the bucket holds all of ``q``'s rows, in order."""
    n, nb = bucket.blocks.shape
    kb, vb = cache.layer_blocks(layer)  # (num_blocks, block_size, kvh, d)
    bs, kvh, d = kb.shape[1:]
    # the query heads that share a kv head sit side by side as a "query length": kv heads not repeated
    qd = (q if everything else q.index_select(0, bucket.rows)).view(n, kvh, q.shape[1] // kvh, d)
    if bucket.first_block is not None:  # consecutive blocks: read the keys in place
        if bucket.in_place is None or bucket.in_place[0] is not cache:
            bucket.in_place = (cache, *_in_place(cache, bucket.first_block, nb, bucket.length))
        kd, vd = bucket.in_place[1][layer], bucket.in_place[2][layer]  # (1, kvh, L, d)
    else:
        flat = bucket.blocks.reshape(-1)  # whole blocks are copied, not slot by slot
        kd = kb.index_select(0, flat).view(n, nb * bs, kvh, d).transpose(1, 2)  # (n, kvh, W, d)
        vd = vb.index_select(0, flat).view(n, nb * bs, kvh, d).transpose(1, 2)
    return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=bucket.mask)


def _in_place(cache: KVCache, first: int, blocks: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions ``0..length-1`` of a sequence that owns blocks ``first ..
    first+blocks-1``, in every layer: views ``(layers, 1, kvh, length, d)`` of the cache (made once per
    step, so that a layer takes its own with one index)."""
    layers, _, bs, kvh, d = cache.k.shape

    def view(x: torch.Tensor) -> torch.Tensor:
        flat = x[:, first : first + blocks].view(layers, 1, blocks * bs, kvh, d)  # (layers, 1, W, kvh, d)
        return flat[:, :, :length].transpose(2, 3)

    return view(cache.k), view(cache.v)
