"""The loss family: analytic values, the reference implementation, per-token definitions, gradients."""

import math

import pytest
import torch

from eaft_pl.loss.functional import dft_loss, eaft_loss, gated_loss, sft_loss
from eaft_pl.loss.gates import ConflictMaskGate, DFTGate, EAFTGate, EntropyMaskGate, Gate, SFTGate, SigmoidGate
from eaft_pl.loss.stats import full_entropy, reduce_weighted, token_statistics, topk_entropy
from eaft_pl.loss.reference_gates import EAFTStaticMaskGate, FLOWGate, StaticConflictMaskGate, StaticEAFTGate

from reference_llamafactory import lf_dft_loss_func, lf_eaft_loss_func


def random_batch(batch=3, time=11, vocab=50, seed=0, scale=3.0):
    """Logits with a spread of entropies and labels with prompt masking and right padding."""
    g = torch.Generator().manual_seed(seed)
    # Per-row temperature: some rows near-deterministic (low entropy), others flat.
    temp = torch.exp(torch.randn(batch, time, 1, generator=g) * 1.5)
    logits = torch.randn(batch, time, vocab, generator=g) * scale / temp
    labels = torch.randint(0, vocab, (batch, time), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    labels[2, :2] = -100
    return logits, labels


# ---- a direct, per-token computation in float64 python, independent of the vectorised code -------


def direct_tokens(logits, labels, k):
    """[(ce, p_label, H_topk, H_full)] for every supervised shifted token, computed one by one."""
    out = []
    b_, t_, _ = logits.shape
    for b in range(b_):
        for t in range(t_ - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            z = [float(v) for v in logits[b, t].double()]
            m = max(z)
            exps = [math.exp(v - m) for v in z]
            s = sum(exps)
            probs = [e / s for e in exps]
            top = sorted(z, reverse=True)[: min(k, len(z))]
            mt = max(top)
            te = [math.exp(v - mt) for v in top]
            ts = sum(te)
            tp = [e / ts for e in te]
            h_top = -sum(p * math.log(p) for p in tp if p > 0)
            h_full = -sum(p * math.log(p) for p in probs if p > 0)
            out.append((-math.log(probs[y]), probs[y], h_top, h_full))
    return out


def direct_loss(tokens, weight_fn):
    weights = weight_fn(tokens)
    return sum(w * t[0] for w, t in zip(weights, tokens)) / len(tokens)


def bottom_quantile_value(values, q):
    """The ceil(q*N)-th smallest value: the k-th order statistic the mask gates threshold at."""
    k = max(1, math.ceil(q * len(values)))
    return sorted(values)[k - 1]


K = 20
GATE_DEFINITIONS = {
    "sft": (SFTGate(), lambda toks: [1.0] * len(toks)),
    "eaft": (EAFTGate(), lambda toks: [t[2] / math.log(K) for t in toks]),
    "eaft_p2_lf": (EAFTGate(alpha=2.0, normalizer=3.0), lambda toks: [(t[2] / 3.0) ** 2 for t in toks]),
    "eaft_axolotl": (EAFTGate(normalizer=None), lambda toks: [t[2] for t in toks]),
    "eaft_alpha_half": (EAFTGate(alpha=0.5), lambda toks: [(t[2] / math.log(K)) ** 0.5 for t in toks]),
    "sigmoid": (
        SigmoidGate(),
        lambda toks: [1 / (1 + math.exp(-30 * (t[2] / math.log(K) - 0.17))) for t in toks],
    ),
    "entropy_mask": (
        EntropyMaskGate(0.15),
        lambda toks: [
            1.0 if t[2] > bottom_quantile_value([u[2] for u in toks], 0.15) else 0.0 for t in toks
        ],
    ),
    "conflict_mask": (
        ConflictMaskGate(0.15, 0.15),
        lambda toks: [
            0.0
            if t[2] <= bottom_quantile_value([u[2] for u in toks], 0.15)
            and t[1] <= bottom_quantile_value([u[1] for u in toks], 0.15)
            else 1.0
            for t in toks
        ],
    ),
    "dft": (DFTGate(), lambda toks: [t[1] for t in toks]),
}


@pytest.mark.parametrize("name", sorted(GATE_DEFINITIONS))
@pytest.mark.parametrize("seed", [0, 1])
def test_every_gate_matches_its_per_token_definition(name, seed):
    gate, definition = GATE_DEFINITIONS[name]
    logits, labels = random_batch(seed=seed)
    tokens = direct_tokens(logits, labels, K)
    expected = direct_loss(tokens, definition)
    got = gated_loss(logits, labels, gate, top_k=K)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_mask_gates_mask_a_nontrivial_share():
    # Guards the test above against a degenerate batch where a mask masks nothing.
    logits, labels = random_batch(batch=8, time=40)
    stats = token_statistics(logits, labels)
    masked = (EntropyMaskGate(0.15)(stats) == 0).float().mean().item()
    assert 0.1 < masked < 0.25
    conflicts = (ConflictMaskGate()(stats) == 0).sum().item()
    assert 0 < conflicts < stats.num_tokens * 0.15


def test_statistics_match_direct_computation():
    logits, labels = random_batch()
    tokens = direct_tokens(logits, labels, K)
    stats = token_statistics(logits, labels, top_k=K, compute_full_entropy=True)
    assert stats.num_tokens == len(tokens)
    for got, idx in ((stats.ce, 0), (stats.label_prob, 1), (stats.topk_entropy, 2), (stats.full_entropy, 3)):
        torch.testing.assert_close(got.double(), torch.tensor([t[idx] for t in tokens], dtype=torch.float64), rtol=1e-5, atol=1e-6)


# ---- analytic values ------------------------------------------------------------------------------


def test_uniform_logits_give_entropy_log_k_and_weight_one():
    vocab = 100
    logits = torch.zeros(2, 6, vocab)
    labels = torch.randint(0, vocab, (2, 6))
    stats = token_statistics(logits, labels, top_k=K)
    torch.testing.assert_close(stats.topk_entropy, torch.full_like(stats.topk_entropy, math.log(K)))
    torch.testing.assert_close(EAFTGate()(stats), torch.ones_like(stats.ce))
    # Weight 1 everywhere: EAFT is SFT, and SFT on uniform logits is ln V.
    assert eaft_loss(logits, labels).item() == pytest.approx(math.log(vocab), rel=1e-6)
    assert sft_loss(logits, labels).item() == pytest.approx(math.log(vocab), rel=1e-6)
    # LLaMA-Factory's divisor 3.0 gives the slightly smaller ln(20)/3.
    assert eaft_loss(logits, labels, normalizer=3.0).item() == pytest.approx(math.log(vocab) * math.log(20) / 3.0, rel=1e-6)


def test_alpha_zero_reproduces_sft_exactly():
    logits, labels = random_batch()
    logits.requires_grad_(True)
    a = eaft_loss(logits, labels, alpha=0.0)
    (ga,) = torch.autograd.grad(a, logits)
    b = sft_loss(logits, labels)
    (gb,) = torch.autograd.grad(b, logits)
    assert torch.equal(a, b)
    assert torch.equal(ga, gb)


def test_all_ones_gate_reproduces_cross_entropy():
    logits, labels = random_batch()
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(sft_loss(logits, labels), expected)


def test_dft_on_two_uniform_classes_is_half_the_cross_entropy():
    logits = torch.zeros(1, 5, 2)
    labels = torch.tensor([[0, 1, 0, 1, 1]])
    ce = math.log(2)
    assert dft_loss(logits, labels).item() == pytest.approx(ce / 2, rel=1e-6)


def test_top_k_is_clamped_to_tiny_vocabularies():
    logits = torch.zeros(1, 4, 5)  # vocabulary of 5 < K = 20
    labels = torch.tensor([[1, 2, 3, 4]])
    stats = token_statistics(logits, labels, top_k=20)
    assert stats.top_k == 5
    torch.testing.assert_close(stats.topk_entropy, torch.full((3,), math.log(5)))
    torch.testing.assert_close(EAFTGate()(stats), torch.ones(3))  # normalised by ln 5, not ln 20


def test_topk_entropy_of_a_one_hot_row_is_zero_and_handles_minus_inf():
    z = torch.full((2, 30), -float("inf"))
    z[:, 3] = 0.0
    torch.testing.assert_close(topk_entropy(z, 20), torch.zeros(2))
    torch.testing.assert_close(full_entropy(z), torch.zeros(2))


def extreme_batch(scale, dtype):
    """Logits of magnitude ``scale`` (clamped inside bf16's and fp32's range), labels, and base-model
    statistics as extreme: entropies 0, label probabilities 0, huge per-example losses."""
    torch.manual_seed(0)
    logits = (torch.randn(2, 8, 64) * scale).clamp(-3.3e38, 3.3e38).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 64, (2, 8))
    labels[:, :2] = -100
    zeros = torch.zeros(2, 8)
    reference = {"topk_entropy": zeros, "label_prob": zeros, "sample_ce": zeros + 1e30, "sample_ce_median": zeros + 1e30}
    return logits, labels, reference


EVERY_GATE = [
    SFTGate(), EAFTGate(), EAFTGate(alpha=2.0, normalizer=None), SigmoidGate(), EntropyMaskGate(), ConflictMaskGate(), DFTGate(),
    StaticEAFTGate(), StaticConflictMaskGate(), EAFTStaticMaskGate(), FLOWGate(), FLOWGate(tau=1e-3),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [1e4, 1e30, 3e38])
def test_extreme_logits_give_finite_statistics_and_weights_for_every_gate(scale, dtype):
    logits, labels, reference = extreme_batch(scale, dtype)
    stats = token_statistics(logits, labels, reference=reference, compute_full_entropy=True)
    for name in ("topk_entropy", "label_prob", "full_entropy"):
        assert torch.isfinite(getattr(stats, name)).all(), name
    assert ((stats.topk_entropy >= 0) & (stats.topk_entropy <= math.log(20) + 1e-5)).all()
    for gate in EVERY_GATE:
        weights = gate(stats)
        assert torch.isfinite(weights).all() and (weights >= 0).all(), gate
    # The gradient on the logits, softmax - onehot times the weight, is finite at every scale ...
    (grad,) = torch.autograd.grad((EAFTGate()(stats) * stats.ce).sum(), logits)
    assert torch.isfinite(grad).all()
    # ... and so is the loss while the CE fits in float32. At 3e38 the true CE of a label near -3e38
    # is about 6e38, above float32's maximum: the CE is inf, and the module skips such a step
    # (tests/test_numerics.py) instead of applying it.
    finite_ce = bool(torch.isfinite(stats.ce).all())
    assert finite_ce is (scale < 1e38)
    if finite_ce:
        for gate in EVERY_GATE:
            assert torch.isfinite(reduce_weighted(gate(stats), stats.ce)), gate


# ---- the reference implementation -------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("num_items", [None, 37])
def test_eaft_matches_llamafactory_values_and_gradients(alpha, num_items):
    logits, labels = random_batch(vocab=60)
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    ours = eaft_loss(ours_in, labels, alpha=alpha, normalizer=3.0, num_items_in_batch=num_items)
    ref = lf_eaft_loss_func(ref_in, labels, num_items_in_batch=num_items, alpha=alpha)
    if alpha >= 1:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    else:
        # H ** 0.5 has an unbounded slope at H = 0, so the fp32 rounding of near-zero entropies (7e-6
        # here) shows up at 1e-5 relative. Both are fp32; ours (log_softmax) is the more accurate one.
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
        toks = direct_tokens(logits, labels, K)
        exact = direct_loss(toks, lambda ts: [(t[2] / 3.0) ** alpha for t in ts])
        exact *= len(toks) / (num_items or len(toks))
        assert abs(ours.item() - exact) <= abs(ref.item() - exact)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-5 if alpha < 1 else 1e-8)


@pytest.mark.parametrize("num_items", [None, 37])
def test_dft_matches_llamafactory_values_and_gradients(num_items):
    logits, labels = random_batch(vocab=60, seed=3)
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    ours = dft_loss(ours_in, labels, num_items_in_batch=num_items)
    ref = lf_dft_loss_func(ref_in, labels, num_items_in_batch=num_items)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-8)


def test_bf16_logits_match_the_reference_on_the_same_values():
    logits, labels = random_batch(vocab=60)
    bf16 = logits.to(torch.bfloat16)
    ours = eaft_loss(bf16, labels, normalizer=3.0)
    ref = lf_eaft_loss_func(bf16, labels)  # it upcasts the (already rounded) values to fp32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_bf16_logits_get_the_fp32_gradient_rounded_once():
    logits, labels = random_batch(vocab=60)
    bf16 = logits.to(torch.bfloat16).requires_grad_(True)
    ref_in = bf16.detach().float().requires_grad_(True)
    eaft_loss(bf16, labels, normalizer=3.0).backward()
    lf_eaft_loss_func(ref_in, labels).backward()
    assert bf16.grad.dtype == torch.bfloat16
    # Within one bf16 ulp (2**-7 relative) of the fp32 gradient rounded: computed in fp32, rounded once.
    torch.testing.assert_close(bf16.grad.float(), ref_in.grad, rtol=2**-7, atol=1e-8)


@pytest.mark.parametrize("block", [1, 2, 5])
def test_runs_longer_than_a_block_and_prompt_gaps_give_the_same_values_and_gradients(monkeypatch, block):
    """The plain path walks runs of supervised rows in blocks; splitting them must change nothing."""
    import eaft_pl.loss.stats as losses

    logits, labels = random_batch(vocab=40, time=17, seed=4)
    labels[1, 6:9] = -100  # a second turn: two runs in one row
    ref_in = logits.clone().requires_grad_(True)
    ref = lf_eaft_loss_func(ref_in, labels)
    ref.backward()
    monkeypatch.setattr(losses, "ROW_BLOCK", block)
    ours_in = logits.clone().requires_grad_(True)
    ours = eaft_loss(ours_in, labels, normalizer=3.0)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-7)  # gradients are ~1e-2


def test_supervised_runs_split_consecutive_rows():
    from eaft_pl.loss.stats import supervised_runs

    index = torch.tensor([2, 3, 4, 5, 6, 9, 10, 14])
    assert supervised_runs(index, 2) == [(2, 0, 2), (4, 2, 2), (6, 4, 1), (9, 5, 2), (14, 7, 1)]
    assert supervised_runs(index, 100) == [(2, 0, 5), (9, 5, 2), (14, 7, 1)]
    assert supervised_runs(torch.tensor([], dtype=torch.long), 4) == []


# ---- gradients ----------------------------------------------------------------------------------


def test_weight_is_detached_gradient_is_weight_times_softmax_minus_onehot():
    logits, labels = random_batch()
    logits.requires_grad_(True)
    loss = eaft_loss(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    with torch.no_grad():
        stats = token_statistics(logits, labels)
        w = stats.topk_entropy / math.log(K)
        mask = labels[:, 1:] != -100
        probs = torch.softmax(logits[:, :-1][mask], -1)
        onehot = torch.nn.functional.one_hot(labels[:, 1:][mask], logits.shape[-1]).float()
        expected = torch.zeros_like(logits)
        expected[:, :-1][mask] = w[:, None] * (probs - onehot) / stats.num_tokens
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)


def test_a_gate_built_from_differentiable_stats_still_carries_no_gradient():
    class Leaky(Gate):
        def weights(self, stats):
            return stats.ce * 2  # ce carries gradient; the Gate wrapper must cut it

    logits, labels = random_batch()
    logits.requires_grad_(True)
    stats = token_statistics(logits, labels)
    w = Leaky()(stats)
    assert not w.requires_grad


# ---- reduction and edge cases -------------------------------------------------------------------


def test_num_items_in_batch_divides_the_weighted_sum():
    logits, labels = random_batch()
    n = token_statistics(logits, labels).num_tokens
    mean = eaft_loss(logits, labels)
    summed = eaft_loss(logits, labels, num_items_in_batch=1)
    torch.testing.assert_close(summed / n, mean)
    torch.testing.assert_close(eaft_loss(logits, labels, num_items_in_batch=torch.tensor(2 * n)), mean / 2)


def test_a_zero_count_returns_the_attached_zero_not_nan():
    logits = torch.randn(1, 4, 30, requires_grad=True)
    labels = torch.full((1, 4), -100)
    for count in (0, torch.tensor(0)):
        loss = eaft_loss(logits, labels, num_items_in_batch=count)
        assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="num_items_in_batch must be >= 0"):
        eaft_loss(logits, labels, num_items_in_batch=-1)


def test_the_last_position_and_the_first_label_are_never_used():
    logits, labels = random_batch(time=6)
    logits, labels = logits[:1], labels[:1].clone()
    labels[:] = -100
    labels[0, 0] = 5  # position 0's label has no logit predicting it
    stats = token_statistics(logits, labels)
    assert stats.num_tokens == 0
    labels[0, 5] = 7  # predicted by the logits at position 4
    stats = token_statistics(logits, labels)
    assert stats.num_tokens == 1
    expected = -torch.log_softmax(logits[0, 4], -1)[7]
    torch.testing.assert_close(stats.ce[0], expected)


@pytest.mark.parametrize("loss_fn", [sft_loss, eaft_loss, dft_loss])
def test_no_supervised_token_gives_an_attached_zero(loss_fn):
    logits = torch.randn(2, 5, 30, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = loss_fn(logits, labels)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_unbatched_inputs_are_accepted():
    logits, labels = random_batch()
    torch.testing.assert_close(eaft_loss(logits[0], labels[0]), eaft_loss(logits[:1], labels[:1]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 1}, "top_k must be an integer >= 2"),
        ({"alpha": -1.0}, "alpha must be >= 0"),
        ({"normalizer": "ln"}, "normalizer must be"),
        ({"normalizer": 0.0}, "normalizer must be positive"),
        ({"normalizer": True}, "normalizer must be"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    logits, labels = random_batch()
    with pytest.raises(ValueError, match=match):
        eaft_loss(logits, labels, **kwargs)


def test_bad_shapes_and_quantiles_raise():
    with pytest.raises(ValueError, match="disagree"):
        token_statistics(torch.zeros(2, 5, 10), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_statistics(torch.zeros(1, 3, 1), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="quantile"):
        EntropyMaskGate(1.5)


def test_logit_grad_norm_equals_the_norm_of_the_ce_gradient():
    logits, labels = random_batch(seed=3)
    stats = token_statistics(logits, labels, top_k=5, compute_grad_norm=True)
    z = logits[:, :-1][labels[:, 1:] != -100].detach().requires_grad_(True)
    y = labels[:, 1:][labels[:, 1:] != -100]
    grads = [torch.autograd.grad(torch.nn.functional.cross_entropy(z[i], y[i]), z)[0][i] for i in range(len(y))]
    expected = torch.stack([g.norm() for g in grads])
    torch.testing.assert_close(stats.logit_grad_norm, expected, atol=1e-5, rtol=1e-5)
