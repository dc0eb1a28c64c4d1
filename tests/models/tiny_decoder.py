"""Tiny random decoder checkpoints (GPT-2 and LLaMA-style) for tests, saved like ``save_pretrained`` does.

    from tests.models.tiny_decoder import make_tiny_decoder

    folder, hf = make_tiny_decoder(tmp_path / "ck", "llama-gqa-untied")

The folder holds ``config.json``, ``model.safetensors``, the tiny word-level ``tokenizer.json`` of
``tests.models.tiny`` and a ``tokenizer_config.json`` with a small chat template; ``hf`` is the
transformers model with the same weights (float32, eval mode), for reference outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.models.tiny import tiny_tokenizer, tiny_vocab_size

VARIANTS = ("gpt2", "llama-gqa-untied", "llama-tied")
VOCAB = tiny_vocab_size("bert")
EOS_ID = 3  # "[SEP]" in the tiny vocabulary: the tiny decoders' end-of-sequence token
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_tiny_decoder(
    folder: Path, variant: str, *, context: int = 256, seed: int = 0
) -> tuple[Path, torch.nn.Module]:
    """Write a tiny random decoder of ``variant`` (one of ``VARIANTS``) to ``folder``."""
    import transformers

    torch.manual_seed(seed)
    if variant == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=context, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=EOS_ID, bos_token_id=2,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
    elif variant in ("llama-gqa-untied", "llama-tied"):
        tied = variant == "llama-tied"
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4 if tied else 2, max_position_embeddings=context,
            rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tied, eos_token_id=EOS_ID,
            bos_token_id=2,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    model = model.eval()
    with torch.no_grad():  # make every parameter (norms included) non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tiny_tokenizer("bert").save(str(folder / "tokenizer.json"))
    config = {"chat_template": CHAT_TEMPLATE, "bos_token": "[CLS]", "eos_token": "[SEP]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, model


def reference_greedy(hf: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of ``prompt`` (``new_tokens`` tokens, the end token ignored)."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
