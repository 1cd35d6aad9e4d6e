"""The chunked loss equals the plain one: statistics, weights, loss and gradients, for every gate."""

import json

import lightning.pytorch as pl
import pytest
import torch

from conftest import TINY_LLAMA
from eaft_pl import ChatJsonlDataModule, EAFTModule
from eaft_pl.loss.chunked import LogitTransform, check_chunked_support, chunked_gated_loss, chunked_token_statistics
from eaft_pl.models.loading import build_causal_lm
from eaft_pl.loss.functional import gated_loss
from eaft_pl.loss.gates import ConflictMaskGate, DFTGate, EAFTGate, EntropyMaskGate, SFTGate, SigmoidGate
from eaft_pl.loss.stats import token_statistics

GATES = {
    "sft": SFTGate(),
    "eaft": EAFTGate(),
    "eaft_p2": EAFTGate(alpha=2.0, normalizer=3.0),
    "sigmoid": SigmoidGate(),
    "entropy_mask": EntropyMaskGate(0.3),
    "conflict_mask": ConflictMaskGate(0.4, 0.4),
    "dft": DFTGate(),
}


def inputs(batch=3, time=13, hidden=8, vocab=37, bias=False, seed=0):
    """Hidden states, an LM head with a spread of logit scales, and labels with prompts and padding."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, time, hidden, generator=g)
    h = h * torch.exp(torch.randn(batch, time, 1, generator=g))  # some confident rows, some flat
    w = torch.randn(vocab, hidden, generator=g)
    b = torch.randn(vocab, generator=g) if bias else None
    labels = torch.randint(0, vocab, (batch, time), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[1, -4:] = -100  # padding
    labels[2, :2] = -100
    return h, w, b, labels


def apply_transform(z, transform):
    z = z * transform.scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    return z


def plain(h, w, b, labels, gate, top_k=20, transform=LogitTransform(), grad_norm=False):
    """The reference: full logits, then eaft-pl's plain statistics, gate and weighted sum."""
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    logits = apply_transform(torch.nn.functional.linear(h, w, b), transform)
    stats = token_statistics(logits, labels, top_k=top_k, compute_full_entropy=True, compute_grad_norm=grad_norm)
    weights = gate(stats)
    total = (weights * stats.ce).sum()
    (1.7 * total).backward()  # a non-unit incoming gradient must reach the stored gradients
    return stats, weights, total, [t.grad for t in (h, w, b) if t is not None]


def chunked(h, w, b, labels, gate, chunk_size, top_k=20, transform=LogitTransform(), grad_norm=False):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    stats, weights, total = chunked_token_statistics(
        h, w, labels, gate, bias=b, top_k=top_k, chunk_size=chunk_size, transform=transform,
        compute_full_entropy=True, compute_grad_norm=grad_norm,
    )
    (1.7 * total).backward()
    return stats, weights, total, [t.grad for t in (h, w, b) if t is not None]


def assert_same(ref, got, atol=1e-5, rtol=1e-5):
    (s1, w1, t1, g1), (s2, w2, t2, g2) = ref, got
    for name in ("ce", "label_prob", "topk_entropy", "full_entropy"):
        torch.testing.assert_close(getattr(s2, name), getattr(s1, name).detach(), atol=atol, rtol=rtol, msg=name)
    assert s1.top_k == s2.top_k
    torch.testing.assert_close(w2, w1, atol=atol, rtol=rtol)
    torch.testing.assert_close(t2, t1, atol=atol, rtol=rtol)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol)


@pytest.mark.parametrize("gate", GATES, ids=str)
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_every_gate_matches_the_plain_path(gate, chunk_size):
    h, w, b, labels = inputs(bias=True)
    assert_same(plain(h, w, b, labels, GATES[gate]), chunked(h, w, b, labels, GATES[gate], chunk_size))


@pytest.mark.parametrize("gate", ["eaft", "conflict_mask"])
def test_a_vocabulary_smaller_than_k_clamps_k(gate):
    h, w, b, labels = inputs(vocab=6, seed=1)
    ref, got = plain(h, w, b, labels, GATES[gate]), chunked(h, w, b, labels, GATES[gate], 5)
    assert got[0].top_k == 6
    assert_same(ref, got)


@pytest.mark.parametrize("transform", [LogitTransform(scale=0.25), LogitTransform(softcap=3.0), LogitTransform(scale=2.0, softcap=5.0)])
def test_scaled_and_soft_capped_logits(transform):
    h, w, b, labels = inputs(seed=2)
    gate = GATES["eaft"]
    assert_same(plain(h, w, b, labels, gate, transform=transform), chunked(h, w, b, labels, gate, 4, transform=transform))


def test_the_gradient_norm_statistic_matches():
    h, w, b, labels = inputs(seed=3)
    ref = plain(h, w, b, labels, GATES["sft"], grad_norm=True)
    got = chunked(h, w, b, labels, GATES["sft"], 6, grad_norm=True)
    torch.testing.assert_close(got[0].logit_grad_norm, ref[0].logit_grad_norm, atol=1e-5, rtol=1e-5)


def test_without_grad_the_statistics_are_the_same_and_nothing_is_differentiable():
    h, w, b, labels = inputs(seed=4)
    ref = plain(h, w, b, labels, GATES["eaft"])
    with torch.no_grad():
        stats, weights, total = chunked_token_statistics(h.requires_grad_(True), w, labels, GATES["eaft"], chunk_size=5)
    assert not total.requires_grad
    torch.testing.assert_close(total, ref[2].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref[1])


def test_no_supervised_token_gives_an_attached_zero_and_zero_gradients():
    h, w, _, labels = inputs(seed=5)
    labels[:] = -100
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    stats, _, total = chunked_token_statistics(hh, ww, labels, GATES["eaft"], chunk_size=4)
    assert stats.num_tokens == 0 and total.item() == 0.0
    total.backward()
    assert torch.count_nonzero(ww.grad) == 0 and torch.count_nonzero(hh.grad) == 0


def test_only_the_tensors_that_need_gradients_get_them():
    """A frozen LM head (LoRA) gets no gradient and costs no (V, H) buffer."""
    h, w, _, labels = inputs(seed=6)
    hh = h.clone().requires_grad_(True)
    _, _, total = chunked_token_statistics(hh, w, labels, GATES["eaft"], chunk_size=4)
    total.backward()
    assert hh.grad is not None and w.grad is None
    ref = plain(h, w, None, labels, GATES["eaft"])
    torch.testing.assert_close(1.7 * hh.grad, ref[3][0], atol=1e-5, rtol=1e-5)


def test_chunked_gated_loss_divides_like_gated_loss():
    h, w, _, labels = inputs(seed=7)
    logits = h @ w.T
    for count in (None, 50, torch.tensor(50)):
        expected = gated_loss(logits, labels, GATES["dft"], num_items_in_batch=count)
        got = chunked_gated_loss(h, w, labels, GATES["dft"], chunk_size=3, num_items_in_batch=count)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_matches_the_plain_path_under_the_same_autocast():
    h, w, _, labels = inputs(hidden=16, vocab=64, seed=8)
    gate = GATES["eaft"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain(h, w, None, labels, gate)
        got = chunked(h, w, None, labels, gate, 5)
    assert got[3][0].dtype == torch.float32 and got[3][1].dtype == torch.float32  # grads in the params' dtype
    # Both paths take the same bf16 logits (one bf16 matmul per row); the gradient matmuls round differently.
    assert_same(ref, got, atol=2e-2, rtol=2e-2)


def test_bf16_weights_train_close_to_fp32():
    h, w, _, labels = inputs(hidden=16, vocab=64, seed=9)
    gate = GATES["eaft"]
    ref = plain(h, w, None, labels, gate)
    got = chunked(h.bfloat16(), w.bfloat16(), None, labels, gate, 5)
    assert got[3][1].dtype == torch.bfloat16
    torch.testing.assert_close(got[2].float(), ref[2], rtol=3e-2, atol=0.1)
    for a, b in zip(ref[3], got[3]):
        torch.testing.assert_close(b.float(), a, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"chunk_size": 0}, "chunk_size"), ({"chunk_size": 2.5}, "chunk_size"), ({"top_k": 1}, "top_k")],
)
def test_bad_options_are_refused(kwargs, match):
    h, w, _, labels = inputs()
    with pytest.raises(ValueError, match=match):
        chunked_token_statistics(h, w, labels, SFTGate(), **kwargs)


def test_mismatched_shapes_are_refused():
    h, w, _, labels = inputs()
    with pytest.raises(ValueError, match="hidden size"):
        chunked_token_statistics(h, w[:, :3], labels, SFTGate())
    with pytest.raises(ValueError, match="disagree"):
        chunked_token_statistics(h[:, :-1], w, labels, SFTGate())


# ---- the module on real architectures ---------------------------------------------------------------

ARCHITECTURES = {
    "llama": TINY_LLAMA,
    "qwen2": {**TINY_LLAMA, "model_type": "qwen2"},  # q/k/v biases
    "llama_tied": {**TINY_LLAMA, "tie_word_embeddings": True},
    "gemma2": {  # soft-capped logits, scaled embeddings, tied head
        "model_type": "gemma2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256,
        "final_logit_softcapping": 2.0,
    },
}

RECORDS = [
    {"prompt": "what is two plus two", "response": "four"},
    {"prompt": "b", "response": "a longer answer than the first one"},
    {"prompt": "name a colour", "response": "red"},
]


def step_grads(tokenizer_dir, train_file, config, chunk_size, gate):
    pl.seed_everything(0)

    class Capture(EAFTModule):
        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            self.captured = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}

        def on_train_start(self):
            super().on_train_start()
            self.head_calls = 0

            def count(*_):
                self.head_calls += 1

            self.model.get_output_embeddings().register_forward_hook(count)

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.losses.append(loss.detach())
            return loss

    module = Capture(model_config=config, tokenizer_name_or_path=str(tokenizer_dir), gate=gate, chunk_size=chunk_size)
    module.losses = []
    data = ChatJsonlDataModule(train_file=train_file, tokenizer_name_or_path=str(tokenizer_dir), batch_size=3)
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(module, datamodule=data)
    return module


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("gate", ["eaft", "conflict_mask"])
def test_the_module_trains_identically_with_chunks(tmp_path, tokenizer_dir, arch, gate):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    ref = step_grads(tokenizer_dir, str(train_file), ARCHITECTURES[arch], None, GATES[gate])
    got = step_grads(tokenizer_dir, str(train_file), ARCHITECTURES[arch], 7, GATES[gate])
    torch.testing.assert_close(got.losses[0], ref.losses[0], rtol=1e-5, atol=1e-6)
    assert got.captured.keys() == ref.captured.keys()
    for name in ref.captured:
        torch.testing.assert_close(got.captured[name], ref.captured[name], rtol=1e-4, atol=1e-6, msg=name)
    assert ref.head_calls == 1 and got.head_calls == 0  # the chunked path never runs the head on the sequence
    if arch == "gemma2":
        assert got.logit_transform.softcap == 2.0


def test_a_model_whose_logits_are_not_its_head_is_refused(char_tokenizer):
    model = build_causal_lm(TINY_LLAMA, char_tokenizer)
    original = model.forward

    def doubled(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    with pytest.raises(ValueError, match="LlamaForCausalLM.*not supported by the chunked loss"):
        check_chunked_support(model, LogitTransform())
    assert model.training  # the check restores the mode it found


def test_the_module_refuses_a_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path="x", chunk_size=0)
