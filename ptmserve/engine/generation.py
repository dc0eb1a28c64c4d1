"""The runner's side of text generation: every started sequence's tokens and KV cache blocks, one step
of a decoder model over them, and what each sequence gets out of it (a token, text, the end).

The scheduler decides which requests a step carries and how many of their pending tokens it computes
(``Step.spans``); this module decides whether they fit in the KV cache. A request that starts needs
free blocks for its first chunk, else it does not start (it waits in its queue). A started sequence
that needs a block when none is free preempts the most recently started sequence (itself, if it is
that one): the victim's blocks are freed and it recomputes its prompt and the tokens it already
generated in later steps (vLLM's recompute preemption). The oldest sequence therefore always advances,
and since a request is admitted only if its prompt plus ``max_tokens`` fits the whole cache, every
sequence finishes.

One decoder model at a time holds the cache (the scheduler's rule). The cache tensor is allocated for
the model's shape when a model first generates, and kept while models of the same shape follow.

Runs on the step loop's thread only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ptmserve.engine.api import Generation, GenerationChunk, GenerationParams, GenerationResult
from ptmserve.engine.requests import Request
from ptmserve.engine.scheduler import Step
from ptmserve.memory.loaded import LoadedModel
from ptmserve.models.paged import BlockAllocator, KVCache, SeqStep, blocks_needed, make_step_batch
from ptmserve.models.sampling import SamplingParams, find_stop, make_generator, sample, streamable_length
from ptmserve.models.tokenizer import TextTokenizer


@dataclass(slots=True, eq=False)
class GenerationWork:
    """What the engine keeps in ``Request.payload`` of a generation request."""

    prompt: list[int]  # token ids, after truncation
    params: GenerationParams
    sampling: SamplingParams
    max_new: int  # new tokens at most (``max_tokens``, or what the context and the cache allow)
    end_ids: frozenset[int]  # tokens that end the text (empty with ``ignore_eos``)
    handle: Generation

    @property
    def future(self):  # noqa: ANN201 - the handle's Future, where the worker answers
        return self.handle.future


@dataclass(slots=True)
class GenerationUpdate:
    """What one step did for one generation request."""

    pending: int  # tokens to compute before its next token; 0 when it finished
    new_tokens: int = 0  # tokens sampled by this step (0 or 1)
    chunk: GenerationChunk | None = None  # the token sampled now and the text that became final
    result: GenerationResult | None = None  # when it finished
    first_token_seconds: float | None = None  # when this step sampled its first token
    inter_token_seconds: float | None = None  # since its previous token, when it had one


@dataclass(slots=True, eq=False)
class _Sequence:
    """A started request: its tokens, how many are in the cache, and its blocks."""

    request: Request
    work: GenerationWork
    order: int  # start order: the highest is preempted first
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # prompt, then generated tokens
    computed: int = 0  # tokens whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)
    text: str = ""  # the generated text so far (cut at a stop string once one is found)
    sent: int = 0  # characters of ``text`` already streamed
    prefix_offset: int = 0  # generated tokens before the detokenizing window
    read_offset: int = 0  # generated tokens whose text is in ``text``
    last_token_at: float | None = None
    first_token_seconds: float = 0.0  # from arrival to its first token

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.work.prompt) :]

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed


class GenerationRunner:
    """Sequences and the KV cache of the decoder model that generates now.

    Args:
        budget_bytes: the KV cache budget (``--kv-cache-memory``).
        block_size: token slots per block.
        device, dtype: where and in what the cache lives (the models' compute dtype).
        clock: the scheduler's clock (time to first token is measured from a request's arrival).
    """

    def __init__(
        self,
        budget_bytes: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.block_size = block_size
        self._device = device
        self._dtype = dtype
        self._clock = clock
        self._cache: KVCache | None = None
        self._shape: tuple[int, int, int] | None = None  # (layers, kv heads, head dim) of the cache
        self._allocator: BlockAllocator | None = None
        self._seqs: dict[int, _Sequence] = {}
        self._started = 0
        self.model: str | None = None  # the model the cache serves now
        self.preemptions = 0  # sequences that gave their blocks up to recompute later

    # -- the cache ------------------------------------------------------------------------------------

    def capacity_tokens(self, config: object) -> int:
        """Tokens a cache for ``config`` holds within the budget (one sequence can never be longer)."""
        return (
            KVCache.blocks_within(self.budget_bytes, config, self.block_size, self._dtype) * self.block_size
        )

    @property
    def used_blocks(self) -> int:
        return self._allocator.used_blocks if self._allocator is not None else 0

    @property
    def total_blocks(self) -> int:
        return self._allocator.num_blocks if self._allocator is not None else 0

    @property
    def used_bytes(self) -> int:
        if self._cache is None or self._allocator is None:
            return 0
        return self._cache.nbytes // self._cache.num_blocks * self._allocator.used_blocks

    @property
    def sequences(self) -> int:
        return len(self._seqs)

    def _serve(self, model: str, config: object) -> None:
        """Point the cache at ``model``: allocated anew only when its shape differs from the last one."""
        if model == self.model:
            return
        if self._seqs:
            raise RuntimeError(f"{len(self._seqs)} sequences of {self.model!r} still hold the KV cache")
        shape = (config.num_layers, config.num_kv_heads, config.head_dim)  # type: ignore[attr-defined]
        if shape != self._shape:
            self._cache = None  # free the old one first
            blocks = KVCache.blocks_within(self.budget_bytes, config, self.block_size, self._dtype)
            self._cache = KVCache.for_config(config, blocks, self.block_size, self._dtype, self._device)
            self._allocator = BlockAllocator(blocks)
            self._shape = shape
        self.model = model

    # -- sequences ------------------------------------------------------------------------------------

    def reap(self) -> int:
        """Free the blocks of sequences whose requests ended outside a step (cancelled, disconnected,
        failed, dropped). Returns how many."""
        gone = [s for s in self._seqs.values() if s.request.status.is_finished]
        for seq in gone:
            self._forget(seq)
        return len(gone)

    def _forget(self, seq: _Sequence) -> None:
        self._free(seq)
        self._seqs.pop(seq.request.id, None)

    def _free(self, seq: _Sequence) -> None:
        if seq.blocks:
            assert self._allocator is not None
            self._allocator.free(seq.blocks)
            seq.blocks = []

    def _preempt(self, seq: _Sequence) -> None:
        """Free ``seq``'s blocks; it recomputes everything it has in later steps."""
        self._free(seq)
        seq.computed = 0
        self.preemptions += 1

    def _grow(self, seq: _Sequence, tokens: int) -> bool:
        """Give ``seq`` blocks for ``tokens`` slots, preempting newer sequences (or itself) when none are
        free. False when ``seq`` itself had to give way."""
        assert self._allocator is not None
        need = blocks_needed(tokens, self.block_size) - len(seq.blocks)
        while need > self._allocator.free_blocks:
            victim = max((s for s in self._seqs.values() if s.blocks or s is seq), key=lambda s: s.order)
            self._preempt(victim)
            if victim is seq:
                return False
        seq.blocks += self._allocator.allocate(max(0, need))
        return True

    # -- one step -------------------------------------------------------------------------------------

    def run(self, step: Step, loaded: LoadedModel, tokenizer: TextTokenizer) -> dict[int, GenerationUpdate]:
        """Run ``step`` of decoder ``loaded``: returns an update per request whose progress changed (the
        step's own, and sequences it preempted); a request of the step that could not start has none.

        Raises:
            PtmError: the model failed (every sequence of the step is then ended by the caller).
        """
        self.reap()
        self._serve(loaded.name, loaded.config)
        assert self._cache is not None and self._allocator is not None
        updates: dict[int, GenerationUpdate] = {}
        planned: list[tuple[_Sequence, int]] = []
        for req in step.batch:
            start, end = step.spans[req.id]
            seq = self._seqs.get(req.id) or self._start(req, end - start)
            if seq is None:
                continue  # no room to start: it waits
            n = min(end - start, seq.pending)
            if not self._grow(seq, seq.computed + n):
                continue
            planned.append((seq, n))
        planned = [(s, n) for s, n in planned if s.blocks]  # drop those preempted by later ones
        if planned:
            batch = make_step_batch(
                [SeqStep(s.tokens[s.computed : s.computed + n], s.computed, s.blocks) for s, n in planned],
                self.block_size,
                self._device,
            )
            logits = loaded.step(batch, self._cache)
            for seq, n in planned:
                seq.computed += n
            ready = [(row, s) for row, (s, _) in enumerate(planned) if s.pending == 0]
            if ready:
                if len(ready) < len(planned):  # else every row, in order: no copy
                    logits = logits.index_select(0, torch.tensor([r for r, _ in ready], device=logits.device))
                picked = sample(
                    logits,
                    [s.work.sampling for _, s in ready],
                    [s.generator for _, s in ready],
                )
                now = self._clock()
                for token, (_, seq) in zip(picked, ready, strict=True):
                    updates[seq.request.id] = self._append(seq, token, now, tokenizer)
        for seq in self._seqs.values():  # carried, chunked or preempted: their pending tokens
            if seq.request.id not in updates:
                updates[seq.request.id] = GenerationUpdate(pending=seq.pending)
        return updates

    def _start(self, req: Request, first_chunk: int) -> _Sequence | None:
        """A sequence for ``req`` if the cache has free blocks for its first chunk, else None."""
        assert self._allocator is not None
        if blocks_needed(first_chunk, self.block_size) > self._allocator.free_blocks:
            return None
        work: GenerationWork = req.payload  # type: ignore[assignment]
        generator = None if work.sampling.greedy else make_generator(work.sampling, self._device)
        self._started += 1
        seq = _Sequence(req, work, self._started, generator, list(work.prompt))
        self._seqs[req.id] = seq
        return seq

    def _append(self, seq: _Sequence, token: int, now: float, tokenizer: TextTokenizer) -> GenerationUpdate:
        """Add a sampled token to ``seq``: its new text, and its end when it has one."""
        work = seq.work
        update = GenerationUpdate(pending=1, new_tokens=1)
        if seq.last_token_at is None:
            seq.first_token_seconds = update.first_token_seconds = now - seq.request.arrival
        else:
            update.inter_token_seconds = now - seq.last_token_at
        seq.last_token_at = now
        seq.tokens.append(token)
        finish = None
        if token in work.end_ids:
            finish = "stop"
        else:
            checked = len(seq.text)
            _detokenize(seq, tokenizer, final=len(seq.generated) >= work.max_new)
            longest = max((len(s) for s in work.params.stop), default=0)
            match = find_stop(seq.text, work.params.stop, max(0, checked - longest + 1))
            if match is not None:
                seq.text = seq.text[: match.index]
                finish = "stop"
        if finish is None and len(seq.generated) >= work.max_new:
            finish = "length"
        ready = len(seq.text) if finish is not None else streamable_length(seq.text, work.params.stop)
        update.chunk = GenerationChunk(seq.text[seq.sent : max(seq.sent, ready)], (token,))
        seq.sent = max(seq.sent, ready)
        if finish is not None:
            update.pending = 0
            update.result = GenerationResult(
                text=seq.text,
                token_ids=tuple(seq.generated),
                finish_reason=finish,
                prompt_tokens=len(work.prompt),
                completion_tokens=len(seq.generated),
                first_token_seconds=seq.first_token_seconds,
            )
            self._forget(seq)
        return update

    def end(self, requests: Iterable[Request]) -> None:
        """Forget ``requests`` (their step failed)."""
        for req in requests:
            seq = self._seqs.get(req.id)
            if seq is not None:
                self._forget(seq)


def _detokenize(seq: _Sequence, tokenizer: TextTokenizer, *, final: bool) -> None:
    """Extend ``seq.text`` with the text of its new tokens, decoding only a window of the last few
    tokens (TGI's and vLLM's incremental detokenizing): the text of the window's tokens before the new
    ones is subtracted from the window's text. Text that ends in an unfinished UTF-8 character waits for
    the next token, unless ``final``."""
    generated = seq.generated
    before = tokenizer.decode(generated[seq.prefix_offset : seq.read_offset])
    window = tokenizer.decode(generated[seq.prefix_offset :])
    if len(window) > len(before) and (final or not window.endswith("\ufffd")):
        seq.text += window[len(before) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(generated)
