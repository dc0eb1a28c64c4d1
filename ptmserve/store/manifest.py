"""Manifest records: what one stored model is made of, and their JSON form on disk.

A manifest names the model's architecture config, pooling, model dtype, weight format (float, int8 or
int4 linears, ``models.quant``), tokenizer blob and every tensor with its layer group and exact location
(segment file, offset, length, sha256).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ptmserve import errors
from ptmserve.models.quant import WEIGHT_FORMATS  # how linear layers are stored: fp, int8, int4

FORMAT_VERSION = 1

# Model names become file names: no separators, no leading dot, bounded length.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")

# The dtypes a model as a whole may be stored in (individual tensors may be any of _TORCH_DTYPES).
MODEL_DTYPES = ("float32", "bfloat16", "float16")

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name.

    Raises:
        errors.InvalidInput: not 1-128 characters of ``[A-Za-z0-9._-]`` starting with a letter or
            digit (so no path separators, ``..`` or hidden files).
    """
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise errors.InvalidInput(
            f"invalid model name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def is_segment_id(text: str) -> bool:
    """True when ``text`` is a segment id (64 lowercase hex digits)."""
    return _HEX64_RE.fullmatch(text) is not None


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest spelling of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``).

    Raises:
        errors.InvalidInput: the dtype cannot be stored.
    """
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise errors.InvalidInput(f"tensor dtype {dtype} cannot be stored") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a manifest dtype name.

    Raises:
        errors.InvalidInput: unknown name.
    """
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise errors.InvalidInput(f"unknown dtype {name!r}; known: {sorted(_TORCH_DTYPES)}") from None


def tensor_group(tensor_name: str) -> str:
    """The layer group a tensor belongs to: ``layers.{i}`` for layer tensors, else its first name part.

    Raises:
        errors.InvalidInput: a ``layers.*`` name without a layer index, or an empty name part.
    """
    parts = tensor_name.split(".")
    if any(not p for p in parts):
        raise errors.InvalidInput(f"invalid tensor name {tensor_name!r}")
    if parts[0] == "layers":
        if len(parts) < 3 or not parts[1].isdigit():
            raise errors.InvalidInput(f"tensor {tensor_name!r} has no layer index (layers.<i>.<name>)")
        return f"layers.{int(parts[1])}"
    return parts[0]


def group_order_key(group: str) -> tuple[int, int, str]:
    """Sort key putting groups in execution order: embeddings, layers.0..n-1, others, head."""
    if group == "embeddings":
        return (0, 0, "")
    if group.startswith("layers."):
        return (1, int(group.split(".")[1]), "")
    if group == "head":
        return (3, 0, "")
    return (2, 0, group)


@dataclass(frozen=True, slots=True)
class BlobRef:
    """Where a byte string is stored: ``nbytes`` at ``offset`` of segment ``segment``."""

    segment: str  # segment id: the file is segments/<segment>.seg
    offset: int
    nbytes: int
    sha256: str  # hex digest of the stored bytes

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One stored tensor: its identity (name, dtype, shape, sha256) and location in a segment."""

    name: str  # our parameter name, e.g. "layers.3.attn.qkv.weight"
    dtype: str  # manifest dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    sha256: str  # hex digest of the raw little-endian bytes
    segment: str  # segment id: the file is segments/<segment>.seg
    offset: int  # byte offset in the segment (aligned)
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def group(self) -> str:
        return tensor_group(self.name)


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """Everything stored about one model. Immutable; a re-import produces a new manifest."""

    name: str
    config: dict[str, Any]  # the family's config, ``config.to_dict()``
    pooling: dict[str, Any]
    tokenizer_json: bytes  # the tokenizer.json file, verified against ``tokenizer.sha256``
    tokenizer: BlobRef
    dtype: str  # one of MODEL_DTYPES
    groups: dict[str, tuple[TensorEntry, ...]]  # in execution order
    max_length: int | None = None  # truncation length in tokens (specials included); None: the config's
    architecture: str = ""  # the registry name of its family (``models.registry``)
    # generation settings of a decoder (chat template, special tokens ...); empty for encoders
    generation: dict[str, Any] = field(default_factory=dict)
    # how the model was calibrated (early exit: thresholds, matrices, validation metrics); empty for most
    calibration: dict[str, Any] = field(default_factory=dict)
    weights: str = "fp"  # the linear layers' storage format: "fp" (in ``dtype``), "int8" or "int4"

    def group_names(self) -> list[str]:
        """The layer groups in execution order (``embeddings``, ``layers.0`` ... , ``head``)."""
        return list(self.groups)

    def entries(self, group: str) -> tuple[TensorEntry, ...]:
        """The tensors of ``group``.

        Raises:
            errors.InvalidInput: the model has no such group.
        """
        try:
            return self.groups[group]
        except KeyError:
            raise errors.InvalidInput(
                f"model {self.name!r} has no layer group {group!r}; groups: {self.group_names()}"
            ) from None

    @property
    def tensors(self) -> tuple[TensorEntry, ...]:
        """All tensor entries, group by group."""
        return tuple(e for entries in self.groups.values() for e in entries)

    @property
    def total_bytes(self) -> int:
        """Bytes of all tensors (logical size, counting shared tensors fully)."""
        return sum(e.nbytes for entries in self.groups.values() for e in entries)

    def segment_ids(self) -> list[str]:
        """Every segment this model reads, tokenizer included, each once, in first-use order."""
        seen = dict.fromkeys(e.segment for e in self.tensors)
        seen.setdefault(self.tokenizer.segment, None)
        return list(seen)


def manifest_to_json(m: ModelManifest | ManifestDoc) -> dict[str, Any]:
    """The JSON document stored for ``m`` (tokenizer bytes are stored separately, by reference)."""
    t = m.tokenizer
    doc: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "name": m.name,
        "architecture": m.architecture,
        "dtype": m.dtype,
        "config": m.config,
        "pooling": m.pooling,
        "max_length": m.max_length,
        "generation": m.generation,
        "tokenizer": {"segment": t.segment, "offset": t.offset, "nbytes": t.nbytes, "sha256": t.sha256},
        "groups": [
            {
                "name": g,
                "tensors": [
                    {
                        "name": e.name,
                        "dtype": e.dtype,
                        "shape": list(e.shape),
                        "sha256": e.sha256,
                        "segment": e.segment,
                        "offset": e.offset,
                        "nbytes": e.nbytes,
                    }
                    for e in entries
                ],
            }
            for g, entries in m.groups.items()
        ],
    }
    if m.calibration:  # absent for models without one: their files stay as they were
        doc["calibration"] = m.calibration
    if m.weights != "fp":  # absent for float models: their files stay as they were
        doc["weights"] = m.weights
    return doc


@dataclass(frozen=True, slots=True)
class ManifestDoc:
    """A parsed manifest file without the tokenizer bytes (enough for indexing, gc and usage)."""

    name: str
    config: dict[str, Any]
    pooling: dict[str, Any]
    tokenizer: BlobRef
    dtype: str
    groups: dict[str, tuple[TensorEntry, ...]]
    max_length: int | None = None
    architecture: str = ""
    generation: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    weights: str = "fp"

    @property
    def tensors(self) -> tuple[TensorEntry, ...]:
        return tuple(e for entries in self.groups.values() for e in entries)

    def with_tokenizer(self, tokenizer_json: bytes) -> ModelManifest:
        return ModelManifest(
            self.name,
            self.config,
            self.pooling,
            tokenizer_json,
            self.tokenizer,
            self.dtype,
            self.groups,
            self.max_length,
            self.architecture,
            self.generation,
            self.calibration,
            self.weights,
        )


def manifest_from_json(doc: Any, where: str) -> ManifestDoc:
    """Parse and check a manifest document.

    Args:
        doc: the decoded JSON.
        where: which manifest, for error messages (``"of model 'x'"``); never a server path.

    Raises:
        errors.CorruptData: the document is not a well-formed manifest of a known format.
    """
    try:
        if doc["format"] != FORMAT_VERSION:
            raise ValueError(f"unsupported format {doc['format']!r}")
        name = validate_name(doc["name"])
        groups: dict[str, tuple[TensorEntry, ...]] = {}
        for g in doc["groups"]:
            entries = tuple(_entry(t) for t in g["tensors"])
            if any(e.group != g["name"] for e in entries):
                raise ValueError(f"group {g['name']!r} holds a tensor of another group")
            groups[str(g["name"])] = entries
        t = doc["tokenizer"]
        tokenizer = BlobRef(_seg(t["segment"]), int(t["offset"]), int(t["nbytes"]), str(t["sha256"]))
        if doc["dtype"] not in MODEL_DTYPES or not isinstance(doc["config"], dict):
            raise ValueError("bad dtype or config")
        max_length = doc.get("max_length")
        if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
            raise ValueError(f"bad max_length {max_length!r}")
        # Manifests written before the registry have no architecture: theirs is the config's family.
        architecture = doc.get("architecture") or doc["config"].get("family")
        if not isinstance(architecture, str) or not architecture:
            raise ValueError(f"bad architecture {architecture!r}")
        generation = doc.get("generation") or {}
        if not isinstance(generation, dict):
            raise ValueError(f"bad generation settings {generation!r}")
        calibration = doc.get("calibration") or {}  # manifests from before calibration have none
        if not isinstance(calibration, dict):
            raise ValueError(f"bad calibration {type(calibration).__name__}")
        weights = doc.get("weights", "fp")  # manifests from before quantization are float
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"bad weight format {weights!r}")
        return ManifestDoc(
            name,
            doc["config"],
            dict(doc["pooling"]),
            tokenizer,
            doc["dtype"],
            groups,
            max_length,
            architecture,
            dict(generation),
            dict(calibration),
            weights,
        )
    except (KeyError, TypeError, ValueError, errors.InvalidInput) as exc:
        raise errors.CorruptData(f"the manifest {where} is malformed: {exc}") from None


def _seg(text: Any) -> str:
    if not isinstance(text, str) or not is_segment_id(text):
        raise ValueError(f"bad segment id {text!r}")
    return text


def _entry(t: dict[str, Any]) -> TensorEntry:
    e = TensorEntry(
        name=str(t["name"]),
        dtype=str(t["dtype"]),
        shape=tuple(int(d) for d in t["shape"]),
        sha256=str(t["sha256"]),
        segment=_seg(t["segment"]),
        offset=int(t["offset"]),
        nbytes=int(t["nbytes"]),
    )
    numel = 1
    for d in e.shape:
        numel *= d
    itemsize = torch_dtype(e.dtype).itemsize
    if e.offset < 0 or e.nbytes != numel * itemsize or e.offset % itemsize:
        raise ValueError(f"tensor {e.name!r}: offset/nbytes do not match dtype {e.dtype} shape {e.shape}")
    return e
