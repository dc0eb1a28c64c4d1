"""A padding-free BERT-family encoder (BERT, MiniLM, RoBERTa/XLM-R, DistilBERT).

All four families are the same post-LayerNorm Transformer encoder; they differ only in the embedding
tables (DistilBERT has no token types; RoBERTa counts positions from ``pad_token_id + 1``) and in the
classification head's activation (tanh for BERT's pooler and RoBERTa's ``classifier.dense``, ReLU for
DistilBERT's ``pre_classifier``). Checkpoint names are translated in ``names.py``, never here.

Every op but attention runs on the flat ``(T, H)`` rows of real tokens; attention runs per sequence, so
no token ever sees another input and no FLOP is spent on padding.

The module keeps no derived tensors and no buffers: build it on the meta device and assign parameters
(``load_state_dict(..., assign=True)``) or ``to_empty`` then copy; ``forward`` reads parameters at call
time. Callers wrap calls in ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ptmserve.errors import InvalidInput
from ptmserve.models.config import EncoderConfig, ExitSpec, Pooling
from ptmserve.models.exits import EarlyExit, ExitRun, triggers
from ptmserve.models.packed import PackedBatch
from ptmserve.models.registry import check_tensors
from ptmserve.models.runner import Activations, Stage, run_stages

GROUP_EMBEDDINGS = "embeddings"
GROUP_HEAD = "head"
STAGE_POOL = "pool"  # pooling needs no weights: no load group has this name


@dataclass(slots=True)
class EncoderOutput:
    """What one forward pass gives for a batch of B inputs (always float32)."""

    embeddings: torch.Tensor  # (B, H) pooled (and normalised if the pooling says so)
    logits: torch.Tensor | None  # (B, C) when the model has a classification head, else None
    exit_layers: torch.Tensor | None = None  # (B,) int32 when the model has exits (see ``exits.py``)


def group_names_for(config: EncoderConfig) -> list[str]:
    """Groups of a model with ``config`` in execution order (``head`` only when it has a native head;
    exit heads belong to their layer's group)."""
    groups = [GROUP_EMBEDDINGS] + [f"layers.{i}" for i in range(config.num_layers)]
    return groups + [GROUP_HEAD] if config.has_native_head else groups


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.word(batch.input_ids) + self.position(batch.position_ids)  # (T, H)
        if self.token_type is not None:
            x = x + self.token_type(batch.token_type_ids)
        return self.norm(x)


class Layer(nn.Module):
    """One post-LN block: ``x = LN(x + O(attn(QKV x)))``; ``x = LN(x + down(act(up x)))``; and, when it
    has an early exit, its classifier ``exit`` (pooled states -> logits)."""

    def __init__(self, cfg: EncoderConfig, has_exit: bool = False) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.q = nn.Linear(h, h)
        self.k = nn.Linear(h, h)
        self.v = nn.Linear(h, h)
        self.o = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(h, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.exit = nn.Linear(h, cfg.num_labels) if has_exit else None


class Head(nn.Module):
    """Sequence classification: ``out(act(dense(x_cls)))`` (BERT pooler, RoBERTa head, DistilBERT)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.num_labels)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    return lambda x: F.gelu(x, approximate="tanh")  # gelu_new, gelu_pytorch_tanh, gelu_fast


def _onednn_activation(name: str) -> tuple[str, str]:
    """``_activation(name)`` as a oneDNN post-op: (attr, algorithm) of ``mkldnn._linear_pointwise``."""
    if name == "gelu":
        return "gelu", "none"
    if name == "relu":
        return "relu", ""
    return "gelu", "tanh"


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


class Encoder(nn.Module):
    """The encoder of ``config``; our parameter names: ``embeddings.*``, ``layers.{i}.*`` (early exits:
    ``layers.{i}.exit.*``), ``head.*``."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        exit_layers = {e.layer for e in config.exits}
        self.layers = nn.ModuleList(Layer(config, i in exit_layers) for i in range(config.num_layers))
        self.head = Head(config) if config.has_native_head else None
        self._act = _activation(config.hidden_act)
        self._onednn_act = _onednn_activation(config.hidden_act)
        # Run plain ``nn.Linear`` layers on the CPU as oneDNN linears with fused epilogues (bias,
        # activation, residual add) where ``_fuses`` allows; False keeps the module calls (comparisons).
        self.onednn = True

    @classmethod
    def from_tensors(
        cls,
        config: EncoderConfig,
        tensors: Mapping[str, torch.Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Encoder:
        """An encoder whose parameters are ``tensors`` (our names), moved to ``device`` and ``dtype``.

        Raises:
            InvalidCheckpoint: a parameter is missing, unexpected or has the wrong shape.
        """
        with torch.device("meta"):
            model = cls(config)
        check_tensors(model, tensors)  # before anything is copied
        model.load_state_dict(
            {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}, assign=True
        )
        return model.eval()

    def group_names(self) -> list[str]:
        """Parameter groups in execution order: ``embeddings``, ``layers.0`` ... and ``head`` if any."""
        return group_names_for(self.config)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Embedding rows of every token: ``(T, H)`` in the parameters' dtype."""
        return self.embeddings(batch)

    def run_layer(self, i: int, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Layer ``i`` applied to ``hidden`` ``(T, H)``; returns ``(T, H)``."""
        layer = self.layers[i]
        if self._fuses(layer, hidden):
            return self._run_layer_onednn(layer, hidden, batch)
        cfg = self.config
        t = hidden.shape[0]
        q = layer.q(hidden).view(t, cfg.num_heads, cfg.head_dim)  # (T, nh, d)
        k = layer.k(hidden).view(t, cfg.num_heads, cfg.head_dim)
        v = layer.v(hidden).view(t, cfg.num_heads, cfg.head_dim)
        ctx = packed_attention(q, k, v, batch)  # (T, H)
        x = layer.attn_norm(hidden + layer.o(ctx))  # (T, H)
        return layer.ffn_norm(x + layer.down(self._act(layer.up(x))))

    def _fuses(self, layer: Layer, hidden: torch.Tensor) -> bool:
        """Whether ``layer`` may take the oneDNN path: its linears are plain ``nn.Linear`` (quantized or
        other modules keep their own call), on the CPU, in a dtype oneDNN runs, without autograd."""
        return (
            self.onednn
            and _ONEDNN
            and hidden.device.type == "cpu"
            and hidden.dtype in _ONEDNN_DTYPES
            and not torch.is_grad_enabled()
            and all(type(m) is nn.Linear for m in (layer.q, layer.k, layer.v, layer.o, layer.up, layer.down))
        )

    def _run_layer_onednn(self, layer: Layer, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """``run_layer`` with each linear one oneDNN call whose epilogue adds the bias and applies the
        activation or adds the residual: no separate bias copy (``addmm`` writes the broadcast bias
        first, then accumulates), no separate GELU or residual pass over the activations."""
        cfg = self.config
        t = hidden.shape[0]
        linear = torch.ops.mkldnn._linear_pointwise
        nh, d = cfg.num_heads, cfg.head_dim
        # Three GEMMs, not one on the concatenated (3H, H) weight: measured no faster here (docs).
        q, k, v = (
            linear(hidden, m.weight, m.bias, "none", [], "").view(t, nh, d)
            for m in (layer.q, layer.k, layer.v)
        )
        ctx = packed_attention(q, k, v, batch)  # (T, H)
        o = layer.o
        x = layer.attn_norm(linear.binary(ctx, hidden, o.weight, o.bias, "add"))  # LN(hidden + O ctx)
        attr, algorithm = self._onednn_act
        up = linear(x, layer.up.weight, layer.up.bias, attr, [], algorithm)  # act(up x): (T, I)
        return layer.ffn_norm(linear.binary(up, x, layer.down.weight, layer.down.bias, "add"))

    def pool(self, hidden: torch.Tensor, batch: PackedBatch, pooling: Pooling) -> torch.Tensor:
        """One float32 vector per sequence ``(B, H)``: mean over its tokens or its first token, then
        L2-normalised if ``pooling.normalize``."""
        return _normalized(self.pool_states(hidden, batch, pooling.mode), pooling)

    def pool_states(self, hidden: torch.Tensor, batch: PackedBatch, mode: str) -> torch.Tensor:
        """``pool`` without the normalisation: float32 ``(B, H)``, the mean of each sequence's states
        (``mode`` "mean") or its first token's (``"cls"``). Early exits classify these."""
        if mode == "cls":
            return hidden[batch.cu_seqlens[:-1].long()].float()  # (B, H)
        sums = hidden.new_zeros((batch.num_seqs, hidden.shape[1]), dtype=torch.float32)
        sums.index_add_(0, batch.seq_ids, hidden.float())  # (B, H)
        lengths = torch.tensor(batch.lengths, dtype=torch.float32, device=hidden.device)
        return sums / lengths[:, None]

    def classify(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Float32 logits ``(B, C)`` from each sequence's first token, as HF's classification head."""
        if self.head is None:
            raise InvalidInput("this model has no native classification head")
        first = hidden[batch.cu_seqlens[:-1].long()]  # (B, H)
        x = self.head.dense(first)
        x = F.relu(x) if self.config.family == "distilbert" else torch.tanh(x)
        return self.head.out(x).float()  # (B, C)

    def exit_logits(self, i: int, pooled: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``(B, C)`` of the exit after layer ``i`` from ``pool_states`` of its output."""
        head = self.layers[i].exit
        if head is None:
            raise InvalidInput(f"layer {i} has no early exit")
        return head(pooled.to(head.weight.dtype)).float()

    def stages(self, *, classify: bool, pooling: Pooling, early_exit: EarlyExit | None = None) -> list[Stage]:
        """One stage per load group (``embeddings``, ``layers.{i}``, ``head`` when ``classify`` and the
        model has a native head), then pooling, which needs no weights.

        A model with exits classifies through them: after each layer with an exit, the rows sure enough
        that ``early_exit.allowed`` lets go (default: all) leave the batch with that exit's logits and
        their pooled states at that layer; the final classifier takes the rest. The run sets
        ``acts.logits``, ``acts.embeddings`` (original row order) and ``early_exit.layers`` (see
        ``exits.py`` for the convention). Without ``classify`` every row runs every layer. Models without
        exits ignore ``early_exit``.

        Raises:
            InvalidInput: ``classify`` on a model without labels.
        """
        if classify and not self.config.labels:
            raise InvalidInput("this model has no classification head (its config has no labels)")
        if classify and self.config.exits:
            return self._exit_stages(pooling, early_exit or EarlyExit())
        stages = [Stage(GROUP_EMBEDDINGS, self._embed_stage)]
        stages += [Stage(f"layers.{i}", partial(self._layer_stage, i)) for i in range(self.config.num_layers)]
        if classify:
            stages.append(Stage(GROUP_HEAD, self._head_stage))
        stages.append(Stage(STAGE_POOL, partial(self._pool_stage, pooling)))
        return stages

    def _embed_stage(self, acts: Activations) -> None:
        acts.hidden = self.embed(acts.batch)

    def _layer_stage(self, i: int, acts: Activations) -> None:
        acts.hidden = self.run_layer(i, acts.hidden, acts.batch)

    def _head_stage(self, acts: Activations) -> None:
        acts.logits = self.classify(acts.hidden, acts.batch)

    def _pool_stage(self, pooling: Pooling, acts: Activations) -> None:
        acts.embeddings = self.pool(acts.hidden, acts.batch, pooling)

    # -- classification through early exits -----------------------------------------------------------

    def _exit_stages(self, pooling: Pooling, early_exit: EarlyExit) -> list[Stage]:
        run = ExitRun(early_exit.allowed, early_exit.on_leave)
        specs = {e.layer: e for e in self.config.exits}
        stages = [Stage(GROUP_EMBEDDINGS, partial(self._exit_embed_stage, run))]
        stages += [
            Stage(f"layers.{i}", partial(self._exit_layer_stage, i, specs.get(i), run, pooling))
            for i in range(self.config.num_layers)
        ]
        if self.head is not None:
            stages.append(Stage(GROUP_HEAD, partial(self._exit_head_stage, run, pooling)))
        stages.append(Stage(STAGE_POOL, partial(self._exit_results_stage, run, early_exit)))
        return stages

    def _exit_embed_stage(self, run: ExitRun, acts: Activations) -> None:
        run.start(acts.batch.num_seqs)
        acts.hidden = self.embed(acts.batch)

    def _exit_layer_stage(
        self, i: int, spec: ExitSpec | None, run: ExitRun, pooling: Pooling, acts: Activations
    ) -> None:
        """Layer ``i`` on the rows still running; then its exit, if it has one: the rows that leave are
        taken out of the packed batch (the final exit, after the last layer, takes every row)."""
        if run.done:
            return
        acts.hidden = self.run_layer(i, acts.hidden, acts.batch)
        final = i == self.config.num_layers - 1
        if spec is None or not (final or run.may_leave):
            return
        pooled = self.pool_states(acts.hidden, acts.batch, pooling.mode)  # (n, H)
        logits = self.exit_logits(i, pooled)  # (n, C)
        embeddings = _normalized(pooled, pooling)
        if final:
            run.finish(i, logits, embeddings)
            return
        stay = run.leave(i, triggers(spec, logits), logits, embeddings)
        if len(stay) < acts.batch.num_seqs:
            acts.batch, rows = acts.batch.select(stay)
            acts.hidden = acts.hidden.index_select(0, rows)  # (T', H)

    def _exit_head_stage(self, run: ExitRun, pooling: Pooling, acts: Activations) -> None:
        if not run.done:  # the native head is the final exit: full depth
            logits = self.classify(acts.hidden, acts.batch)
            run.finish(self.config.num_layers - 1, logits, self.pool(acts.hidden, acts.batch, pooling))

    def _exit_results_stage(self, run: ExitRun, early_exit: EarlyExit, acts: Activations) -> None:
        acts.logits, acts.embeddings, early_exit.layers = run.results()

    def forward(
        self, batch: PackedBatch, pooling: Pooling, early_exit: EarlyExit | None = None
    ) -> EncoderOutput:
        """Embeddings (and logits when the model has labels; exit layers when it has exits) of every
        sequence in ``batch``; ``early_exit`` as in ``stages``."""
        early_exit = early_exit or EarlyExit()
        classify = bool(self.config.labels)
        acts = run_stages(
            self.stages(classify=classify, pooling=pooling, early_exit=early_exit), Activations(batch)
        )
        assert acts.embeddings is not None
        return EncoderOutput(embeddings=acts.embeddings, logits=acts.logits, exit_layers=early_exit.layers)


def _normalized(pooled: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """``pooled`` L2-normalised when ``pooling.normalize`` says so."""
    return F.normalize(pooled, p=2.0, dim=-1) if pooling.normalize else pooled


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Bidirectional attention of each sequence over its own tokens: ``q, k, v`` are ``(T, nh, d)``,
    the result is ``(T, nh * d)``.

    On CUDA in half precision: one variable-length flash-attention call (no padding at all). Elsewhere:
    sequences sorted by length into up to ``MAX_BUCKETS`` buckets (one gather for all of them), each
    padded to its longest member and run as one masked SDPA call (float32 softmax inside); the mask
    makes it exact, and the padding only touches attention, never the linears. Measured on CPU this
    beats one SDPA call per sequence (per-call cost) and one padded call for all (quadratic padding
    waste); docs/benchmarks.md lists the options measured.
    """
    t, nh, d = q.shape
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):  # pragma: no cover - no GPU
        from torch.nn.attention.varlen import varlen_attn

        cu = batch.cu_seqlens
        return varlen_attn(q, k, v, cu, cu, batch.max_seqlen, batch.max_seqlen).reshape(t, nh * d)
    if batch.num_seqs == 1:
        qs, ks, vs = (x.transpose(0, 1)[None] for x in (q, k, v))  # (1, nh, T, d): 4-D takes the fused
        o = F.scaled_dot_product_attention(qs, ks, vs)[0]  # kernel; 3-D inputs fall back to a slower path
        return o.transpose(0, 1).reshape(t, nh * d)
    plan = batch.attention_plan()
    qp, kp, vp = (x.index_select(0, plan.gather) for x in (q, k, v))  # (S, nh, d) padded slots
    out = q.new_empty((t + 1, nh * d))  # packed rows and a spare row for every padding slot's output
    for b, mask in zip(plan.buckets, plan.additive_masks(q.dtype), strict=True):
        n, w = len(b.members), b.width
        qb, kb, vb = (x[b.offset : b.offset + n * w].view(n, w, nh, d).transpose(1, 2) for x in (qp, kp, vp))
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)  # (n, nh, W, d)
        # SDPA on CPU lays its output out as (n, W, nh, d), so this reshape is a view: one copy per
        # bucket, straight to packed rows (no cat of the buckets, then a gather).
        out.index_copy_(
            0, plan.scatter[b.offset : b.offset + n * w], o.transpose(1, 2).reshape(n * w, nh * d)
        )
    return out[:t]  # (T, H)
