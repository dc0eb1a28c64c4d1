"""Architecture descriptions of the BERT-family encoders ptmserve runs.

``EncoderConfig`` is everything needed to build an ``Encoder`` (shapes, numerics, labels); ``Pooling``
says how token states become one embedding per input. Both are frozen and round-trip through JSON
(``to_dict``/``from_dict``), so the store can keep them in a manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ptmserve.errors import InvalidCheckpoint

FAMILIES = ("bert", "roberta", "distilbert")  # the encoder variants ``encoder.Encoder`` implements
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
POOLING_MODES = ("mean", "cls")
CONFIDENCES = ("max_prob", "entropy")  # how an early exit measures how sure it is

# HF model_type -> our family. MiniLM checkpoints are plain BERT; XLM-R and CamemBERT are RoBERTa.
_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "distilbert": "distilbert",
}
# Architecture suffixes whose encoder we can run. The base model, pre-training/MLM checkpoints (their
# LM heads are ignored) and sequence classification (its head is ours too).
_BASE_SUFFIXES = ("Model", "ForMaskedLM", "ForPreTraining")
_CLASSIFIER_SUFFIX = "ForSequenceClassification"


@dataclass(frozen=True, slots=True)
class ExitSpec:
    """An early exit after layer ``layer`` (0-based): a linear classifier over the model's pooling of that
    layer's states, with parameters ``layers.{layer}.exit.weight`` ``(C, H)`` and ``.bias`` ``(C,)`` (in
    that layer's load group). A row leaves the batch there when its confidence passes ``threshold``:
    ``max_prob`` (the top softmax probability) >= threshold, or ``entropy`` (of the softmax, nats) <=
    threshold. A ``max_prob`` threshold above 1 (or an ``entropy`` threshold below 0) never triggers."""

    layer: int
    threshold: float
    confidence: str = "max_prob"

    def __post_init__(self) -> None:
        if self.confidence not in CONFIDENCES:
            raise InvalidCheckpoint(f"exit confidence {self.confidence!r} is not one of {CONFIDENCES}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise InvalidCheckpoint(f"exit layer must be an integer >= 0, got {self.layer!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "threshold": self.threshold, "confidence": self.confidence}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExitSpec:
        try:
            return cls(int(data["layer"]), float(data["threshold"]), str(data.get("confidence", "max_prob")))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidCheckpoint(f"invalid exit {data!r}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """Shapes and numerics of a BERT-family encoder.

    ``labels`` is empty when the checkpoint has no sequence-classification head; otherwise it holds
    the class names in logit order (from HF's ``id2label``).

    ``exits`` (early exit, ``ExitSpec``), in increasing layer order, classify into ``labels`` too. When the
    last one is after the last layer it is the final classifier and the model has no native ``head``;
    otherwise the native head (BERT's pooler and classifier) is the final exit.
    """

    family: str  # "bert" | "roberta" | "distilbert"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int  # 0 for DistilBERT (no token-type table)
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str = "gelu"
    labels: tuple[str, ...] = field(default_factory=tuple)
    exits: tuple[ExitSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        problems = []
        layers = [e.layer for e in self.exits]
        if layers and (layers != sorted(set(layers)) or layers[-1] >= self.num_layers):
            problems.append(f"exit layers {layers} must increase and be below num_layers {self.num_layers}")
        if self.exits and not self.labels:
            problems.append("a model with exits needs labels")
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {FAMILIES}")
        if self.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act {self.hidden_act!r} is not one of {ACTIVATIONS}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads > 0 and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.max_tokens <= 0:
            problems.append(
                f"max_position_embeddings {self.max_position_embeddings} leaves no positions after the "
                f"offset {self.position_offset}"
            )
        if problems:
            raise InvalidCheckpoint("invalid encoder config: " + "; ".join(problems))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "exits", tuple(self.exits))

    @property
    def has_native_head(self) -> bool:
        """Whether the final classifier is the native head (``head.*``), not an exit after the last layer."""
        return bool(self.labels) and not (self.exits and self.exits[-1].layer == self.num_layers - 1)

    @property
    def architecture(self) -> str:
        """The registry name of this config's family."""
        return self.family

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_offset(self) -> int:
        """First position id: RoBERTa/XLM-R count positions from ``pad_token_id + 1``, others from 0."""
        return self.pad_token_id + 1 if self.family == "roberta" else 0

    @property
    def max_tokens(self) -> int:
        """The longest input (special tokens included) the position table allows."""
        return self.max_position_embeddings - self.position_offset

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``from_dict(to_dict())`` gives an equal config."""
        out = asdict(self)
        out["labels"] = list(self.labels)
        out["exits"] = [e.to_dict() for e in self.exits]
        if not self.exits:
            del out["exits"]  # manifests of models without exits stay as they were
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        """Inverse of ``to_dict``. Raises ``InvalidCheckpoint`` on unknown or missing fields."""
        try:
            exits = tuple(ExitSpec.from_dict(e) for e in data.get("exits", ()))
            return cls(**{**data, "labels": tuple(data.get("labels", ())), "exits": exits})
        except TypeError as exc:
            raise InvalidCheckpoint(f"invalid encoder config dict: {exc}") from exc

    @classmethod
    def from_hf(cls, config_json: dict[str, Any]) -> EncoderConfig:
        """Build from a Hugging Face ``config.json`` (already parsed).

        Raises:
            InvalidCheckpoint: unsupported ``model_type``, architecture, position embedding type or
                activation, or a missing field.
        """
        model_type = config_json.get("model_type")
        family = _MODEL_TYPES.get(str(model_type))
        if family is None:
            raise InvalidCheckpoint(
                f"unsupported model_type {model_type!r}; supported: {sorted(_MODEL_TYPES)}"
            )
        arch = _architecture(config_json)
        has_head = arch.endswith(_CLASSIFIER_SUFFIX)
        if not has_head and not arch.endswith(_BASE_SUFFIXES):
            raise InvalidCheckpoint(
                f"unsupported architecture {arch!r}; supported: the base model, ...ForMaskedLM, "
                f"...ForPreTraining and ...{_CLASSIFIER_SUFFIX}"
            )
        pos_type = config_json.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise InvalidCheckpoint(f"unsupported position_embedding_type {pos_type!r} (only 'absolute')")
        labels = _labels(config_json) if has_head else ()
        try:
            if family == "distilbert":
                return cls(
                    family=family,
                    vocab_size=int(config_json["vocab_size"]),
                    hidden_size=int(config_json["dim"]),
                    num_layers=int(config_json["n_layers"]),
                    num_heads=int(config_json["n_heads"]),
                    intermediate_size=int(config_json["hidden_dim"]),
                    max_position_embeddings=int(config_json["max_position_embeddings"]),
                    type_vocab_size=0,
                    layer_norm_eps=1e-12,  # hard-coded in HF's DistilBERT
                    pad_token_id=_pad_id(config_json, default=0),
                    hidden_act=str(config_json.get("activation", "gelu")),
                    labels=labels,
                )
            return cls(
                family=family,
                vocab_size=int(config_json["vocab_size"]),
                hidden_size=int(config_json["hidden_size"]),
                num_layers=int(config_json["num_hidden_layers"]),
                num_heads=int(config_json["num_attention_heads"]),
                intermediate_size=int(config_json["intermediate_size"]),
                max_position_embeddings=int(config_json["max_position_embeddings"]),
                type_vocab_size=int(config_json.get("type_vocab_size", 2)),
                layer_norm_eps=float(config_json.get("layer_norm_eps", 1e-12)),
                pad_token_id=_pad_id(config_json, default=1 if family == "roberta" else 0),
                hidden_act=str(config_json.get("hidden_act", "gelu")),
                labels=labels,
            )
        except KeyError as exc:
            raise InvalidCheckpoint(f"config.json of a {model_type} model lacks {exc.args[0]!r}") from exc


def _pad_id(config_json: dict[str, Any], default: int) -> int:
    value = config_json.get("pad_token_id")
    return default if value is None else int(value)


def _architecture(config_json: dict[str, Any]) -> str:
    archs = config_json.get("architectures") or []
    if len(archs) > 1:
        raise InvalidCheckpoint(f"config.json lists several architectures {archs}; expected one")
    # Without "architectures" HF builds the base model.
    return str(archs[0]) if archs else "Model"


def _labels(config_json: dict[str, Any]) -> tuple[str, ...]:
    id2label = config_json.get("id2label")
    if not id2label:
        num = int(config_json.get("num_labels", 2))
        return tuple(f"LABEL_{i}" for i in range(num))
    ids = sorted(int(k) for k in id2label)
    if ids != list(range(len(ids))):
        raise InvalidCheckpoint(f"id2label keys must be 0..{len(ids) - 1}, got {ids}")
    return tuple(str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in ids)


@dataclass(frozen=True, slots=True)
class Pooling:
    """How token states become one vector per input: ``mode`` "mean" (over real tokens) or "cls"
    (the first token), then L2-normalised when ``normalize``."""

    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise InvalidCheckpoint(f"pooling mode {self.mode!r} is not one of {POOLING_MODES}")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "normalize": self.normalize}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pooling:
        return cls(mode=str(data.get("mode", "mean")), normalize=bool(data.get("normalize", False)))
