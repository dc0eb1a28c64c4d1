"""Import a Hugging Face checkpoint folder or a GGUF file into the repository."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ptmserve import errors
from ptmserve.store.manifest import (
    MODEL_DTYPES,
    WEIGHT_FORMATS,
    ModelManifest,
    dtype_name,
    torch_dtype,
    validate_name,
)
from ptmserve.store.repository import Repository
from ptmserve.store.writer import ProgressFn

if TYPE_CHECKING:
    from ptmserve.models.hf import Checkpoint

logger = logging.getLogger(__name__)

IMPORT_DTYPES = ("auto", *MODEL_DTYPES)
_LOG_EVERY = 256 << 20  # log progress every this many new bytes


def import_checkpoint(
    repo: Repository,
    src: Path,
    name: str,
    dtype: str = "auto",
    sampling: Mapping[str, float] | None = None,
    weights: str = "fp",
) -> ModelManifest:
    """Read the checkpoint ``src`` and store it as model ``name`` (replacing one of that name).

    Args:
        repo: the target repository.
        src: a Hugging Face checkpoint folder (config.json, weights, tokenizer.json), or a GGUF file
            (``models.gguf``: its weights are dequantized to float32).
        name: the model name.
        dtype: "auto" keeps the checkpoint's floating dtype (float32 for a GGUF file); "float32",
            "bfloat16" or "float16" casts every floating tensor (integer tensors are kept as they are).
        sampling: a decoder's default ``temperature``, ``top_p``, ``top_k`` (requests that leave one out
            take it), over those its checkpoint gives.
        weights: "fp" stores the linears as float; "int8" stores them int8 with one scale per output
            channel, "int4" as int4 with a scale and zero per 32 inputs (int8 where the input size is not
            a multiple of 32); the word embedding is int8 in both (``models.quant``). A GGUF
            file's Q8_0 weights become int8, and its Q4_0/Q4_1 weights int4, without a float copy; any
            other combination is dequantized, then quantized.

    Returns:
        The stored manifest.

    Raises:
        errors.InvalidInput: bad name or dtype.
        errors.InvalidCheckpoint: ``src`` cannot be read as a supported checkpoint.
    """
    from ptmserve.models import registry  # heavy imports, only needed here

    validate_name(name)
    if dtype not in IMPORT_DTYPES:
        raise errors.InvalidInput(f"import dtype must be one of {IMPORT_DTYPES}, got {dtype!r}")
    if weights not in WEIGHT_FORMATS:
        raise errors.InvalidInput(f"import weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    started = time.monotonic()
    ckpt = read_source(Path(src), weights)
    tensors = dict(ckpt.tensors)
    target = checkpoint_dtype(tensors) if dtype == "auto" else dtype
    if weights != "fp":
        tensors = quantize_tensors(ckpt.architecture, ckpt.config, tensors, weights, torch_dtype(target))
    if dtype != "auto":
        tensors = cast_floating(tensors, torch_dtype(target))
    manifest = repo.add_model(
        name,
        config=ckpt.config.to_dict(),
        pooling=_as_dict(ckpt.pooling),
        tokenizer_json=bytes(ckpt.tokenizer_json),
        dtype=target,
        tensors=tensors,
        max_length=ckpt.max_length,
        progress=_progress_logger(name),
        architecture=ckpt.architecture,
        group_order=registry.get(ckpt.architecture).group_names(ckpt.config),
        generation={**ckpt.generation, "sampling": {**ckpt.generation.get("sampling", {}), **sampling}}
        if sampling
        else ckpt.generation,
        weights=weights,
    )
    logger.info(
        "imported %s from %s as %s %s: %d tensors, %.1f MB in %.2f s",
        name,
        src,
        target,
        weights,
        len(tensors),
        manifest.total_bytes / 1e6,
        time.monotonic() - started,
    )
    return manifest


def read_source(src: Path, weights: str = "fp") -> Checkpoint:
    """The checkpoint in ``src``: a file (or a missing ``*.gguf``) is read as GGUF (its quantized tensors
    that match ``weights`` kept quantized), a folder as a Hugging Face checkpoint.

    Raises:
        errors.InvalidCheckpoint: ``src`` cannot be read as a supported checkpoint.
    """
    if src.is_file() or (src.suffix.lower() == ".gguf" and not src.is_dir()):
        from ptmserve.models.gguf import read_gguf

        return read_gguf(src, weights)
    from ptmserve.models.hf import read_checkpoint

    return read_checkpoint(src)


def checkpoint_dtype(tensors: Mapping[str, torch.Tensor]) -> str:
    """The model dtype of a checkpoint: the floating dtype holding the most bytes.

    Raises:
        errors.InvalidCheckpoint: no floating tensor, or a floating dtype ptmserve does not serve.
    """
    totals: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            totals[t.dtype] = totals.get(t.dtype, 0) + t.numel() * t.element_size()
    if not totals:
        raise errors.InvalidCheckpoint("the checkpoint has no floating-point tensors")
    name = dtype_name(max(totals, key=lambda d: totals[d]))
    if name not in MODEL_DTYPES:
        raise errors.InvalidCheckpoint(f"checkpoint dtype {name} is not one of {MODEL_DTYPES}")
    return name


def quantize_tensors(
    architecture: str, config: Any, tensors: Mapping[str, torch.Tensor], weights: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """``tensors`` of a model of ``architecture`` and ``config`` with its linears (and its word embedding)
    in format ``weights``, their floating parts in ``dtype``; tensors already quantized (a GGUF reader's)
    are kept.

    Raises:
        errors.InvalidCheckpoint: the result does not match the quantized module's names and shapes.
    """
    from ptmserve.models import quant, registry

    family = registry.get(architecture, weights)
    with torch.device("meta"):
        skeleton = family.module(config)
    out = quant.to_format(skeleton, tensors, dtype)
    registry.check_tensors(skeleton, out)
    return out


def cast_floating(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast every floating tensor to ``dtype``; others are returned unchanged."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _as_dict(pooling: Any) -> dict[str, Any]:
    if isinstance(pooling, Mapping):
        return dict(pooling)
    if hasattr(pooling, "to_dict"):
        return dict(pooling.to_dict())
    if dataclasses.is_dataclass(pooling) and not isinstance(pooling, type):
        return dataclasses.asdict(pooling)
    raise errors.InvalidCheckpoint(f"cannot store pooling of type {type(pooling).__name__}")


def _progress_logger(name: str) -> ProgressFn:
    state = {"logged": 0}

    def progress(done: int, total: int) -> None:
        if done - state["logged"] >= _LOG_EVERY or (done == total and state["logged"]):
            state["logged"] = done
            logger.info("importing %s: %.1f / %.1f MB new data written", name, done / 1e6, total / 1e6)

    return progress
