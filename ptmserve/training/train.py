"""``train-exits``: early exits for a stored encoder, calibrated, placed and stored as a new model.

The steps (docs/early-exit.md): read and split the data; compute every candidate layer's pooled
features once on the frozen backbone; fit a linear head per candidate layer (and the final classifier
when the base model has no head); measure the inference-time matrix; for each exit set, calibrate its
thresholds on the validation part under the tolerance and take its batching pattern; choose the set
with the lowest expected batch time; store the new model. Everything is checked before the repository
is written, and ``Repository.add_model`` publishes the model atomically: an error leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptmserve.errors import InvalidInput
from ptmserve.models import registry
from ptmserve.models.config import CONFIDENCES, EncoderConfig, ExitSpec
from ptmserve.store.manifest import ModelManifest, validate_name
from ptmserve.store.repository import Repository
from ptmserve.training import data as data_mod
from ptmserve.training import heads, placement, thresholds, timing
from ptmserve.training.features import Backbone, Features, compute_features, load_backbone

logger = logging.getLogger(__name__)

ALWAYS = 0.0  # the final exit's max_prob threshold: every row that reaches it leaves


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """What ``ptmserve train-exits`` was asked to do."""

    base: str
    name: str
    data: Path
    text_column: str
    label_column: str
    tolerance: float = 0.01
    exits: str = "auto"  # "auto" or "L1,L2,..." (0-based layers)
    val_fraction: float = 0.2
    batch_size: int = 32
    seed: int = 0
    confidence: str = "max_prob"
    device: str = "cpu"
    show_progress: bool = True


@dataclass(frozen=True, slots=True)
class ExitMetrics:
    """One trained head on the validation part."""

    layer: int
    accuracy: float
    agreement: float  # with the final classifier
    weight_decay: float | None  # None: the base model's own head


@dataclass(slots=True)
class TrainResult:
    """What was trained and stored."""

    manifest: ModelManifest
    config: EncoderConfig
    candidates: list[ExitMetrics]
    final: ExitMetrics
    cascade: thresholds.Cascade  # the chosen exits' cascade on the validation part
    chosen: tuple[int, ...]
    times: placement.TimeMatrix
    patterns: dict[str, list[float]]  # the batching-pattern matrix rows shown: label -> running shares
    speedups: dict[int, float]  # batch size -> expected speedup over full depth
    placement: placement.Placement
    calibration: dict[str, Any] = field(default_factory=dict)


def parse_exits(spec: str, num_layers: int) -> list[int]:
    """Candidate exit layers: every layer but the last for ``auto``, else the listed ones.

    Raises:
        InvalidInput: a malformed list, or a layer outside ``0 .. num_layers - 2`` (the final classifier
            is after the last layer already).
    """
    last = num_layers - 1
    if spec.strip() == "auto":
        layers = list(range(last))
    else:
        try:
            layers = sorted({int(p) for p in spec.split(",") if p.strip()})
        except ValueError:
            raise InvalidInput(f"--exits must be 'auto' or layers like '1,3', got {spec!r}") from None
        bad = [layer for layer in layers if not 0 <= layer < last]
        if bad:
            raise InvalidInput(
                f"--exits layers {bad} are out of range: exits go after layers 0..{last - 1} "
                f"(0-based; the final classifier is after layer {last})"
            )
    if not layers:
        raise InvalidInput(f"no candidate exit layers (the model has {num_layers} layer(s))")
    return layers


def _check(settings: TrainSettings, repo: Repository) -> None:
    validate_name(settings.name)
    if settings.name == settings.base:
        raise InvalidInput(f"--name must differ from the base model {settings.base!r}")
    if not 0.0 <= settings.tolerance < 1.0:
        raise InvalidInput(f"--tolerance must be in [0, 1), got {settings.tolerance}")
    if settings.batch_size < 1:
        raise InvalidInput(f"--batch-size must be at least 1, got {settings.batch_size}")
    if settings.confidence not in CONFIDENCES:
        raise InvalidInput(f"--confidence must be one of {CONFIDENCES}, got {settings.confidence!r}")
    repo.manifest(settings.base)  # ModelNotFound early, before the data is read


def train_exits(repo: Repository, settings: TrainSettings) -> TrainResult:
    """Train, calibrate and place exits on ``settings.base`` and store them as ``settings.name``.

    Raises:
        InvalidInput: bad settings or data (the message names the row and column), or a base model
            that is not an encoder.
        ModelNotFound: no such base model.
    """
    _check(settings, repo)
    backbone = load_backbone(repo, settings.base, settings.device)
    cfg = backbone.config
    last = cfg.num_layers - 1
    candidates = parse_exits(settings.exits, cfg.num_layers)
    data = data_mod.read_csv(
        settings.data, settings.text_column, settings.label_column, labels=cfg.labels if cfg.labels else ()
    )
    split = data_mod.stratified_split(data, settings.val_fraction, settings.seed)
    logger.info(
        "%s: %d rows, %d training, %d validation", data.source, len(data), len(split.train), len(split.val)
    )
    feats = compute_features(
        backbone,
        data.texts,
        candidates if backbone.has_head else [*candidates, last],
        batch_size=settings.batch_size,
        native_head=backbone.has_head,
        show_progress=settings.show_progress,
    )
    trained = _fit_heads(feats, data, split, candidates, backbone, settings)
    times = timing.measure(
        backbone,
        [feats.token_ids[i] for i in split.val],
        timing.batch_sizes_up_to(settings.batch_size),
        num_classes=len(data.labels),
        seed=settings.seed,
        show_progress=settings.show_progress,
    )
    calib = _Calibrator(candidates, trained, data.y[split.val], times, settings)
    placed = placement.choose(candidates, calib.pattern, times, settings.batch_size)
    cascade = calib.cascade(placed.exits)
    firing = tuple(
        layer for layer, t in zip(placed.exits, cascade.thresholds, strict=True) if t != thresholds.NEVER
    )
    if firing != placed.exits:  # an exit that never fires is only a cost (placement avoids them anyway)
        placed.exits, placed.seconds = firing, placed.evaluated.get(firing, placed.seconds)
        cascade = calib.cascade(firing)
    config = _exit_config(cfg, data.labels, placed.exits, cascade, settings.confidence)
    tensors = _tensors(repo, backbone, trained.exit_heads, placed.exits, trained.final_head)
    patterns = _pattern_rows(calib, candidates, placed.exits)
    speedups = {
        b: placement.expected_seconds(times, b, calib.pattern(()), ())
        / placement.expected_seconds(times, b, calib.pattern(placed.exits), placed.exits)
        for b in times.batch_sizes
    }
    result = TrainResult(
        manifest=backbone.manifest,
        config=config,
        candidates=trained.metrics,
        final=trained.final,
        cascade=cascade,
        chosen=placed.exits,
        times=times,
        patterns=patterns,
        speedups=speedups,
        placement=placed,
    )
    result.calibration = _calibration(result, calib, settings, data, split)
    result.manifest = _store(repo, settings, backbone, config, tensors, result.calibration)
    return result


@dataclass(slots=True)
class _Trained:
    """The fitted heads and what they say on the validation part."""

    exit_heads: dict[int, heads.LinearHead]
    final_head: heads.LinearHead | None  # None: the base model's own head is the final classifier
    scores: np.ndarray  # (E, N_val) each candidate exit's score, higher is surer
    preds: np.ndarray  # (E, N_val) each candidate exit's predicted class
    final_pred: np.ndarray  # (N_val,) the final classifier's predicted class
    metrics: list[ExitMetrics]
    final: ExitMetrics


def _fit_heads(
    feats: Features,
    data: data_mod.LabelledData,
    split: data_mod.Split,
    candidates: Sequence[int],
    backbone: Backbone,
    settings: TrainSettings,
) -> _Trained:
    """A head per candidate layer (and the final one when the base has none), fitted on the training
    part, and their outputs on the validation part."""
    last = backbone.config.num_layers - 1
    num_classes, seed = len(data.labels), settings.seed
    y_tr, y_val = data.y[split.train], data.y[split.val]
    fitted = {
        layer: heads.fit(feats.layers[layer][split.train], y_tr, num_classes, seed=seed)
        for layer in candidates
    }
    final_head = None
    if feats.native_logits is not None:
        final_val_logits = feats.native_logits[split.val]
    else:
        final_head = heads.fit(feats.layers[last][split.train], y_tr, num_classes, seed=seed)
        final_val_logits = final_head.logits(feats.layers[last][split.val])
    final_pred = final_val_logits.argmax(axis=1)
    val_logits = [fitted[layer].logits(feats.layers[layer][split.val]) for layer in candidates]
    preds = np.stack([logits.argmax(axis=1) for logits in val_logits])  # (E, N_val)
    conf = np.stack([thresholds.confidence(logits, settings.confidence) for logits in val_logits])
    metrics = [
        ExitMetrics(
            layer,
            float(np.mean(preds[j] == y_val)),
            float(np.mean(preds[j] == final_pred)),
            fitted[layer].weight_decay,
        )
        for j, layer in enumerate(candidates)
    ]
    final_wd = None if final_head is None else final_head.weight_decay
    final = ExitMetrics(last, float(np.mean(final_pred == y_val)), 1.0, final_wd)
    return _Trained(
        fitted, final_head, thresholds.score(conf, settings.confidence), preds, final_pred, metrics, final
    )


class _Calibrator:
    """Thresholds and batching pattern of each exit set (cached: placement asks for a set many times)."""

    def __init__(
        self,
        candidates: Sequence[int],
        trained: _Trained,
        y: np.ndarray,
        times: placement.TimeMatrix,
        settings: TrainSettings,
    ) -> None:
        self.candidates = list(candidates)
        self.scores, self.preds, self.final_pred, self.y = (
            trained.scores,
            trained.preds,
            trained.final_pred,
            y,
        )
        self.times, self.settings = times, settings
        self.num_layers = times.num_layers
        self._cache: dict[tuple[int, ...], thresholds.Cascade] = {}

    def row_costs(self, exits: Sequence[int]) -> np.ndarray:
        """Seconds per row of a row leaving at each of ``exits`` and at the final classifier, at the
        configured batch size (the threshold search minimises their mean)."""
        b = float(self.settings.batch_size)
        per_layer = np.array(
            [self.times.seconds(self.times.layers[:, i], b) / b for i in range(self.num_layers)]
        )
        head = self.times.seconds(self.times.exit_head, b) / b
        final = self.times.seconds(self.times.final_head, b) / b
        upto = np.cumsum(per_layer)
        costs = [upto[layer] + (j + 1) * head for j, layer in enumerate(exits)]
        return np.array([*costs, upto[-1] + len(exits) * head + final])

    def cascade(self, exits: tuple[int, ...]) -> thresholds.Cascade:
        if exits not in self._cache:
            idx = [self.candidates.index(layer) for layer in exits]
            self._cache[exits] = thresholds.search(
                self.scores[idx],
                self.preds[idx],
                self.final_pred,
                self.y,
                self.row_costs(exits),
                self.settings.tolerance,
            )
        return self._cache[exits]

    def pattern(self, exits: tuple[int, ...]) -> np.ndarray:
        return placement.running_shares(exits, self.cascade(exits).exit_at, self.num_layers)


def _exit_config(
    cfg: EncoderConfig,
    labels: Sequence[str],
    chosen: Sequence[int],
    cascade: thresholds.Cascade,
    confidence: str,
) -> EncoderConfig:
    exits = [
        ExitSpec(layer, thresholds.stored_threshold(t, confidence), confidence)
        for layer, t in zip(chosen, cascade.thresholds, strict=True)
    ]
    if not cfg.has_native_head:
        exits.append(ExitSpec(cfg.num_layers - 1, ALWAYS, "max_prob"))
    config = dataclasses.replace(cfg, labels=tuple(labels), exits=tuple(exits))
    assert EncoderConfig.from_dict(config.to_dict()) == config
    return config


def _tensors(
    repo: Repository,
    backbone: Backbone,
    exit_heads: dict[int, heads.LinearHead],
    chosen: Sequence[int],
    final_head: heads.LinearHead | None,
) -> dict[str, torch.Tensor]:
    """The base model's stored tensors unchanged (so they dedup), plus the new heads in its dtype."""
    manifest = backbone.manifest
    tensors: dict[str, torch.Tensor] = {}
    for group in manifest.group_names():
        tensors.update(repo.read_group(backbone.name, group))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[manifest.dtype]
    for layer in chosen:
        tensors.update(exit_heads[layer].tensors(f"layers.{layer}.exit", dtype))
    if final_head is not None:
        tensors.update(final_head.tensors(f"layers.{backbone.config.num_layers - 1}.exit", dtype))
    return tensors


def _pattern_rows(
    calib: _Calibrator, candidates: Sequence[int], chosen: tuple[int, ...]
) -> dict[str, list[float]]:
    rows = {"full depth": calib.pattern(())}
    for layer in candidates:
        rows[f"exit {layer} alone"] = calib.pattern((layer,))
    rows[f"chosen {list(chosen)}"] = calib.pattern(chosen)
    return {k: [round(float(v), 4) for v in r] for k, r in rows.items()}


def _threshold_json(t: float, confidence: str) -> float | None:
    return None if np.isinf(t) else round(thresholds.stored_threshold(t, confidence), 6)


def _calibration(
    result: TrainResult,
    calib: _Calibrator,
    settings: TrainSettings,
    data: data_mod.LabelledData,
    split: data_mod.Split,
) -> dict[str, Any]:
    """What is stored with the model: settings, validation metrics, matrices and the grid results."""
    placed = result.placement
    grid = []
    for exits, seconds in sorted(placed.evaluated.items(), key=lambda kv: (len(kv[0]), kv[0])):
        c = calib.cascade(exits)
        grid.append(
            {
                "exits": list(exits),
                "thresholds": [_threshold_json(t, settings.confidence) for t in c.thresholds],
                "val_accuracy": round(c.accuracy, 6),
                "agreement": round(c.agreement, 6),
                "exit_shares": [round(float(s), 6) for s in c.shares()],
                "running_shares": [round(float(s), 6) for s in calib.pattern(exits)],
                "expected_ms": round(seconds * 1e3, 4),
            }
        )
    cascade = result.cascade
    return {
        "method": "pame",
        "settings": {
            "base": settings.base,
            "data": data.source,
            "text_column": settings.text_column,
            "label_column": settings.label_column,
            "tolerance": settings.tolerance,
            "exits": settings.exits,
            "val_fraction": settings.val_fraction,
            "batch_size": settings.batch_size,
            "seed": settings.seed,
            "confidence": settings.confidence,
        },
        "rows": {"train": int(len(split.train)), "val": int(len(split.val))},
        "heads": [dataclasses.asdict(m) for m in result.candidates],
        "final": dataclasses.asdict(result.final),
        "chosen": {
            "exits": list(result.chosen),
            "thresholds": [_threshold_json(t, settings.confidence) for t in cascade.thresholds],
            "val_accuracy": round(cascade.accuracy, 6),
            "final_val_accuracy": round(cascade.final_accuracy, 6),
            "agreement": round(cascade.agreement, 6),
            "exit_shares": [round(float(s), 6) for s in cascade.shares()],
        },
        "placement": {
            "method": placed.method,
            "batch_size": settings.batch_size,
            "expected_ms": round(placed.seconds * 1e3, 4),
            "full_depth_ms": round(placed.full_seconds * 1e3, 4),
            "speedup": {str(b): round(s, 4) for b, s in result.speedups.items()},
        },
        "batching_pattern": {"layers": list(range(calib.num_layers)), "rows": result.patterns},
        "inference_time": result.times.to_dict(),
        "grid": grid,
    }


def _store(
    repo: Repository,
    settings: TrainSettings,
    backbone: Backbone,
    config: EncoderConfig,
    tensors: dict[str, torch.Tensor],
    calibration: dict[str, Any],
) -> ModelManifest:
    manifest = backbone.manifest
    family = registry.get(manifest.architecture)
    _check_tensors(config, tensors)
    return repo.add_model(
        settings.name,
        config=config.to_dict(),
        pooling=dict(manifest.pooling),
        tokenizer_json=manifest.tokenizer_json,
        dtype=manifest.dtype,
        tensors=tensors,
        max_length=manifest.max_length,
        architecture=manifest.architecture,
        group_order=family.group_names(config),
        calibration=calibration,
    )


def _check_tensors(config: EncoderConfig, tensors: dict[str, torch.Tensor]) -> None:
    """The new model's tensors against its module built on the meta device (names and shapes)."""
    from ptmserve.models.encoder import Encoder

    with torch.device("meta"):
        module = Encoder(config)
    registry.check_tensors(module, tensors)
