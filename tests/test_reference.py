"""The reference (base-model) pass, its cache, the base-model gates, SFT-KL and FLOW, against direct
computations on small tensors and a tiny model."""

import copy
import math

import pytest
import torch

from conftest import TINY_LLAMA
from eaft_pl.loss.chunked import chunked_token_statistics
from eaft_pl.data.chat import Conversation, collate, encode_conversation
from eaft_pl.models.loading import build_causal_lm
from eaft_pl.loss.gates import SFTGate
from eaft_pl.loss.stats import token_statistics
from eaft_pl.reference import (
    ReferenceTable,
    compute_reference_table,
    frozen_reference,
    load_or_compute_reference,
    token_kl,
)
from eaft_pl.loss.reference_gates import EAFTStaticMaskGate, FLOWGate, StaticConflictMaskGate, StaticEAFTGate, flow_weights

LN20 = math.log(20)


def random_batch(seed=0, b=3, t=9, vocab=30):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[:, :3] = -100
    labels[1, 6:] = -100
    reference = {
        "topk_entropy": torch.rand(b, t, generator=g) * LN20,
        "label_prob": torch.rand(b, t, generator=g),
        "sample_ce": torch.rand(b, t, generator=g) * 3,
        "sample_ce_median": torch.full((b, t), 1.3),
    }
    return logits, labels, reference


def direct_selection(labels, value):
    """The reference value of each supervised token, in flattened order, by a loop."""
    out = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != -100:
                out.append(float(value[b, t + 1]))
    return torch.tensor(out)


def test_reference_is_selected_like_the_labels_on_both_paths():
    logits, labels, reference = random_batch()
    stats = token_statistics(logits, labels, reference=reference)
    for name, value in reference.items():
        assert torch.equal(stats.reference[name], direct_selection(labels, value))
    # The chunked path slices the reference per chunk: the static gates give the plain path's weights.
    vocab, hidden = logits.shape[-1], 8
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(*labels.shape, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    for gate in (StaticEAFTGate(), StaticConflictMaskGate(0.5, 0.5), FLOWGate(), EAFTStaticMaskGate(max_norm_entropy=0.5, max_label_prob=0.5)):
        plain = token_statistics(h @ w.T, labels, reference=reference)
        chunked, weights, _ = chunked_token_statistics(h, w, labels, gate, chunk_size=4, reference=reference)
        torch.testing.assert_close(weights, gate(plain))
        assert torch.equal(chunked.reference["label_prob"], plain.reference["label_prob"])


def test_static_gates_match_hand_computed_weights():
    logits, labels, reference = random_batch(seed=2)
    stats = token_statistics(logits, labels, reference=reference)
    h = direct_selection(labels, reference["topk_entropy"]) / LN20
    p = direct_selection(labels, reference["label_prob"])
    torch.testing.assert_close(StaticEAFTGate()(stats), h)
    torch.testing.assert_close(StaticEAFTGate(alpha=2)(stats), h**2)
    mask = torch.tensor([0.0 if (hi <= 0.4 and pi <= 0.3) else 1.0 for hi, pi in zip(h.tolist(), p.tolist())])
    assert 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(StaticConflictMaskGate(0.4, 0.3)(stats), mask)
    torch.testing.assert_close(EAFTStaticMaskGate(max_norm_entropy=0.4, max_label_prob=0.3)(stats), stats.norm_entropy * mask)


def test_flow_weights_match_hand_computed_values():
    # Three examples with base mean losses 0.5, 1.0, 2.0: tau = median = 1.0.
    sample_ce = torch.tensor([0.5, 0.5, 1.0, 2.0, 2.0, 2.0])
    expected = torch.tensor([math.exp(-0.5), math.exp(-0.5), math.exp(-1.0), math.exp(-2.0), math.exp(-2.0), math.exp(-2.0)])
    torch.testing.assert_close(flow_weights(sample_ce, 1.0), expected)
    torch.testing.assert_close(flow_weights(sample_ce, 2.0), torch.exp(-sample_ce / 2.0))
    table = ReferenceTable(top_k=20, train_keys=["a", "b", "c"])
    table.entries = {k: {"sample_ce": torch.tensor(v)} for k, v in zip("abc", (2.0, 0.5, 1.0))}
    assert table.median_sample_ce == 1.0
    logits, labels, reference = random_batch(seed=3)
    stats = token_statistics(logits, labels, reference=reference)
    torch.testing.assert_close(FLOWGate()(stats), torch.exp(-direct_selection(labels, reference["sample_ce"]) / 1.3))
    with pytest.raises(ValueError, match="tau"):
        FLOWGate(tau=0.0)


def test_gates_without_reference_say_what_is_missing():
    logits, labels, _ = random_batch()
    with pytest.raises(ValueError, match="reference_source"):
        StaticEAFTGate()(token_statistics(logits, labels))


def test_token_kl_matches_a_hand_computation_in_both_directions():
    logits = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    ref = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 1.0, -2.0], [3.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 2, 1]])  # the logits at positions 0 and 1 are supervised

    def kl(a, b):
        pa = [math.exp(x) / sum(math.exp(y) for y in a) for x in a]
        pb = [math.exp(x) / sum(math.exp(y) for y in b) for x in b]
        return sum(x * math.log(x / y) for x, y in zip(pa, pb))

    rows = [0, 1]
    forward = token_kl(logits, ref, labels, "policy_ref")
    reverse = token_kl(logits, ref, labels, "ref_policy")
    assert forward.tolist() == pytest.approx([kl(logits[0, r].tolist(), ref[0, r].tolist()) for r in rows], rel=1e-5)
    assert reverse.tolist() == pytest.approx([kl(ref[0, r].tolist(), logits[0, r].tolist()) for r in rows], rel=1e-5)
    # SFT-KL = mean CE + 0.5 * mean KL, and its gradient reaches the logits (the reference gets none).
    stats = token_statistics(logits, labels)
    loss = (SFTGate()(stats) * stats.ce).sum() / 2 + 0.5 * forward.sum() / 2
    ce = [-math.log(math.exp(logits[0, r, y].item()) / sum(math.exp(v) for v in logits[0, r].tolist())) for r, y in ((0, 2), (1, 1))]
    expected = sum(ce) / 2 + 0.5 * sum(kl(logits[0, r].tolist(), ref[0, r].tolist()) for r in rows) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad[0, :2].abs().sum() > 0 and logits.grad[0, 2].abs().sum() == 0
    with pytest.raises(ValueError, match="direction"):
        token_kl(logits, ref, labels, "sideways")


# ---- the pass over data, its cache and the frozen copy ----------------------------------------------


def tiny_data(tokenizer, n=6, offset=0):
    convs = [
        Conversation([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "ab" * (1 + i % 3)}], f"mem:{i}")
        for i in range(offset, offset + n)
    ]
    return [encode_conversation(tokenizer, c, 64) for c in convs]


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return build_causal_lm(TINY_LLAMA, tokenizer, None).eval()


def test_cached_statistics_equal_a_frozen_copy_on_the_fly(char_tokenizer):
    model = tiny_model(char_tokenizer)
    data = {"train": tiny_data(char_tokenizer), "val": tiny_data(char_tokenizer, 3, offset=10)}
    pad = char_tokenizer.pad_token_id
    table = compute_reference_table(model, data, 20, lambda ex: collate(ex, pad), batch_size=4)
    assert set(table.train_keys) <= set(table.entries) and len(table.entries) == 9
    frozen = copy.deepcopy(model)
    # A batch in another order and with other neighbours (so other padding) than the pass saw.
    batch = collate([data["val"][1], data["train"][4], data["train"][0]], pad)
    cached = table.batch_reference(batch)
    on_the_fly, logits = frozen_reference(frozen, batch, 20)
    assert logits.shape[:2] == batch["labels"].shape
    for name in ("topk_entropy", "label_prob", "sample_ce"):
        torch.testing.assert_close(cached[name], on_the_fly[name], equal_nan=True, rtol=1e-5, atol=1e-6)
    supervised = torch.zeros_like(batch["labels"], dtype=torch.bool)
    supervised[:, 1:] = batch["labels"][:, 1:] != -100
    assert not cached["topk_entropy"][supervised].isnan().any() and cached["topk_entropy"][~supervised].isnan().all()
    with pytest.raises(KeyError, match="reference_source: frozen"):
        table.batch_reference(collate(tiny_data(char_tokenizer, 1, offset=50), pad))


def test_cache_is_reused_only_for_the_same_model_data_tokenizer_and_k(char_tokenizer, tmp_path):
    model = tiny_model(char_tokenizer)
    data = {"train": tiny_data(char_tokenizer, 4)}
    pad = char_tokenizer.pad_token_id

    def run(m=model, tok=char_tokenizer, d=data, k=20):
        return load_or_compute_reference(m, tok, d, k, lambda ex: collate(ex, pad), str(tmp_path), batch_size=2)

    table, path, hit = run()
    assert not hit and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    again, same_path, hit = run()
    assert hit and same_path == path
    for key, entry in table.entries.items():
        torch.testing.assert_close(again.entries[key]["topk_entropy"], entry["topk_entropy"])
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.get_output_embeddings().weight[0, 0] += 1e-3
    other_tok = copy.deepcopy(char_tokenizer)
    other_tok.add_tokens(["<new>"])
    variants = {
        "model": run(m=changed),
        "data": run(d={"train": data["train"][:3]}),
        "tokenizer": run(tok=other_tok),
        "top_k": run(k=5),
    }
    paths = {path} | {p for _, p, _ in variants.values()}
    assert len(paths) == 5, "each change must give its own cache file"
    assert not any(hit for _, _, hit in variants.values())


def test_the_pass_with_a_progress_bar_computes_the_same_table(char_tokenizer, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # the bar's output, kept out of the test log
    model = tiny_model(char_tokenizer)
    data = {"train": tiny_data(char_tokenizer), "val": tiny_data(char_tokenizer, 3, offset=10)}
    pad = char_tokenizer.pad_token_id
    plain = compute_reference_table(model, data, 20, lambda ex: collate(ex, pad), batch_size=4)
    barred = compute_reference_table(model, data, 20, lambda ex: collate(ex, pad), batch_size=4, progress_bar=True)
    assert "reference pass: train" in sys.stderr.getvalue()  # a bar per split was drawn
    assert barred.train_keys == plain.train_keys and barred.entries.keys() == plain.entries.keys()
    for key, entry in plain.entries.items():
        torch.testing.assert_close(barred.entries[key]["label_prob"], entry["label_prob"])
