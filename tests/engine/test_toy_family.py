"""A new model family added through the registry alone imports, switches and serves.

The toy family lives in this file only: a config, a name table with a transform hook (its checkpoint
stores linear weights transposed, as GPT-2's Conv1D does), a module that runs as stages, and one
``register`` call. Nothing in ptmserve names it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ptmserve.engine.api import InferenceOptions
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.models import registry
from ptmserve.models.names import Hook, NameTable
from ptmserve.models.packed import pack
from ptmserve.models.runner import Activations, Stage, run_stages
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.tiny import TINY_TEXTS, tiny_tokenizer, tiny_vocab_size

ARCH = "toy-bag"


@dataclass(frozen=True, slots=True)
class ToyConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_tokens: int = 32
    labels: tuple[str, ...] = field(default_factory=tuple)

    architecture = ARCH
    position_offset = 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyConfig:
        return cls(**{**data, "labels": tuple(data.get("labels", ()))})

    @classmethod
    def from_hf(cls, cj: dict[str, Any]) -> ToyConfig:
        return cls(int(cj["vocab_size"]), int(cj["dim"]), int(cj["depth"]))


class ToyModel(nn.Module):
    """Token embeddings, then ``depth`` residual tanh layers per token, then mean pooling."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = nn.ModuleDict({"word": nn.Embedding(cfg.vocab_size, cfg.hidden_size)})
        self.layers = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(cfg.hidden_size, cfg.hidden_size)})
            for _ in range(cfg.num_layers)
        )

    def stages(self, *, classify: bool, pooling: object) -> list[Stage]:
        stages = [Stage("embeddings", self._embed)]
        stages += [Stage(f"layers.{i}", partial(self._layer, i)) for i in range(self.config.num_layers)]
        return [*stages, Stage("pool", self._pool)]

    def _embed(self, acts: Activations) -> None:
        acts.hidden = self.embeddings["word"](acts.batch.input_ids)

    def _layer(self, i: int, acts: Activations) -> None:
        acts.hidden = acts.hidden + torch.tanh(self.layers[i]["proj"](acts.hidden))

    def _pool(self, acts: Activations) -> None:
        b = acts.batch
        sums = acts.hidden.new_zeros((b.num_seqs, acts.hidden.shape[1]), dtype=torch.float32)
        sums.index_add_(0, b.seq_ids, acts.hidden.float())
        acts.embeddings = sums / torch.tensor(b.lengths, dtype=torch.float32)[:, None]


def _transposed(tensor: torch.Tensor, param: str) -> torch.Tensor:
    return tensor.t() if param == "weight" else tensor  # stored (in, out), as GPT-2's Conv1D


FAMILY = registry.Family(
    name=ARCH,
    hf_model_types=(ARCH,),
    config_from_hf=ToyConfig.from_hf,
    config_from_dict=ToyConfig.from_dict,
    names=NameTable(
        prefix="",
        body={"tok_emb": "embeddings.word", "blocks.{i}.lin": Hook("layers.{i}.proj", _transposed)},
    ),
    build=ToyModel,
    group_names=lambda cfg: ["embeddings", *(f"layers.{i}" for i in range(cfg.num_layers))],
)


@pytest.fixture(scope="module", autouse=True)
def toy_family() -> Iterator[None]:
    registry.register(FAMILY)
    yield
    registry.unregister(ARCH)


def write_checkpoint(folder: Path, seed: int, dim: int = 64, depth: int = 3) -> dict[str, torch.Tensor]:
    """A toy checkpoint folder in its own naming; returns the weights in its own layout."""
    torch.manual_seed(seed)
    vocab = tiny_vocab_size("bert")
    raw = {"tok_emb.weight": torch.randn(vocab, dim)}
    for i in range(depth):
        raw[f"blocks.{i}.lin.weight"] = torch.randn(dim, dim) / math.sqrt(dim)  # (in, out)
        raw[f"blocks.{i}.lin.bias"] = torch.randn(dim) * 0.1
    folder.mkdir(parents=True)
    save_file(raw, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"model_type": ARCH, "vocab_size": vocab, "dim": dim, "depth": depth})
    )
    tiny_tokenizer("bert").save(str(folder / "tokenizer.json"))
    return raw


def reference(raw: dict[str, torch.Tensor], ids: list[int]) -> np.ndarray:
    """The toy model computed by hand from the checkpoint's own layout."""
    x = raw["tok_emb.weight"][torch.tensor(ids)]
    i = 0
    while f"blocks.{i}.lin.weight" in raw:
        x = x + torch.tanh(x @ raw[f"blocks.{i}.lin.weight"] + raw[f"blocks.{i}.lin.bias"])
        i += 1
    return x.mean(0).numpy()


def test_a_toy_family_imports_switches_and_serves(tmp_path: Path) -> None:
    raws = {f"toy{k}": write_checkpoint(tmp_path / f"src{k}", seed=k) for k in range(2)}
    repo = Repository(tmp_path / "repo")
    for k, name in enumerate(raws):
        manifest = import_checkpoint(repo, tmp_path / f"src{k}", name, dtype="float32")
        assert manifest.architecture == ARCH
        assert list(manifest.groups) == ["embeddings", "layers.0", "layers.1", "layers.2"]
    one_model = manifest.total_bytes
    settings = EngineSettings(dtype="float32", device_memory=int(one_model * 1.5))  # one model at a time
    with Engine(repo, settings) as engine:
        infos = {m.name: m for m in engine.models()}
        assert infos["toy0"].dim == 64 and infos["toy0"].kind.value == "embedding"
        tokenizer = engine.catalog.tokenizer("toy0")
        for _ in range(2):
            for name, raw in raws.items():
                got = engine.embed(name, list(TINY_TEXTS), InferenceOptions(priority=1)).embeddings
                want = np.stack([reference(raw, ids) for ids in tokenizer.encode(list(TINY_TEXTS))])
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        switches = sum(engine.metrics.loads.labels(n)._value.get() for n in raws)
        assert switches >= 4  # each model was loaded twice: the budget holds one


def test_the_toy_module_runs_alone_through_the_one_runner(tmp_path: Path) -> None:
    raw = write_checkpoint(tmp_path / "src", seed=5)
    from ptmserve.models.hf import read_checkpoint

    ckpt = read_checkpoint(tmp_path / "src")
    assert ckpt.architecture == ARCH and isinstance(ckpt.config, ToyConfig)
    model = ToyModel(ckpt.config)
    model.load_state_dict(ckpt.tensors, strict=True)
    ids = [[2, 10, 11, 3], [2, 40, 3]]
    seen: list[str] = []
    acts = run_stages(
        model.stages(classify=False, pooling=None),
        Activations(pack(ids, position_offset=0)),
        lambda group, _: seen.append(group),
    )
    assert seen == ["embeddings", "layers.0", "layers.1", "layers.2", "pool"]
    np.testing.assert_allclose(
        acts.embeddings.detach().numpy(), np.stack([reference(raw, x) for x in ids]), rtol=1e-5, atol=1e-6
    )
