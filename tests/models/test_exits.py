"""Early exits in the model layer: packed compaction, the exit decision, and results in row order."""

from __future__ import annotations

import pytest
import torch

from ptmserve.errors import InvalidInput
from ptmserve.models.config import ExitSpec, Pooling
from ptmserve.models.encoder import Encoder, EncoderOutput, group_names_for
from ptmserve.models.exits import EarlyExit, confidence, triggers
from ptmserve.models.packed import pack
from ptmserve.models.runner import Activations, run_stages
from ptmserve.store.repository import Repository
from tests.models.tiny import TINY_TEXTS
from tests.models.tiny_exits import (
    POOLING,
    certain_head,
    read_model,
    splitting_head,
    store_tiny_classifier,
    store_with_exits,
    tokenize,
)

TEXTS = [*TINY_TEXTS, "the water is hot", "we can make a new house", "big animal"]
NEVER = (ExitSpec(1, 2.0), ExitSpec(2, 2.0, "max_prob"))  # max_prob never reaches 2
LAST = 3  # the tiny models have 4 layers: full depth reports layer 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    repo = Repository(tmp_path_factory.mktemp("repo"))
    store_tiny_classifier(repo, "base")
    store_with_exits(repo, "base", "never", NEVER)
    return repo


def encoder(repo: Repository, name: str) -> Encoder:
    return Encoder.from_tensors(*read_model(repo, name))


def run(enc: Encoder, ids: list[list[int]], early_exit: EarlyExit | None = None) -> EncoderOutput:
    with torch.inference_mode():
        return enc(pack(ids, position_offset=0), POOLING, early_exit)


def assert_equal(a: EncoderOutput, b: EncoderOutput) -> None:
    assert a.logits is not None and b.logits is not None
    assert torch.equal(a.logits, b.logits) and torch.equal(a.embeddings, b.embeddings)


# ------------------------------------------------------------------------------------------ packing


def test_select_rebuilds_the_packed_batch() -> None:
    b = pack([[7, 8, 9], [4], [5, 6], [1, 2, 3, 4]], position_offset=2, token_type_ids=None)
    b.attention_plan()  # a cached plan must not survive the selection
    sub, rows = b.select([0, 2, 3])
    fresh = pack([[7, 8, 9], [5, 6], [1, 2, 3, 4]], position_offset=2)
    assert rows.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    for field in ("input_ids", "position_ids", "token_type_ids", "seq_ids", "cu_seqlens"):
        assert torch.equal(getattr(sub, field), getattr(fresh, field)), field
    assert (sub.lengths, sub.max_seqlen) == (fresh.lengths, fresh.max_seqlen)
    assert [x.members for x in sub.attention_plan().buckets] == [
        x.members for x in fresh.attention_plan().buckets
    ]
    empty, none = b.select([])
    assert (empty.num_seqs, empty.num_tokens, none.numel(), empty.max_seqlen) == (0, 0, 0, 0)


def test_a_layer_on_the_compacted_batch_equals_it_on_a_freshly_packed_one(repo: Repository) -> None:
    enc = encoder(repo, "base")
    ids = tokenize(TEXTS)
    b = pack(ids, position_offset=0)
    keep = [1, 2, 5, 7]
    with torch.inference_mode():
        hidden = enc.run_layer(0, enc.embed(b), b)
        sub, rows = b.select(keep)
        compacted = enc.run_layer(1, hidden.index_select(0, rows), sub)
        fresh = pack([ids[i] for i in keep], position_offset=0)
        want = enc.run_layer(
            1, torch.cat([hidden[s:e] for i, (s, e) in enumerate(b.spans()) if i in keep]), fresh
        )
    assert torch.equal(compacted, want)


# ------------------------------------------------------------------------------------ the decision


def test_confidences_and_thresholds() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert confidence(logits, "max_prob")[1].item() == pytest.approx(1 / 3)
    assert confidence(logits, "entropy")[1].item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    assert triggers(ExitSpec(0, 0.9), logits).tolist() == [True, False]
    assert triggers(ExitSpec(0, 0.1, "entropy"), logits).tolist() == [True, False]
    assert triggers(ExitSpec(0, 1.01), logits).tolist() == [False, False]  # a max_prob above 1: never
    assert triggers(ExitSpec(0, -1.0, "entropy"), logits).tolist() == [False, False]


# ------------------------------------------------------------------------------------ the model


def test_exit_heads_are_parameters_of_their_layer_group(repo: Repository) -> None:
    config, tensors = read_model(repo, "never")
    names = {n for n, _ in Encoder(config).named_parameters()}
    assert {"layers.1.exit.weight", "layers.1.exit.bias", "layers.2.exit.weight"} <= names
    assert "layers.0.exit.weight" not in names and "head.out.weight" in names
    groups = repo.manifest("never").group_names()
    assert groups == group_names_for(config)
    assert {e.name for e in repo.manifest("never").entries("layers.2")} >= {"layers.2.exit.bias"}


def test_thresholds_that_never_trigger_are_bit_identical_to_full_depth(repo: Repository) -> None:
    ids = tokenize(TEXTS)
    never = run(encoder(repo, "never"), ids)
    plain = run(encoder(repo, "base"), ids)  # the same weights and head, no exits
    assert_equal(never, plain)
    assert plain.exit_layers is None
    assert never.exit_layers is not None and never.exit_layers.tolist() == [LAST] * len(ids)
    forced = run(encoder(repo, "never"), ids, EarlyExit(allowed=[False] * len(ids)))
    assert_equal(forced, plain)


def test_half_the_rows_exit_at_layer_2_and_each_gets_its_result_alone(repo: Repository) -> None:
    ids = tokenize(TEXTS)
    config, tensors = read_model(repo, "never")
    head, leaves = splitting_head(config, tensors, ids, layer=2, leaving=len(ids) // 2)
    store_with_exits(
        repo, "base", "half", [NEVER[0], ExitSpec(2, 0.9)], heads={1: _head(tensors, 1), 2: head}
    )
    enc = encoder(repo, "half")
    out = run(enc, ids)
    assert out.exit_layers is not None and out.logits is not None
    assert out.exit_layers.tolist() == [2 if x else LAST for x in leaves]
    for i, x in enumerate(ids):
        alone = run(enc, [x])
        assert alone.exit_layers is not None and alone.logits is not None
        assert int(alone.exit_layers[0]) == int(out.exit_layers[i])
        torch.testing.assert_close(alone.logits[0].softmax(-1), out.logits[i].softmax(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.embeddings[0], out.embeddings[i], atol=1e-5, rtol=1e-5)
    # The rows that went on are those of full depth, and the rows that left match their layer-2 exit.
    full = run(enc, ids, EarlyExit(allowed=[False] * len(ids)))
    stayed = [i for i, x in enumerate(leaves) if not x]
    torch.testing.assert_close(out.logits[stayed], full.logits[stayed], atol=1e-5, rtol=1e-5)


def test_permissions_keep_rows_at_full_depth(repo: Repository) -> None:
    config, tensors = read_model(repo, "never")
    store_with_exits(repo, "base", "sure1", [ExitSpec(1, 0.9)], heads={1: certain_head(config, 2)})
    enc = encoder(repo, "sure1")
    ids = tokenize(TEXTS[:4])
    out = run(enc, ids, EarlyExit(allowed=[True, False, True, False]))
    assert out.exit_layers is not None and out.logits is not None
    assert out.exit_layers.tolist() == [1, LAST, 1, LAST]
    assert out.logits[[0, 2]].argmax(-1).tolist() == [2, 2]
    plain = run(encoder(repo, "base"), ids)
    assert plain.logits is not None
    torch.testing.assert_close(out.logits[[1, 3]], plain.logits[[1, 3]], atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidInput, match="permissions for 2 rows"):
        run(enc, ids, EarlyExit(allowed=[True, False]))


def test_every_row_leaving_skips_the_later_layers_and_the_head(repo: Repository) -> None:
    config, _ = read_model(repo, "never")
    store_with_exits(repo, "base", "all1", [ExitSpec(1, 0.9)], heads={1: certain_head(config, 1)})
    enc = encoder(repo, "all1")
    seen: list[tuple[str, int]] = []

    def note(group: str, acts: Activations) -> None:
        seen.append((group, acts.batch.num_seqs))

    b = pack(tokenize(TEXTS[:3]), position_offset=0)
    ee = EarlyExit()
    acts = run_stages(enc.stages(classify=True, pooling=POOLING, early_exit=ee), Activations(b), note)
    assert ee.layers is not None and ee.layers.tolist() == [1, 1, 1]
    assert acts.logits is not None and acts.logits.argmax(-1).tolist() == [1, 1, 1]
    assert seen[:3] == [("embeddings", 3), ("layers.0", 3), ("layers.1", 3)]
    assert all(n == 0 for _, n in seen[3:])  # later stages see an empty batch: nothing to wait for


def test_a_final_exit_after_the_last_layer_replaces_the_native_head(repo: Repository) -> None:
    config, tensors = read_model(repo, "never")
    final = (tensors["layers.1.exit.weight"], tensors["layers.1.exit.bias"])
    cfg, stored = store_with_exits(
        repo, "base", "final", [ExitSpec(1, 2.0), ExitSpec(LAST, 0.0)], heads={1: final, LAST: final}
    )
    assert not cfg.has_native_head and not any(n.startswith("head.") for n in stored)
    assert "head" not in repo.manifest("final").group_names()
    enc = encoder(repo, "final")
    ids = tokenize(TEXTS[:3])
    out = run(enc, ids)
    assert out.exit_layers is not None and out.exit_layers.tolist() == [LAST] * 3
    b = pack(ids, position_offset=0)
    with torch.inference_mode():
        hidden = enc.embed(b)
        for i in range(LAST + 1):
            hidden = enc.run_layer(i, hidden, b)
        want = enc.exit_logits(LAST, enc.pool_states(hidden, b, POOLING.mode))
    assert out.logits is not None and torch.equal(out.logits, want)
    embeddings_only = enc.stages(classify=False, pooling=POOLING)
    assert [s.group for s in embeddings_only][-2:] == [f"layers.{LAST}", "pool"]


def test_cls_pooling_and_normalised_embeddings_at_the_exit(repo: Repository) -> None:
    config, _ = read_model(repo, "never")
    store_with_exits(repo, "base", "cls1", [ExitSpec(1, 0.9)], heads={1: certain_head(config)})
    enc = encoder(repo, "cls1")
    pooling = Pooling(mode="cls", normalize=True)
    b = pack(tokenize(TEXTS[:2]), position_offset=0)
    with torch.inference_mode():
        out = enc(b, pooling)
        hidden = enc.run_layer(1, enc.run_layer(0, enc.embed(b), b), b)
        want = enc.pool(hidden, b, pooling)
    assert torch.equal(out.embeddings, want)
    assert out.exit_layers is not None and out.exit_layers.tolist() == [1, 1]


def _head(tensors: dict[str, torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tensors[f"layers.{layer}.exit.weight"], tensors[f"layers.{layer}.exit.bias"]
