"""Read a Hugging Face checkpoint folder into our names.

A folder holds ``config.json``, ``model.safetensors`` (or a sharded ``model.safetensors.index.json``,
or ``pytorch_model.bin``, read with ``weights_only=True``) and ``tokenizer.json``. When the
sentence-transformers files are there, they decide the pooling (``modules.json``,
``1_Pooling/config.json``, the Normalize module) and the truncation length
(``sentence_bert_config.json``'s ``max_seq_length``). Without them the pooling is mean over tokens with
no normalisation, and inputs are truncated at the model's longest position.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptmserve.errors import InvalidCheckpoint
from ptmserve.models import registry
from ptmserve.models.config import Pooling
from ptmserve.models.registry import Family, ModelConfig, check_tensors

_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(slots=True)
class Checkpoint:
    """A checkpoint read into our names, ready to import or to run."""

    architecture: str  # the registry name of its family
    config: ModelConfig
    pooling: Pooling
    max_length: int  # truncation length in tokens, special tokens included
    tensors: dict[str, torch.Tensor]  # our parameter names -> CPU tensors in the stored dtype
    tokenizer_json: bytes  # the folder's tokenizer.json, unchanged
    source: Path
    generation: dict[str, Any] = field(default_factory=dict)  # a decoder's chat template, special tokens


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Read the checkpoint in ``folder``.

    Raises:
        InvalidCheckpoint: a missing file, an unsupported architecture or sentence-transformers module,
            or weights that do not match the config (missing, unexpected or mis-shaped keys).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidCheckpoint(f"checkpoint folder {str(folder)!r} does not exist")
    config_json = _read_json(folder / "config.json")
    if not isinstance(config_json, dict):
        raise InvalidCheckpoint(f"{str(folder / 'config.json')!r} does not hold a JSON object")
    family = registry.for_hf(config_json)
    config = family.config_from_hf(config_json)
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise InvalidCheckpoint(f"{str(folder)!r} has no tokenizer.json (the fast tokenizer file)")
    tensors = _translate(family, config, _load_weights(folder))
    pooling, max_length = _sentence_transformers(folder, config)
    return Checkpoint(
        architecture=family.name,
        config=config,
        pooling=pooling,
        max_length=max_length,
        tensors=tensors,
        tokenizer_json=tokenizer_path.read_bytes(),
        source=folder,
        generation=_generation_settings(folder, config_json) if family.generates else {},
    )


def _generation_settings(folder: Path, config_json: dict[str, Any]) -> dict[str, Any]:
    """A decoder's special tokens, default sampling and chat template, from ``generation_config.json``
    (or ``config.json``) and ``tokenizer_config.json`` when the folder has them; what is missing is left
    out."""
    settings = dict(config_json)
    if (folder / "generation_config.json").is_file():
        settings.update(_read_json(folder / "generation_config.json") or {})
    out = _token_ids_and_sampling(settings)
    tokenizer_config = folder / "tokenizer_config.json"
    tc = _read_json(tokenizer_config) if tokenizer_config.is_file() else None
    if isinstance(tc, dict):
        template = tc.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            out["chat_template"] = template
        for role in ("bos", "eos"):
            token = tc.get(f"{role}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                out[f"{role}_token"] = token
    return out


def _token_ids_and_sampling(settings: dict[str, Any]) -> dict[str, Any]:
    """``bos_token_id``, ``eos_token_id`` (and ``eot_token_id`` when a list names two) and the default
    ``sampling`` of a generation config."""
    out: dict[str, Any] = {}
    for role in ("bos", "eos"):
        value = settings.get(f"{role}_token_id")
        values = value if isinstance(value, list) else [value]
        values = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        if values:
            out[f"{role}_token_id"] = values[0]
        if role == "eos" and len(values) > 1:
            out["eot_token_id"] = values[1]  # e.g. an end-of-turn token next to end-of-text
    sampling = {
        k: settings[k] for k in ("temperature", "top_p", "top_k") if isinstance(settings.get(k), (int, float))
    }
    if settings.get("do_sample") is False:
        sampling = {"temperature": 0}  # the checkpoint decodes greedily
    if sampling:
        out["sampling"] = sampling
    return out


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InvalidCheckpoint(f"{str(path.parent)!r} has no {path.name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCheckpoint(f"{str(path)!r} is not valid JSON: {exc}") from exc


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if (folder / "model.safetensors").is_file():
            return load_file(folder / "model.safetensors")
        if (folder / "model.safetensors.index.json").is_file():
            index = _read_json(folder / "model.safetensors.index.json")
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                out.update(load_file(folder / shard))
            return out
        if (folder / "pytorch_model.bin").is_file():
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise InvalidCheckpoint("pytorch_model.bin does not hold a state dict")
            return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    except (SafetensorError, OSError, KeyError, RuntimeError, pickle.UnpicklingError) as exc:
        raise InvalidCheckpoint(f"cannot read the weights in {str(folder)!r}: {exc}") from exc
    raise InvalidCheckpoint(
        f"{str(folder)!r} has no weights "
        "(model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def _translate(family: Family, config: ModelConfig, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = family.names.convert(raw, with_head=bool(config.labels), family=family.name)
    with torch.device("meta"):
        skeleton = family.build(config)
    check_tensors(skeleton, tensors)  # missing keys and wrong shapes, before anything is copied
    return tensors


def _sentence_transformers(folder: Path, config: ModelConfig) -> tuple[Pooling, int]:
    """Pooling and truncation length from the sentence-transformers files (defaults without them)."""
    max_length = config.max_tokens
    if (folder / "sentence_bert_config.json").is_file():
        declared = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
        if declared:
            max_length = min(int(declared), config.max_tokens)
    pooling_dir: Path | None = None
    normalize = False
    if (folder / "modules.json").is_file():
        for module in _read_json(folder / "modules.json"):
            kind = module.get("type", "")
            if kind == _ST_POOLING:
                pooling_dir = folder / module.get("path", "1_Pooling")
            elif kind == _ST_NORMALIZE:
                normalize = True
            elif kind != _ST_TRANSFORMER:
                raise InvalidCheckpoint(f"unsupported sentence-transformers module {kind!r} in modules.json")
    elif (folder / "1_Pooling" / "config.json").is_file():
        pooling_dir = folder / "1_Pooling"
    if pooling_dir is None:
        return Pooling(mode="mean", normalize=normalize), max_length
    return Pooling(
        mode=_pooling_mode(_read_json(pooling_dir / "config.json")), normalize=normalize
    ), max_length


def _pooling_mode(cfg: dict[str, Any]) -> str:
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    if modes == ["pooling_mode_cls_token"]:
        return "cls"
    raise InvalidCheckpoint(f"unsupported sentence-transformers pooling {modes}; only mean or cls alone")
