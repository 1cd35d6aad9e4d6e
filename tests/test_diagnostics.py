"""The diagnostics' statistics against direct computations (loops, Counter, sorted lists) on small
tensors, and the training-diagnostics callback against the same numbers computed from the model."""

import json
import math
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger

from conftest import TINY_LLAMA
from eaft_pl import ChatJsonlDataModule, EAFTModule
from eaft_pl.data.chat import collate
from eaft_pl.analysis.statistics import PlaneAccumulator, PlaneGrid, bottom_quantile, conflict_shares, histogram2d, quantile_threshold, top_counts, weight_summary
from eaft_pl.loss.gates import EAFTGate
from eaft_pl.loss.stats import token_statistics
from eaft_pl.evaluation.diagnostics import DiagnosticsCallback

LN20 = math.log(20)


def spread_stats(seed=0, n_rows=6, vocab=40):
    """Token statistics whose entropies span [0, ln 20]: per-row temperatures from very sharp to flat."""
    g = torch.Generator().manual_seed(seed)
    temp = torch.exp(torch.randn(n_rows, 12, 1, generator=g) * 2.5)
    logits = torch.randn(n_rows, 12, vocab, generator=g) * 4 / temp
    labels = torch.randint(0, vocab, (n_rows, 12), generator=g)
    labels[:, :2] = -100
    return token_statistics(logits, labels, compute_grad_norm=True)


def test_histogram_bins_of_hand_picked_points_edges_included():
    # Edges exact in float64: p in quarters, H in halves of [0, 4].
    grid = PlaneGrid(h_max=4.0, p_bins=4, h_bins=8)
    points = [  # (p, H) -> (p bin, H bin), written out
        ((1.0, 4.0), (3, 7)),  # the upper edges themselves: the last bins
        ((0.0, 0.0), (0, 0)),
        ((0.25, 0.5), (1, 1)),  # on inner edges: the upper bins
        ((0.25 - 1e-12, 0.5 - 1e-12), (0, 0)),  # just below them: the lower bins
        ((0.6, 3.9), (2, 7)),
        ((1.5, 5.0), (3, 7)),  # out of range above: clamped into the last bins
        ((-0.1, -1.0), (0, 0)),  # and below: the first bins
        ((0.74, 2.2), (2, 4)),
        ((0.5, 1.99), (2, 3)),
    ]
    p = torch.tensor([pt[0][0] for pt in points], dtype=torch.float64)
    h = torch.tensor([pt[0][1] for pt in points], dtype=torch.float64)
    counts = histogram2d(p, h, grid)
    expected = torch.zeros(4, 8, dtype=torch.float64)
    expected[3, 7], expected[0, 0], expected[1, 1], expected[2, 7], expected[2, 4], expected[2, 3] = 2, 3, 1, 1, 1, 1
    assert torch.equal(counts, expected)
    values = torch.arange(len(points), dtype=torch.float64)  # value i at point i
    sums = torch.zeros(4, 8, dtype=torch.float64)
    sums[3, 7], sums[0, 0], sums[1, 1], sums[2, 7], sums[2, 4], sums[2, 3] = 0 + 5, 1 + 3 + 6, 2, 4, 7, 8
    assert torch.equal(histogram2d(p, h, grid, values), sums)
    assert grid.p_edges == [0.0, 0.25, 0.5, 0.75, 1.0] and grid.h_edges == [0.5 * i for i in range(9)]
    assert PlaneGrid(h_max=LN20, p_bins=4, h_bins=5).h_edges[-1] == pytest.approx(LN20)


def test_quantile_threshold_is_the_kth_smallest_value():
    x = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0, 8.0, 6.0, 10.0])
    assert quantile_threshold(x, 0.15) == 2.0  # ceil(1.5) = 2nd smallest
    assert quantile_threshold(x, 0.1) == 1.0
    assert quantile_threshold(x, 1.0) == 10.0
    assert quantile_threshold(x, 0.01) == 1.0  # never below the smallest
    mask, t = bottom_quantile(x, 0.3)
    assert t == 3.0 and mask.tolist() == [v <= 3.0 for v in x.tolist()]
    with pytest.raises(ValueError, match="quantile must lie in"):
        quantile_threshold(x, 0.0)
    with pytest.raises(ValueError, match="empty"):
        quantile_threshold(torch.tensor([]), 0.5)


def test_ties_at_zero_entropy_are_all_in_the_bottom_quantile():
    # Half the tokens are (near-)deterministic: entropy exactly 0 or fp32 noise around it.
    g = torch.Generator().manual_seed(0)
    zeros = torch.cat([torch.zeros(30), torch.rand(20, generator=g) * 1e-8])
    x = torch.cat([zeros, 0.2 + torch.rand(50, generator=g)])
    mask, t = bottom_quantile(x, 0.15)
    assert t <= 1e-8
    assert mask.sum() == 50  # the whole tied half, not an arbitrary 15 of it
    # With atol=0 the noise is no tie: only exact equals of the threshold are included.
    strict, t0 = bottom_quantile(x, 0.15, atol=0.0)
    assert strict.sum() == sum(v <= t0 for v in x.tolist())
    assert 15 <= strict.sum() < 50


def test_conflict_shares_match_direct_counts():
    stats = spread_stats(seed=1)
    p, hn = stats.label_prob, stats.norm_entropy
    out = conflict_shares(p, hn, quantile=0.2, max_norm_entropy=0.3, max_label_prob=0.05)
    n = p.numel()
    h_sorted, p_sorted = sorted(hn.tolist()), sorted(p.tolist())
    k = math.ceil(0.2 * n)
    h_t, p_t = h_sorted[k - 1], p_sorted[k - 1]
    both = sum(1 for pi, hi in zip(p.tolist(), hn.tolist()) if hi <= h_t + 1e-6 and pi <= p_t)
    absolute = sum(1 for pi, hi in zip(p.tolist(), hn.tolist()) if hi <= 0.3 and pi <= 0.05)
    assert out["tokens"] == n
    assert out["entropy_threshold"] == pytest.approx(h_t) and out["prob_threshold"] == pytest.approx(p_t)
    assert out["quantile_share"] == pytest.approx(both / n)
    assert out["absolute_share"] == pytest.approx(absolute / n)
    assert 0 < out["absolute_share"] < 1 and 0 < out["quantile_share"] <= 0.2
    # Sharp rows have entropies within 1e-6 of 0: tied with the threshold, so the share exceeds 20%.
    assert out["entropy_bottom_share"] == pytest.approx(sum(hi <= h_t + 1e-6 for hi in hn.tolist()) / n)
    # Label probabilities tie only when equal (no tolerance): exactly ceil(0.2 n) of distinct values.
    assert out["prob_bottom_share"] == pytest.approx(sum(pi <= p_t for pi in p.tolist()) / n)
    assert out["entropy_bottom_share"] > 0.2 and out["prob_bottom_share"] == pytest.approx(k / n)
    with pytest.raises(ValueError, match="no supervised tokens"):
        conflict_shares(torch.tensor([]), torch.tensor([]))


def test_no_tie_tolerance_on_label_probability_near_1e6():
    # Real data has label-probability thresholds around 1e-6 (toy world: 9.8e-7); an absolute 1e-6
    # tolerance would sweep in every p up to ~2e-6. Here the bottom 10% is p <= 1.0e-6 (10 tokens)
    # while 30 more tokens lie in (1e-6, 2e-6).
    p = torch.cat([
        torch.linspace(1e-7, 1e-6, 10, dtype=torch.float64),
        torch.linspace(1.1e-6, 1.9e-6, 30, dtype=torch.float64),
        torch.linspace(0.01, 0.9, 60, dtype=torch.float64),
    ])  # fmt: skip
    h = torch.zeros(100, dtype=torch.float64)  # all tied at H = 0: the entropy side selects everything
    out = conflict_shares(p, h, quantile=0.1, max_norm_entropy=0.17, max_label_prob=0.1)
    assert out["prob_threshold"] == pytest.approx(1e-6)
    assert out["prob_bottom_share"] == 0.10  # the old rule (p <= t + 1e-6) gave 0.40
    assert out["quantile_share"] == 0.10
    assert out["entropy_bottom_share"] == 1.0


def test_weight_summary_percentiles_match_a_sorted_list():
    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 7, 1001):
        w = torch.rand(n, generator=g, dtype=torch.float64)
        out = weight_summary(w, torch.ones(n, dtype=torch.float64))
        xs = sorted(w.tolist())
        for name, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
            pos = q * (n - 1)  # linear interpolation between the order statistics around q (n - 1)
            lo = int(pos)
            hi = min(lo + 1, n - 1)
            assert out[name] == pytest.approx(xs[lo] + (pos - lo) * (xs[hi] - xs[lo]), abs=1e-12), (n, name)
    w = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.75], dtype=torch.float64)  # sorted: 0, .25, .5, .75, 1
    out = weight_summary(w, torch.ones(5))
    assert (out["p10"], out["p50"], out["p90"]) == pytest.approx((0.1, 0.5, 0.9))


def test_accumulator_regions_match_direct_means_and_batches_add_up():
    grid = PlaneGrid(h_max=LN20, p_bins=5, h_bins=6)
    batches = [spread_stats(seed=s) for s in (2, 3, 4)]
    acc = PlaneAccumulator(grid, low_max=0.5, high_min=2.0, max_norm_entropy=0.2, max_label_prob=0.1)
    for s in batches:
        acc.update(s.label_prob, s.topk_entropy, s.norm_entropy, s.ce, EAFTGate()(s), s.logit_grad_norm)
    cat = lambda f: torch.cat([f(s) for s in batches]).double()  # noqa: E731
    h, ce, g, w = cat(lambda s: s.topk_entropy), cat(lambda s: s.ce.detach()), cat(lambda s: s.logit_grad_norm), cat(lambda s: s.norm_entropy)
    p, hn = cat(lambda s: s.label_prob), cat(lambda s: s.norm_entropy)
    m = acc.metrics()
    low, high = h <= 0.5, h >= 2.0
    conflict = (hn <= 0.2) & (p <= 0.1)
    assert low.sum() > 3 and high.sum() > 3 and conflict.sum() > 0  # the data covers every bucket
    assert m["ce_low_entropy"] == pytest.approx(ce[low].mean().item())
    assert m["ce_high_entropy"] == pytest.approx(ce[high].mean().item())
    assert m["ce_conflict"] == pytest.approx(ce[conflict].mean().item())
    assert m["share_low_entropy"] == pytest.approx(low.double().mean().item())
    assert m["grad_norm_all"] == pytest.approx(g.mean().item())
    assert m["grad_norm_weighted_high_entropy"] == pytest.approx((w * g)[high].mean().item())
    assert m["grad_norm_weighted_conflict"] < m["grad_norm_conflict"]  # EAFT shrinks the conflicts' gradient
    summary = acc.summary()
    assert sum(map(sum, summary["counts"])) == ce.numel()
    # Per-bin mean gradient: the sum of g over a bin's tokens divided by its count, None when empty.
    counts = histogram2d(p, h, grid)
    sums = histogram2d(p, h, grid, g)
    for i in range(5):
        for j in range(6):
            got = summary["mean_grad_norm"][i][j]
            assert (got is None) if counts[i, j] == 0 else got == pytest.approx((sums[i, j] / counts[i, j]).item())
    json.dumps(summary)  # JSON-ready
    # One batch at a time or all at once: the same sums; and the flat state round-trips.
    whole = PlaneAccumulator(grid, low_max=0.5, high_min=2.0, max_norm_entropy=0.2, max_label_prob=0.1)
    whole.update(p, h, hn, ce, w, g)
    torch.testing.assert_close(whole.state_tensor(), acc.state_tensor())
    whole.load_state_tensor(acc.state_tensor() * 2)
    assert whole.metrics()["ce_low_entropy"] == pytest.approx(m["ce_low_entropy"])
    with pytest.raises(ValueError, match="lies above"):
        PlaneAccumulator(grid, low_max=2.5, high_min=2.0)


def test_weight_summary_matches_direct_computation():
    w = torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0, 1.7])  # 1.7: normalizer=None can exceed 1
    ce = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    s = weight_summary(w, ce, bins=4)
    assert s["mean"] == pytest.approx(w.mean().item())
    assert s["ce_kept"] == pytest.approx((w * ce).sum().item() / ce.sum().item())
    assert s["counts"] == [2, 0, 1, 3]  # [0, .25): 0, .05; [.5, .75): .5; last: .95, 1.0, 1.7
    assert s["p50"] == pytest.approx(torch.quantile(w.double(), 0.5).item())


def test_top_counts_match_a_counter():
    keys = torch.tensor([3, 1, 3, 2, 3, 1, 5, 2, 2])
    flags = torch.tensor([1, 1, 1, 0, 0, 1, 0, 1, 1]).bool()
    flagged = Counter(k for k, f in zip(keys.tolist(), flags.tolist()) if f)
    total = Counter(keys.tolist())
    expected = sorted(flagged, key=lambda k: (-flagged[k], k))
    out = top_counts(keys, flags, k=10)
    assert [r["key"] for r in out] == expected == [1, 2, 3]
    assert all(r["flagged"] == flagged[r["key"]] and r["total"] == total[r["key"]] for r in out)
    assert len(top_counts(keys, flags, k=2)) == 2
    assert top_counts(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.bool)) == []


# ---- the callback in a real Trainer ---------------------------------------------------------------


RECORDS = [{"prompt": f"q{i}", "response": "the answer is " + "xyz"[i % 3] * (1 + i % 4)} for i in range(10)]


def test_callback_logs_what_a_direct_pass_over_the_validation_set_gives(tmp_path, tokenizer_dir):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    pl.seed_everything(0)
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir))
    data = ChatJsonlDataModule(train_file=str(path), val_file=str(path), tokenizer_name_or_path=str(tokenizer_dir), batch_size=3)
    # The direct pass first, so that the thresholds can sit inside this untrained model's (narrow,
    # near ln 20) entropy range and both buckets fill.
    data.setup("validate")
    module.configure_model()
    module.eval()
    with torch.no_grad():
        batch = collate(data.datasets["val"], data.pad_token_id)
        stats = token_statistics(module(batch["input_ids"], batch["attention_mask"]), batch["labels"], compute_grad_norm=True)
    h, ce = stats.topk_entropy.double(), stats.ce.double()
    low_max, high_min = torch.quantile(h, 0.3).item(), torch.quantile(h, 0.7).item()
    callback = DiagnosticsCallback(low_entropy_max=low_max, high_entropy_min=high_min, p_bins=4, h_bins=4)
    logger = MLFlowLogger(experiment_name="diag", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    trainer = pl.Trainer(
        logger=logger, callbacks=[callback], accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    logged = trainer.validate(module, datamodule=data)[0]

    low, high = h <= low_max, h >= high_min
    assert 0 < low.sum() < h.numel() and 0 < high.sum() < h.numel()
    assert logged["val/domain/ce_low_entropy"] == pytest.approx(ce[low].mean().item(), rel=1e-4)
    assert logged["val/domain/ce_high_entropy"] == pytest.approx(ce[high].mean().item(), rel=1e-4)
    assert logged["val/domain/share_low_entropy"] == pytest.approx(low.double().mean().item(), rel=1e-4)
    g, w = stats.logit_grad_norm.double(), stats.norm_entropy.double()
    assert logged["val/domain/grad_norm_weighted_all"] == pytest.approx((w * g).mean().item(), rel=1e-4)
    assert "val/domain/share_conflict" not in logged  # the module logs it as conflict_share

    (record,) = callback.history
    assert record["step"] == 0 and record["name"] == "domain"
    assert sum(map(sum, record["counts"])) == stats.num_tokens
    client, run_id = logger.experiment, logger.run_id
    files = {a.path for a in client.list_artifacts(run_id, "diagnostics/val_domain")}
    assert files == {"diagnostics/val_domain/step_000000.json", "diagnostics/val_domain/step_000000.png"}
    local = client.download_artifacts(run_id, "diagnostics/val_domain/step_000000.json", str(tmp_path))
    assert json.loads(open(local).read())["counts"] == record["counts"]


def test_disabled_callback_logs_nothing_and_leaves_the_module_alone(tmp_path, tokenizer_dir):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:3]))
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir))
    data = ChatJsonlDataModule(train_file=str(path), val_file=str(path), tokenizer_name_or_path=str(tokenizer_dir))
    callback = DiagnosticsCallback(enabled=False)
    trainer = pl.Trainer(logger=False, callbacks=[callback], accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(module, datamodule=data)[0]
    assert not module.eval_grad_norm and callback.history == []
    # The keys the enabled callback logs (ce_low_entropy, share_low_entropy, grad_norm_*): none here.
    assert not any("low_entropy" in k or "high_entropy" in k or "grad_norm" in k for k in logged)


def test_bad_thresholds_name_the_key():
    with pytest.raises(ValueError, match="diagnostics.low_entropy_max"):
        DiagnosticsCallback(low_entropy_max=3.0, high_entropy_min=2.0)
    with pytest.raises(ValueError, match="p_bins"):
        DiagnosticsCallback(p_bins=0)
