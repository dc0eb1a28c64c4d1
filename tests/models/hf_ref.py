"""Reference outputs computed with ``transformers`` the way its users run it: a padded batch with an
attention mask (RoBERTa pads with its pad id so its position ids come out right)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class HFOutput:
    hidden: list[torch.Tensor]  # one (L_b, H) float32 tensor per sequence, padding removed
    logits: torch.Tensor | None  # (B, C)

    def mean_pooled(self, normalize: bool = False) -> torch.Tensor:
        pooled = torch.stack([h.mean(0) for h in self.hidden])  # (B, H)
        return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    def cls_pooled(self) -> torch.Tensor:
        return torch.stack([h[0] for h in self.hidden])


def load_hf(folder: Path, *, with_head: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers

    cls = transformers.AutoModelForSequenceClassification if with_head else transformers.AutoModel
    return cls.from_pretrained(folder, dtype=dtype).eval()


def run_hf(model: torch.nn.Module, ids: list[list[int]], pad_id: int) -> HFOutput:
    """Run ``model`` on ``ids`` as one padded batch."""
    width = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    last = out.hidden_states[-1].float()  # (B, L, H)
    hidden = [last[row, : len(seq)] for row, seq in enumerate(ids)]
    logits = out.logits.float() if hasattr(out, "logits") else None
    return HFOutput(hidden=hidden, logits=logits)


def random_ids(
    n: int, vocab_size: int, *, min_len: int = 1, max_len: int = 40, seed: int = 0, first_id: int = 5
) -> list[list[int]]:
    """``n`` random sequences of ids in ``[first_id, vocab_size)`` (no special or pad ids)."""
    rng = random.Random(seed)
    return [
        [rng.randrange(first_id, vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)
    ]
