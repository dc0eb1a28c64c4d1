"""Tiny random encoders stored in a temp repository, for the memory tests (no downloads, no HF)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from ptmserve.memory.manager import WeightManager
from ptmserve.models.config import EncoderConfig, Pooling
from ptmserve.models.encoder import Encoder, EncoderOutput
from ptmserve.models.packed import PackedBatch, pack
from ptmserve.store.repository import Repository

POOLING = Pooling(mode="mean", normalize=False)


def tiny_config(
    *,
    hidden: int = 32,
    layers: int = 2,
    labels: tuple[str, ...] = (),
    vocab_size: int = 50,
    max_positions: int = 32,
) -> EncoderConfig:
    return EncoderConfig(
        family="bert",
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        labels=labels,
    )


def random_tensors(config: EncoderConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random parameters of ``config`` in our names; every tensor distinct (noise on LayerNorms too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        enc = Encoder(config)
    return {n: torch.randn(p.shape, generator=gen) * 0.2 for n, p in enc.named_parameters()}


def add_model(
    repo: Repository,
    name: str,
    config: EncoderConfig,
    *,
    seed: int = 0,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Store a random model (or ``tensors``) as ``name``; return its tensors."""
    tensors = dict(tensors) if tensors is not None else random_tensors(config, seed)
    repo.add_model(
        name,
        config=config.to_dict(),
        pooling=POOLING.to_dict(),
        tokenizer_json=b"{}",
        dtype="float32",
        tensors=tensors,
    )
    return tensors


def model_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def batch(seed: int = 0) -> PackedBatch:
    gen = torch.Generator().manual_seed(seed)
    lengths = (5, 9, 3)
    ids = [torch.randint(1, 50, (n,), generator=gen).tolist() for n in lengths]
    return pack(ids, position_offset=0)


def reference(
    config: EncoderConfig, tensors: Mapping[str, torch.Tensor], b: PackedBatch, **kw
) -> EncoderOutput:
    """A freshly loaded model's output on ``b``."""
    enc = Encoder.from_tensors(config, tensors, **kw)
    with torch.inference_mode():
        return enc(b, POOLING)


def run(manager: WeightManager, name: str, b: PackedBatch, *, classify: bool = False) -> EncoderOutput:
    with manager.acquire(name) as loaded:
        out = loaded.run(b, POOLING, classify=classify)
        loaded.wait()  # the load is published (events delivered) before the next step of a test
        return out


def assert_same(out: EncoderOutput, ref: EncoderOutput) -> None:
    assert torch.equal(out.embeddings, ref.embeddings)
    if ref.logits is None:
        assert out.logits is None
    else:
        assert out.logits is not None and torch.equal(out.logits, ref.logits)


def segment_of(repo: Repository, name: str, group: str) -> Path:
    """The segment file holding ``group`` of model ``name``."""
    entry = repo.manifest(name).entries(group)[0]
    return repo.root / "segments" / f"{entry.segment}.seg"


class GatedRepo:
    """A repository whose reads of chosen (model, group) pairs wait for a gate to open.

    ``opened_in_time[(model, group)]`` records whether the gate opened before ``timeout`` (False
    means the read went ahead only because the wait timed out).
    """

    def __init__(self, repo: Repository, timeout: float = 10.0) -> None:
        self._repo = repo
        self._timeout = timeout
        self.gates: dict[tuple[str, str], threading.Event] = {}
        self.opened_in_time: dict[tuple[str, str], bool] = {}
        self.reads: list[tuple[str, str]] = []

    def gate(self, model: str, group: str) -> threading.Event:
        self.gates[(model, group)] = threading.Event()
        return self.gates[(model, group)]

    def manifest(self, name: str):  # noqa: ANN201 - the repository's manifest type
        return self._repo.manifest(name)

    def read_into(self, entries, out, *, verify: bool = True, model: str = "?") -> None:  # noqa: ANN001
        key = (model, entries[0].group)
        gate = self.gates.get(key)
        if gate is not None:
            self.opened_in_time[key] = gate.wait(self._timeout)
        self.reads.append(key)
        self._repo.read_into(entries, out, verify=verify, model=model)
