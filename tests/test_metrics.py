"""TokenStatsMetric against sums computed directly over the concatenated tokens."""

import math

import pytest
import torch

from eaft_pl.loss.gates import DFTGate, EAFTGate
from eaft_pl.loss.stats import token_statistics
from eaft_pl.loss.metrics import TokenStatsMetric, confident_conflicts


def batch(seed, vocab=40):
    g = torch.Generator().manual_seed(seed)
    temp = torch.exp(torch.randn(2, 9, 1, generator=g) * 2)
    logits = torch.randn(2, 9, vocab, generator=g) * 4 / temp
    labels = torch.randint(0, vocab, (2, 9), generator=g)
    labels[0, :3] = -100
    return logits, labels


def test_metric_is_the_token_weighted_mean_over_all_updates():
    gate = DFTGate()
    metric = TokenStatsMetric(conflict_max_norm_entropy=0.3, conflict_max_label_prob=0.2, full_entropy=True)
    all_stats, all_w = [], []
    for seed in (0, 1, 2):
        stats = token_statistics(*batch(seed), compute_full_entropy=True)
        w = gate(stats)
        metric.update(stats, w)
        all_stats.append(stats)
        all_w.append(w)
    cat = lambda f: torch.cat([f(s) for s in all_stats]).double()  # noqa: E731
    w = torch.cat(all_w).double()
    ce = cat(lambda s: s.ce.detach())
    n = ce.numel()
    out = metric.compute()
    assert out["tokens"].item() == n
    expected = {
        "ce": ce.mean(),
        "loss": (w * ce).sum() / n,
        "label_prob": cat(lambda s: s.label_prob).mean(),
        "topk_entropy": cat(lambda s: s.topk_entropy).mean(),
        "eaft_weight": cat(lambda s: s.topk_entropy).mean() / math.log(20),
        "weight": w.mean(),
        "full_entropy": cat(lambda s: s.full_entropy).mean(),
    }
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value.item(), rel=1e-5), key
    h = cat(lambda s: s.norm_entropy)
    p = cat(lambda s: s.label_prob)
    share = ((h <= 0.3) & (p <= 0.2)).double().mean().item()
    assert 0 < share < 1  # the batch holds both kinds, so the share is informative
    assert out["conflict_share"].item() == pytest.approx(share)


def test_confident_conflicts_on_handmade_tokens():
    # token 0: sure and right; 1: sure and wrong (conflict); 2: unsure and wrong.
    logits = torch.tensor([[[20.0, 0, 0, 0], [20.0, 0, 0, 0], [0.0, 0, 0, 0], [0.0, 0, 0, 0]]])
    labels = torch.tensor([[-100, 0, 1, 1]])
    stats = token_statistics(logits, labels)
    assert confident_conflicts(stats, 0.17, 0.1).tolist() == [False, True, False]


def test_metric_resets_and_refuses_missing_full_entropy():
    metric = TokenStatsMetric(full_entropy=True)
    stats = token_statistics(*batch(0))
    with pytest.raises(ValueError, match="full entropy"):
        metric.update(stats, EAFTGate()(stats))
    metric = TokenStatsMetric()
    metric.update(stats, EAFTGate()(stats))
    metric.reset()
    assert metric.compute()["tokens"].item() == 0
