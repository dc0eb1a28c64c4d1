"""The frozen backbone and each candidate layer's pooled features, computed once over the data.

The backbone is read from the repository and run in float32 with the models layer's own per-layer API
(``Encoder.embed``, ``run_layer``, ``pool``, ``classify``): the features an exit head trains on are the
ones it will see when served. An exit pools with the model's pooling mode (mean or cls) without L2
normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ptmserve.errors import InvalidInput
from ptmserve.models.config import EncoderConfig, Pooling
from ptmserve.models.encoder import Encoder
from ptmserve.models.packed import pack
from ptmserve.models.tokenizer import TextTokenizer
from ptmserve.store.manifest import ModelManifest
from ptmserve.store.repository import Repository
from ptmserve.training.progress import Progress


@dataclass(slots=True)
class Backbone:
    """A stored encoder ready to compute features (float32, on ``device``)."""

    name: str
    manifest: ModelManifest
    config: EncoderConfig
    pooling: Pooling  # the model's own pooling, as stored
    encoder: Encoder
    tokenizer: TextTokenizer
    device: torch.device

    @property
    def exit_pooling(self) -> Pooling:
        """What an exit pools with: the model's mode, never normalised."""
        return Pooling(mode=self.pooling.mode, normalize=False)

    @property
    def has_head(self) -> bool:
        return self.config.has_native_head


@dataclass(slots=True)
class Features:
    """Pooled float32 features of every input at each requested layer."""

    layers: dict[int, np.ndarray]  # layer -> (N, H)
    native_logits: np.ndarray | None  # (N, C) the base model's own head, when it has one
    token_ids: list[list[int]]  # each input's tokens (truncated), in input order


def load_backbone(repo: Repository, name: str, device: str = "cpu") -> Backbone:
    """Model ``name`` as a frozen float32 encoder.

    Raises:
        ModelNotFound: no such model.
        InvalidInput: the model is not an encoder, has exits already, or is stored quantized.
        CorruptData: its stored bytes are damaged.
    """
    from ptmserve.models import registry

    manifest = repo.manifest(name)
    config = registry.config_from_dict(manifest.architecture, dict(manifest.config))
    if not isinstance(config, EncoderConfig):
        raise InvalidInput(
            f"model {name!r} is a {manifest.architecture} model; exits are trained on encoders (BERT, "
            "RoBERTa, DistilBERT)"
        )
    if config.exits:
        raise InvalidInput(f"model {name!r} has exits already; train exits on its base model instead")
    if manifest.weights != "fp":
        raise InvalidInput(
            f"model {name!r} is stored with {manifest.weights} weights; train exits on a float import of it "
            "(serve the result with --weights to quantize it)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for group in manifest.group_names():
        tensors.update(repo.read_group(name, group))
    dev = torch.device(device)
    encoder = Encoder.from_tensors(config, tensors, device=dev, dtype=torch.float32)
    encoder.requires_grad_(False)
    max_tokens = min(manifest.max_length or config.max_tokens, config.max_tokens)
    tokenizer = TextTokenizer.from_json(manifest.tokenizer_json, max_tokens)
    pooling = Pooling.from_dict(manifest.pooling)
    return Backbone(name, manifest, config, pooling, encoder, tokenizer, dev)


def compute_features(
    backbone: Backbone,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int,
    native_head: bool = False,
    show_progress: bool = True,
) -> Features:
    """Run every text once through the frozen backbone and keep its pooled states after each of
    ``layers`` (0-based), and the native head's logits when ``native_head``.

    Inputs are batched by token length (less attention padding), ``batch_size`` at a time; the
    results come back in input order.

    Raises:
        InvalidInput: an empty text list, a layer out of range, or ``batch_size`` < 1.
    """
    cfg = backbone.config
    if not texts:
        raise InvalidInput("no texts to compute features of")
    if batch_size < 1:
        raise InvalidInput(f"--batch-size must be at least 1, got {batch_size}")
    wanted = sorted(set(layers))
    if any(not 0 <= layer < cfg.num_layers for layer in wanted):
        raise InvalidInput(f"layers {wanted} must be in 0..{cfg.num_layers - 1}")
    depth = cfg.num_layers if native_head else wanted[-1] + 1
    token_ids = backbone.tokenizer.encode(list(texts))
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    n, hidden = len(token_ids), cfg.hidden_size
    out = {layer: np.empty((n, hidden), dtype=np.float32) for layer in wanted}
    logits = np.empty((n, cfg.num_labels), dtype=np.float32) if native_head else None
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    bar = Progress("features", len(batches), unit="batches") if show_progress else None
    enc, pooling = backbone.encoder, backbone.exit_pooling
    with torch.inference_mode():
        for rows in batches:
            batch = pack(
                [token_ids[i] for i in rows], position_offset=cfg.position_offset, device=backbone.device
            )
            x = enc.embed(batch)  # (T, H)
            for layer in range(depth):
                x = enc.run_layer(layer, x, batch)
                if layer in out:
                    out[layer][rows] = enc.pool(x, batch, pooling).cpu().numpy()
            if logits is not None:
                logits[rows] = enc.classify(x, batch).cpu().numpy()
            if bar is not None:
                bar.advance()
    if bar is not None:
        bar.close()
    return Features(out, logits, token_ids)
