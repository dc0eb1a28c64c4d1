"""Tiny encoders with early exits in a temp repository, for tests (no downloads, no Hugging Face).

Other layers' tests import this helper::

    from tests.models.tiny_exits import store_tiny_classifier, store_with_exits, certain_head

    store_tiny_classifier(repo, "base")  # a 4-layer random BERT classifier with the tiny tokenizer
    cfg, tensors = store_with_exits(repo, "base", "fast", [ExitSpec(1, 0.9), ExitSpec(2, 0.9)])
    head, leaves = splitting_head(cfg, tensors, tokenize(texts), layer=2, leaving=2)  # a known split

``store_with_exits`` works on any stored encoder (an imported ``make_tiny_checkpoint`` too): it keeps the
base's tensors (so the backbone's bytes are shared), adds ``layers.{i}.exit.*`` heads (random, or the
ones given) and stores the config with ``exits``. An exit after the last layer replaces the native head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from ptmserve.models.config import EncoderConfig, ExitSpec, Pooling
from ptmserve.models.encoder import Encoder, group_names_for
from ptmserve.models.packed import pack
from ptmserve.store.repository import Repository
from tests.memory.helpers import tiny_config as memory_tiny_config
from tests.models.tiny import tiny_tokenizer, tiny_vocab_size

LABELS = ("red", "green", "blue")
POOLING = Pooling(mode="mean", normalize=False)
Head = tuple[torch.Tensor, torch.Tensor]  # an exit's weight (C, H) and bias (C,)


def tiny_config(*, layers: int = 4, labels: tuple[str, ...] = LABELS, hidden: int = 32) -> EncoderConfig:
    """A tiny BERT classifier (native head) over ``tiny_tokenizer("bert")``'s vocabulary."""
    return memory_tiny_config(
        hidden=hidden, layers=layers, labels=labels, vocab_size=tiny_vocab_size("bert"), max_positions=64
    )


def store_tiny_classifier(
    repo: Repository, name: str, *, layers: int = 4, seed: int = 0, pooling: Pooling = POOLING
) -> dict[str, torch.Tensor]:
    """Store a random tiny BERT classifier (``LABELS``) as ``name``; returns its tensors."""
    config = tiny_config(layers=layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Encoder(config).named_parameters()}
    tensors = {n: torch.randn(s, generator=gen) * 0.2 for n, s in shapes.items()}
    _store(repo, name, config, tensors, pooling)
    return tensors


def read_model(repo: Repository, name: str) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """The stored config and every tensor of encoder ``name``."""
    manifest = repo.manifest(name)
    tensors: dict[str, torch.Tensor] = {}
    for group in manifest.group_names():
        tensors.update(repo.read_group(name, group))
    return EncoderConfig.from_dict(manifest.config), tensors


def store_with_exits(
    repo: Repository,
    base: str,
    name: str,
    exits: Sequence[ExitSpec],
    *,
    heads: Mapping[int, Head] | None = None,
    seed: int = 0,
) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """Store ``name``: ``base``'s weights plus an exit after each ``exits`` layer (``heads[layer]`` when
    given, else random). Returns the new config and tensors."""
    config, tensors = read_model(repo, base)
    config = dataclasses.replace(config, exits=tuple(exits))
    if not config.has_native_head:
        tensors = {n: t for n, t in tensors.items() if not n.startswith("head.")}
    gen = torch.Generator().manual_seed(seed)
    c, h = config.num_labels, config.hidden_size
    for spec in exits:
        weight, bias = (heads or {}).get(spec.layer) or (
            torch.randn(c, h, generator=gen) * 0.5,
            torch.randn(c, generator=gen) * 0.1,
        )
        tensors[f"layers.{spec.layer}.exit.weight"] = weight.float()
        tensors[f"layers.{spec.layer}.exit.bias"] = bias.float()
    _store(repo, name, config, tensors, Pooling.from_dict(repo.manifest(base).pooling))
    return config, tensors


def certain_head(config: EncoderConfig, label: int = 0) -> Head:
    """An exit head that is sure of ``label`` for every input (max_prob ~ 1, entropy ~ 0)."""
    weight = torch.zeros(config.num_labels, config.hidden_size)
    bias = torch.full((config.num_labels,), -30.0)
    bias[label] = 30.0
    return weight, bias


def splitting_head(
    config: EncoderConfig,
    tensors: Mapping[str, torch.Tensor],
    token_ids: Sequence[Sequence[int]],
    layer: int,
    leaving: int,
    pooling: Pooling = POOLING,
) -> tuple[Head, list[bool]]:
    """An exit head for ``layer`` under which ``leaving`` of the inputs are sure (max_prob > 0.999) and
    the others are not (max_prob ~ 0.5), whether they run alone or batched; and which inputs those are.

    Logit 0 is ``k * (s - m)`` where ``s`` is an input's pooled state at ``layer`` projected on a direction
    that spreads the inputs and ``m`` splits them; the other logits are 0. So a threshold of 0.9 splits
    them with a wide margin on both sides.
    """
    pooled = _pooled_alone(config, tensors, token_ids, layer, pooling).double()  # (n, H)
    center = pooled.mean(0)
    spread = pooled - center
    u = spread[spread.norm(dim=1).argmax()]
    u = u / u.norm()
    s = spread @ u  # (n,)
    ranked = s.sort(descending=True).values
    m = float(ranked[leaving - 1] + ranked[leaving]) / 2
    k = 8.0 / float((s - m).abs().min())
    weight = torch.zeros(config.num_labels, config.hidden_size, dtype=torch.float64)
    bias = torch.zeros(config.num_labels, dtype=torch.float64)
    weight[0] = k * u
    bias[0] = -k * (float(center @ u) + m)
    return (weight.float(), bias.float()), (s > m).tolist()


def _pooled_alone(
    config: EncoderConfig,
    tensors: Mapping[str, torch.Tensor],
    token_ids: Sequence[Sequence[int]],
    layer: int,
    pooling: Pooling,
) -> torch.Tensor:
    """Each input's pooled states (no normalisation) after ``layer``, each computed alone: ``(n, H)``."""
    enc = Encoder.from_tensors(config, tensors)
    rows = []
    with torch.inference_mode():
        for ids in token_ids:
            batch = pack([ids], position_offset=config.position_offset)
            hidden = enc.embed(batch)
            for i in range(layer + 1):
                hidden = enc.run_layer(i, hidden, batch)
            rows.append(enc.pool_states(hidden, batch, pooling.mode)[0])
    return torch.stack(rows)


def store_exit_suite(repo: Repository, texts: Sequence[str]) -> list[bool]:
    """Store ``base`` (a 4-layer classifier without exits), ``half`` (its weights with exits after layers 1
    and 2: none leave at 1, about half of ``texts`` leave at 2) and ``all1`` (every input leaves at layer
    1, as label 2). Returns which of ``texts`` leave ``half`` at layer 2."""
    store_tiny_classifier(repo, "base")
    config, tensors = store_with_exits(repo, "base", "probe", [ExitSpec(1, 2.0), ExitSpec(2, 2.0)])
    head, leaves = splitting_head(config, tensors, tokenize(texts), layer=2, leaving=len(texts) // 2)
    layer1 = (tensors["layers.1.exit.weight"], tensors["layers.1.exit.bias"])
    store_with_exits(repo, "base", "half", [ExitSpec(1, 2.0), ExitSpec(2, 0.9)], heads={1: layer1, 2: head})
    store_with_exits(repo, "base", "all1", [ExitSpec(1, 0.9)], heads={1: certain_head(config, 2)})
    repo.remove("probe")
    return leaves


def tokenize(texts: Sequence[str]) -> list[list[int]]:
    """``texts`` as ``tiny_tokenizer("bert")`` encodes them (special tokens included)."""
    tok = tiny_tokenizer("bert")
    return [e.ids for e in tok.encode_batch(list(texts))]


def _store(
    repo: Repository, name: str, config: EncoderConfig, tensors: Mapping[str, torch.Tensor], pooling: Pooling
) -> None:
    repo.add_model(
        name,
        config=config.to_dict(),
        pooling=pooling.to_dict(),
        tokenizer_json=tiny_tokenizer("bert").to_str().encode(),
        dtype="float32",
        tensors=tensors,
        architecture="bert",
        group_order=group_names_for(config),
    )
