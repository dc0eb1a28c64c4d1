"""The runner seam: ``ModelRunner.execute(step) -> RunnerOutput``, the only place that touches models.

The step loop hands the runner a scheduled step; the runner makes the step's memory moves (evictions,
the demand load, prefetches), packs the step's inputs without padding, runs them through the model
group by group, and gives back one block of rows per request (for a text generation model, each
sequence's new token and text: ``generation.py``). It never touches the scheduler or a
request's future, so the loop, the simulator and tests can drive it alike (nano-vllm's ``ModelRunner``,
TEI's backends). A request whose inputs all left at early exits while the step goes on is handed to
``early_answer`` at once (the step loop answers it), and is in the step's output as well.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from ptmserve.engine.catalog import ModelCatalog
from ptmserve.engine.generation import GenerationRunner, GenerationUpdate, GenerationWork
from ptmserve.engine.requests import Request, RequestStatus
from ptmserve.engine.scheduler import Step
from ptmserve.errors import NotReady, PtmError
from ptmserve.memory.manager import WeightManager
from ptmserve.models.exits import EarlyExit, exits_of
from ptmserve.models.packed import pack

logger = logging.getLogger(__name__)

# ``early_answer(request, embeddings (n, H), logits (n, C), exit_layers (n,))``: the request's rows of
# this step all left at early exits, and the step computed its last inputs.
EarlyAnswer = Callable[[Request, np.ndarray, np.ndarray, np.ndarray], None]


@dataclass(slots=True, eq=False)
class Work:
    """What the engine keeps in ``Request.payload``: the inputs, the parts computed so far, and where
    the answer goes."""

    token_ids: list[list[int]]
    classify: bool  # the client asked for logits (classification)
    early_exit: bool = True  # its inputs may leave at the model's early exits (when it classifies)
    future: Future = field(default_factory=Future)
    embeddings: list[np.ndarray] = field(default_factory=list)  # (n, H) per computed part, in order
    logits: list[np.ndarray] = field(default_factory=list)  # (n, C) per computed part, when classify
    exit_layers: list[np.ndarray] = field(default_factory=list)  # (n,) int32 per part, models with exits


def work_of(req: Request) -> Work:
    """The engine's payload of an embedding or classification request."""
    work = req.payload
    if not isinstance(work, Work):
        raise TypeError(f"request {req.id} carries no Work")
    return work


def future_of(req: Request) -> Future:
    """Where ``req``'s answer goes, whatever kind of request it is."""
    work = req.payload
    if not isinstance(work, (Work, GenerationWork)):
        raise TypeError(f"request {req.id} carries no engine payload")
    return work.future


@dataclass(slots=True)
class RunnerOutput:
    """What one step produced."""

    embeddings: dict[int, np.ndarray] = field(default_factory=dict)  # request id -> (n, H) rows of its span
    logits: dict[int, np.ndarray] = field(default_factory=dict)  # request id -> (n, C), when it classifies
    # request id -> (n,) int32 exit layer of each row (``models/exits.py``), when it classifies on a model
    # with early exits
    exit_layers: dict[int, np.ndarray] = field(default_factory=dict)
    generated: dict[int, GenerationUpdate] = field(default_factory=dict)  # request id -> its progress
    exec_seconds: float = 0.0  # time the model computed, not counting waits for its weights
    tokens: int | None = None  # tokens computed (requests cancelled before the step are skipped); None: all
    wait_seconds: float = 0.0  # time compute waited for weights still loading (a demand load)
    error: PtmError | None = None  # the step failed; every request of it fails with this


class ModelRunner:
    """Runs scheduled steps on the weight manager's models.

    Args:
        weights: the weight tiers.
        catalog: model configs (for packing).
        device: where batches compute.
        generation: the sequences and KV cache of text generation models.
        servable: whether a model may run or be prefetched now (explicit model control unloads models).
    """

    def __init__(
        self,
        weights: WeightManager,
        catalog: ModelCatalog,
        device: torch.device,
        generation: GenerationRunner,
        servable: Callable[[str], bool] = lambda model: True,
    ) -> None:
        self._weights = weights
        self._catalog = catalog
        self._device = device
        self.generation = generation
        self._servable = servable
        self.early_answer: EarlyAnswer | None = None  # the step loop sets it

    def execute(self, step: Step) -> RunnerOutput:
        """Run ``step``: evictions, then its batch (loading the model if needed), with its prefetches
        started behind the load. A failure is returned in ``error``, never raised."""
        for model in step.evict:
            self._weights.evict(model)
        if step.model is None or not step.batch:
            self._prefetch(step.prefetch)
            return RunnerOutput()
        try:
            return self._run(step)
        except PtmError as exc:
            return RunnerOutput(error=exc)
        except Exception:  # a bug: fail this step's requests clearly, keep serving
            logger.exception("step %d on model %s failed", step.seq, step.model)
            return RunnerOutput(error=PtmError(f"internal error while running model {step.model!r}"))

    def _run(self, step: Step) -> RunnerOutput:
        model = step.model
        assert model is not None
        if not self._servable(model):
            raise NotReady(f"model {model!r} is not loaded")
        entry = self._catalog.entry(model)
        if entry.generates:
            return self._run_generation(step, model)
        # Requests cancelled since the step was scheduled are not computed (the cost model is told the
        # tokens really computed); one cancelled while the step computes is simply not answered.
        batch = [r for r in step.batch if r.status is not RequestStatus.CANCELLED]
        if not batch:
            return RunnerOutput(tokens=0)
        rows: list[tuple[Work, int]] = []  # (request's work, inputs in this step), in batch order
        inputs: list[list[int]] = []
        for r in batch:
            work = work_of(r)
            start, end = step.spans.get(r.id, (0, len(work.token_ids)))
            inputs.extend(work.token_ids[start:end])
            rows.append((work, end - start))
        classify = any(work.classify for work, _ in rows)
        early_exit = None
        if classify and exits_of(entry.config):  # only rows of classifications that allow it may leave
            allowed = [w.classify and w.early_exit for w, n in rows for _ in range(n)]
            early_exit = EarlyExit(allowed, on_leave=self._early_answers(step, batch, rows))
        packed = pack(inputs, position_offset=entry.config.position_offset, device=self._device)
        t0 = time.perf_counter()
        with self._weights.acquire(model) as loaded:
            self._prefetch(step.prefetch)  # queued behind this step's own load
            acts = loaded.run(packed, classify=classify, early_exit=early_exit)
            assert acts.embeddings is not None
            embeddings = acts.embeddings.float().cpu().numpy()
            logits = acts.logits.float().cpu().numpy() if acts.logits is not None else None
            waited = loaded.waited_seconds
        total = time.perf_counter() - t0
        exit_layers = early_exit.layers.numpy() if early_exit and early_exit.layers is not None else None
        computed = int(packed.num_tokens)
        out = RunnerOutput(exec_seconds=max(0.0, total - waited), wait_seconds=waited, tokens=computed)
        start = 0
        for r, (work, n) in zip(batch, rows, strict=True):
            out.embeddings[r.id] = embeddings[start : start + n]
            if logits is not None:
                out.logits[r.id] = logits[start : start + n]
            if exit_layers is not None and work.classify:
                out.exit_layers[r.id] = exit_layers[start : start + n]
            start += n
        return out

    def _early_answers(
        self, step: Step, batch: list[Request], rows: list[tuple[Work, int]]
    ) -> _EarlyAnswers | None:
        if self.early_answer is None:
            return None
        last = [step.spans.get(r.id, (0, r.total_inputs))[1] >= r.total_inputs for r in batch]
        return _EarlyAnswers(batch, [n for _, n in rows], last, self.early_answer)

    def _run_generation(self, step: Step, model: str) -> RunnerOutput:
        tokenizer = self._catalog.tokenizer(model)
        t0 = time.perf_counter()
        with self._weights.acquire(model) as loaded:
            self._prefetch(step.prefetch)
            try:
                updates = self.generation.run(step, loaded, tokenizer)
            except BaseException:
                self.generation.end(step.batch)  # the step fails its requests: free their blocks
                raise
            waited = loaded.waited_seconds
        total = time.perf_counter() - t0
        return RunnerOutput(exec_seconds=max(0.0, total - waited), wait_seconds=waited, generated=updates)

    def _prefetch(self, models: list[str]) -> None:
        for m in models:
            if not self._servable(m):
                continue
            try:
                self._weights.prefetch(m)
            except PtmError as exc:
                logger.warning("prefetch of %s skipped: %s", m, exc.message)


class _EarlyAnswers:
    """An ``EarlyExit.on_leave`` hook: collects each request's rows as they leave, and hands a request
    to ``answer`` once all its rows of the step have left (when the step computes its last inputs)."""

    def __init__(
        self, batch: list[Request], counts: list[int], last: list[bool], answer: EarlyAnswer
    ) -> None:
        self._batch = batch
        self._answer = answer
        self._owner: list[int] = [i for i, n in enumerate(counts) for _ in range(n)]  # row -> request index
        self._first = np.cumsum([0, *counts[:-1]]).tolist()  # request index -> its first row
        self._waiting = [n if final else -1 for n, final in zip(counts, last, strict=True)]  # -1: never
        self._parts: dict[int, list[tuple[list[int], int, torch.Tensor, torch.Tensor]]] = {}

    def __call__(
        self, rows: torch.Tensor, layer: int, logits: torch.Tensor, embeddings: torch.Tensor
    ) -> None:
        mine: dict[int, list[int]] = {}
        for k, row in enumerate(rows.tolist()):
            mine.setdefault(self._owner[row], []).append(k)
        for i, ks in mine.items():
            if self._waiting[i] < 0:
                continue
            index = torch.tensor(ks, device=logits.device)
            local = [rows[k].item() - self._first[i] for k in ks]
            part = (local, layer, logits.index_select(0, index), embeddings.index_select(0, index))
            self._parts.setdefault(i, []).append(part)
            self._waiting[i] -= len(ks)
            if self._waiting[i] == 0:
                self._answer(self._batch[i], *self._assemble(self._parts.pop(i)))

    @staticmethod
    def _assemble(parts: list[tuple[list[int], int, torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, ...]:
        """The request's embeddings, logits and exit layers, in its own row order."""
        n = sum(len(local) for local, *_ in parts)
        order = torch.tensor([row for local, *_ in parts for row in local])
        place = torch.empty(n, dtype=torch.long)
        place[order] = torch.arange(n)
        embeddings = torch.cat([e for *_, e in parts]).index_select(0, place.to(parts[0][3].device))
        logits = torch.cat([x for _, _, x, _ in parts]).index_select(0, place.to(parts[0][2].device))
        layers = np.array([layer for local, layer, *_ in parts for _ in local], dtype=np.int32)[place.numpy()]
        return embeddings.float().cpu().numpy(), logits.float().cpu().numpy(), layers
