"""Sequence packing: the rows, the collated batch, and packed == unpacked (loss, statistics, gradients,
reference look-ups) on tiny models, with no attention crossing between packed conversations."""

import json
import math
import random

import lightning.pytorch as pl
import pytest
import torch

from conftest import TINY_LLAMA
from eaft_pl import ChatJsonlDataModule, EAFTModule
from eaft_pl.data.chat import Conversation, EncodedExample, collate, encode_conversation
from eaft_pl.data.packing import (
    check_packing_support,
    collate_packed,
    pack_examples,
    pack_lengths,
    packing_stats,
    sequence_ids,
    sequence_spans,
)
from eaft_pl.loss.gates import EAFTGate, EntropyMaskGate, SFTGate
from eaft_pl.reference import compute_reference_table, frozen_reference
from eaft_pl.loss.reference_gates import FLOWGate, StaticEAFTGate
from test_module import RECORDS, CaptureGrads

TINY_QWEN2 = dict(TINY_LLAMA, model_type="qwen2")

# ---- the rows ---------------------------------------------------------------------------------------


def test_best_fit_decreasing_on_a_hand_example():
    # Longest first: 5 opens row 0 (room 3), 4 opens row 1 (room 4), the first 3 fills row 0 (best
    # fit), the second 3 and the 1 go to row 1.
    assert pack_lengths([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]


def test_every_item_is_packed_once_within_capacity_and_deterministically():
    rng = random.Random(0)
    lengths = [min(512, int(20 * math.exp(rng.random() * 3.3))) for _ in range(500)]  # 20 .. 512, long-tailed
    rows = pack_lengths(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert pack_lengths(lengths, 512) == rows
    lower_bound = math.ceil(sum(lengths) / 512)
    assert len(rows) <= 11 / 9 * lower_bound + 1  # the guarantee of first/best-fit decreasing


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="item 1 has length 9"):
        pack_lengths([3, 9], 8)
    with pytest.raises(ValueError, match="max_length"):
        pack_lengths([1], 0)


# ---- the batch ----------------------------------------------------------------------------------------


def test_collated_rows_restart_positions_mask_first_labels_and_pad():
    a = EncodedExample([5, 6, 7], [5, 6, 7], "f:1")  # a first label that is not -100 must still be masked
    b = EncodedExample([8, 9], [8, 9], "f:2")
    c = EncodedExample([4], [-100], "f:3")
    batch = collate_packed([[a, b], [c]], pad_token_id=0, pad_to_multiple_of=4)
    assert set(batch) == {"input_ids", "labels", "position_ids", "sources"}  # no attention_mask: the padding-free path
    assert batch["sources"] == ["f:1", "f:2", "f:3"]  # every packed example, for error messages
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100], [-100] * 8]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 6]]
    # The padding is a sequence of its own, found by transformers' rule and by ours alike.
    from transformers.masking_utils import find_packed_sequence_indices

    ours = sequence_ids(batch["position_ids"])
    theirs = find_packed_sequence_indices(batch["position_ids"])
    assert torch.equal(ours - ours[:, :1], theirs)
    assert sequence_spans(batch["position_ids"]) == [[(0, 3), (3, 5), (5, 8)], [(0, 1), (1, 8)]]
    assert packing_stats([[a, b], [c]], 8).as_dict() == {"rows": 2, "examples": 3, "tokens": 6, "max_length": 8, "fill_ratio": 0.375}


# ---- packed == unpacked on a model ---------------------------------------------------------------------


def conversations(tokenizer, n=7, offset=0):
    """Distinct conversations of different lengths (so the packed rows mix them)."""
    convs = [
        Conversation(
            [{"role": "user", "content": f"q{i} " + "x" * (i % 5)}, {"role": "assistant", "content": f"answer {i} " + "ab" * (1 + i % 4)}],
            f"mem:{i}",
        )
        for i in range(offset, offset + n)
    ]
    return [encode_conversation(tokenizer, c, 96) for c in convs]


def per_example(values, batch):
    """``{input ids: (n,) values}``: the per-token values of a batch (in token_statistics' order)
    grouped by the conversation each token belongs to."""
    labels = batch["labels"]
    spans = sequence_spans(batch["position_ids"]) if "position_ids" in batch else [[(0, int(n))] for n in batch["attention_mask"].sum(1)]
    owners = []
    for b, row in enumerate(spans):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                s, e = next((s, e) for s, e in row if s <= t < e)
                owners.append(tuple(batch["input_ids"][b, s:e].tolist()))
    assert len(owners) == values.numel()
    out = {}
    for owner, value in zip(owners, values.tolist()):
        out.setdefault(owner, []).append(value)
    return {k: torch.tensor(v) for k, v in out.items()}


def assert_same_per_example(packed, unpacked, packed_batch, unpacked_batch):
    got, want = per_example(packed, packed_batch), per_example(unpacked, unpacked_batch)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def build_module(tokenizer_dir, config, gate, chunk_size=None, **options):
    torch.manual_seed(0)
    module = EAFTModule(model_config=config, tokenizer_name_or_path=str(tokenizer_dir), gate=gate, chunk_size=chunk_size, **options)
    module.configure_model()
    return module


def step(module, batch):
    """Statistics, weights, the token-normalised step loss and its gradients."""
    module.zero_grad()
    stats, weights, total = module.token_stats(batch)
    loss = total / stats.num_tokens
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return stats, weights, loss.detach(), grads


FROZEN = {"reference_source": "frozen"}


@pytest.mark.parametrize(
    "config, gate, chunk_size, options",
    [
        pytest.param(dict(TINY_LLAMA, attn_implementation="sdpa"), SFTGate(), None, {}, id="llama-sdpa-sft"),
        pytest.param(dict(TINY_LLAMA, attn_implementation="sdpa"), EAFTGate(), None, {}, id="llama-sdpa-eaft"),
        pytest.param(dict(TINY_LLAMA, attn_implementation="eager"), EAFTGate(), None, {}, id="llama-eager-eaft"),
        pytest.param(dict(TINY_LLAMA, attn_implementation="sdpa"), EAFTGate(), 7, {}, id="llama-sdpa-eaft-chunked"),
        pytest.param(dict(TINY_LLAMA, attn_implementation="sdpa"), EntropyMaskGate(0.3), 7, {}, id="llama-entropy-mask-chunked"),
        pytest.param(dict(TINY_QWEN2, attn_implementation="sdpa"), EAFTGate(), None, {}, id="qwen2-sdpa-eaft"),
        pytest.param(dict(TINY_QWEN2, attn_implementation="eager"), SFTGate(), 7, {}, id="qwen2-eager-sft-chunked"),
        # The frozen base on the packed row: FLOW's weight is each conversation's mean base CE, SFT-KL's
        # term the per-token KL to the base.
        pytest.param(TINY_LLAMA, FLOWGate(tau=1.0), None, FROZEN, id="flow-frozen"),
        pytest.param(TINY_LLAMA, SFTGate(), None, dict(FROZEN, reference_kl_coef=0.5), id="sft-kl-frozen"),
    ],
)
def test_packed_loss_statistics_and_gradients_equal_unpacked(tokenizer_dir, char_tokenizer, config, gate, chunk_size, options):
    module = build_module(tokenizer_dir, config, gate, chunk_size, **options)
    if options:  # a frozen copy of other weights than the trained ones, so the weights are not all 1
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    examples = conversations(char_tokenizer)
    # Unpacked, a first label is never a target; packed, it must not become one either.
    examples[2] = EncodedExample(examples[2].input_ids, [examples[2].input_ids[0]] + examples[2].labels[1:])
    pad = char_tokenizer.pad_token_id
    rows = pack_examples(examples, 96)
    assert 1 < len(rows) < len(examples) and any(len(row) > 1 for row in rows)
    packed_batch, unpacked_batch = collate_packed(rows, pad, pad_to_multiple_of=8), collate(examples, pad)
    packed, p_weights, p_loss, p_grads = step(module, packed_batch)
    unpacked, u_weights, u_loss, u_grads = step(module, unpacked_batch)
    assert packed.num_tokens == unpacked.num_tokens == sum(e.num_supervised for e in examples)
    for name in ("ce", "label_prob", "topk_entropy"):
        assert_same_per_example(getattr(packed, name).detach(), getattr(unpacked, name).detach(), packed_batch, unpacked_batch)
    assert_same_per_example(p_weights, u_weights, packed_batch, unpacked_batch)
    torch.testing.assert_close(p_loss, u_loss, rtol=1e-6, atol=1e-6)
    assert p_grads.keys() == u_grads.keys() and len(p_grads) > 0
    for name in u_grads:
        torch.testing.assert_close(p_grads[name], u_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_attention_does_not_cross_between_packed_conversations(tokenizer_dir, char_tokenizer):
    module = build_module(tokenizer_dir, TINY_LLAMA, SFTGate()).eval()
    a, b = conversations(char_tokenizer, 2)
    other = EncodedExample([(t * 13 + 5) % len(char_tokenizer) for t in a.input_ids], a.labels)  # A's tokens changed
    n = len(a.input_ids)
    with torch.no_grad():
        logits = {}
        for name, first in (("a", a), ("other", other)):
            batch = collate_packed([[first, b]], char_tokenizer.pad_token_id)
            logits[name] = module(batch["input_ids"], None, batch["position_ids"])[0]
            logits[name + "_crossing"] = module(batch["input_ids"])[0]  # one causal sequence: B sees A
        alone = module(torch.tensor([b.input_ids]))[0]
    assert (logits["a"][:n] - logits["other"][:n]).abs().max() > 1e-3  # A's own logits did change
    torch.testing.assert_close(logits["a"][n:], logits["other"][n:], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits["a"][n:], alone, rtol=1e-5, atol=1e-6)
    # The control: without restarting positions the same row lets B see A.
    assert (logits["a_crossing"][n:] - logits["other_crossing"][n:]).abs().max() > 1e-3


def test_an_attention_that_ignores_position_ids_is_refused(tokenizer_dir, char_tokenizer):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def causal_over_the_row(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)  # no mask: plain causal

    AttentionInterface.register("causal_over_the_row", causal_over_the_row)
    module = build_module(tokenizer_dir, dict(TINY_LLAMA, attn_implementation="causal_over_the_row"), SFTGate())
    check_packing_support(build_module(tokenizer_dir, TINY_LLAMA, SFTGate()).model)  # sdpa passes
    batch = collate_packed([conversations(char_tokenizer, 2)], char_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"data\.init_args\.packing: LlamaForCausalLM \(attn_implementation 'causal_over_the_row'\)"):
        module.token_stats(batch)


def test_an_attention_that_separates_sequences_only_in_one_row_needs_batch_size_one(tokenizer_dir, char_tokenizer):
    # What transformers' flash_attention_2 does: the boundaries come from the position ids only when
    # the batch has one row; with more rows it attends causally over each whole row.
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def varlen_in_one_row(module, query, key, value, attention_mask, position_ids=None, **kwargs):
        if query.shape[0] == 1 and position_ids is not None:
            seq = sequence_ids(position_ids)[0]
            mask = torch.ones(len(seq), len(seq), dtype=torch.bool).tril() & (seq[:, None] == seq[None, :])
            return sdpa_attention_forward(module, query, key, value, mask[None, None], **kwargs)
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("varlen_in_one_row", varlen_in_one_row)
    module = build_module(tokenizer_dir, dict(TINY_LLAMA, attn_implementation="varlen_in_one_row"), SFTGate())
    examples = conversations(char_tokenizer, 4)
    pad = char_tokenizer.pad_token_id
    one_row = collate_packed([examples], pad)
    packed, _, _ = module.token_stats(one_row)
    unpacked, _, _ = module.token_stats(collate(examples, pad))
    assert_same_per_example(packed.ce.detach(), unpacked.ce.detach(), one_row, collate(examples, pad))
    module._packing_checked = False  # as on a fresh run whose batches hold two rows
    with pytest.raises(ValueError, match=r"in a batch of one row but not of 2; set data\.init_args\.batch_size: 1"):
        module.token_stats(collate_packed([examples[:2], examples[2:]], pad))


# ---- the reference (base-model) statistics of packed batches --------------------------------------------


def test_reference_table_and_frozen_copy_look_up_each_packed_conversation(tokenizer_dir, char_tokenizer):
    model = build_module(tokenizer_dir, TINY_LLAMA, SFTGate()).model.eval()
    examples = conversations(char_tokenizer, 6)
    # A first label that is not -100 is masked in a packed row; the look-up must still find the example.
    examples[0] = EncodedExample(examples[0].input_ids, [examples[0].input_ids[0]] + examples[0].labels[1:])
    pad = char_tokenizer.pad_token_id
    table = compute_reference_table(model, {"train": examples}, 20, lambda ex: collate(ex, pad), batch_size=4)
    packed_batch, unpacked_batch = collate_packed(pack_examples(examples, 96), pad), collate(examples, pad)
    assert len(packed_batch["input_ids"]) < len(examples)

    def supervised(batch, values):  # the (N,) values at the label positions, in token_statistics' order
        keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
        keep[:, 1:] = batch["labels"][:, 1:] != -100
        return values[keep]

    want = table.batch_reference(unpacked_batch)
    cached = table.batch_reference(packed_batch)
    on_the_fly, _ = frozen_reference(model, packed_batch, 20)
    for name in ("topk_entropy", "label_prob", "sample_ce"):
        expected = supervised(unpacked_batch, want[name])
        assert not expected.isnan().any()
        for got in (cached, on_the_fly):
            assert_same_per_example(supervised(packed_batch, got[name]), expected, packed_batch, unpacked_batch)


# ---- through the DataModule and the Trainer --------------------------------------------------------------


def fit_one_step(train_file, tokenizer_dir, packing, batch_size, gate):
    pl.seed_everything(0)
    data = ChatJsonlDataModule(
        train_file=train_file, tokenizer_name_or_path=str(tokenizer_dir), max_length=256, batch_size=batch_size, packing=packing
    )
    module = CaptureGrads(
        model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), gate=gate, reference_cache_dir=None, learning_rate=1e-5
    )
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module.captured, data


@pytest.mark.parametrize("gate", [EAFTGate(), StaticEAFTGate()], ids=["eaft", "static-eaft-from-the-reference-table"])
def test_a_packed_training_step_equals_the_unpacked_one(tmp_path, tokenizer_dir, gate):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    unpacked, _ = fit_one_step(str(train_file), tokenizer_dir, False, len(RECORDS), gate)
    packed, data = fit_one_step(str(train_file), tokenizer_dir, True, 1, gate)  # all four chats in one row
    stats = data.summary["train"]["packing"]
    tokens = data.summary["train"]["tokens"]
    assert stats == {"rows": 1, "examples": 4, "tokens": tokens, "max_length": 256, "fill_ratio": round(tokens / 256, 4)}
    assert len(data.datasets["train"]) == 4 and len(data.packed_train) == 1  # the splits stay unpacked
    assert packed.keys() == unpacked.keys()
    for name in unpacked:
        torch.testing.assert_close(packed[name], unpacked[name], rtol=1e-4, atol=1e-7, msg=name)


def test_only_training_batches_are_packed(tmp_path, tokenizer_dir):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    data = ChatJsonlDataModule(
        train_file=str(path), val_file=str(path), tokenizer_name_or_path=str(tokenizer_dir), max_length=256, batch_size=2, packing=True
    )
    data.setup("fit")
    train = next(iter(data.train_dataloader()))
    assert set(train) == {"input_ids", "labels", "position_ids", "sources"} and len(train["input_ids"]) == 1
    assert set(next(iter(data.val_dataloader()))) == {"input_ids", "attention_mask", "labels", "sources"}
    assert "packing" not in data.summary["val"]
