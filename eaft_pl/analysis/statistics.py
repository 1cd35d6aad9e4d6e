"""Pure statistics of the (label probability, entropy) plane: the numbers behind the paper's pictures.

Every function takes per-token tensors of the supervised tokens (as in
:class:`~eaft_pl.loss.stats.TokenStats`) and returns plain tensors or dicts; nothing here knows about
Lightning, MLflow or matplotlib, so the training callback, ``eaft-pl analyze`` and the tests share
one implementation.

- :func:`histogram2d`: counts (or sums of a value) on a fixed (p, H) grid: Fig. 1b and, with the
  logit-gradient norm as the value, Fig. 3's gradient landscape.
- :func:`region_masks`: low-entropy, high-entropy and conflict tokens, whose unweighted CE is Fig. 4.
- :func:`conflict_shares`: the share of confident conflicts by quantile thresholds (the pilot
  study's bottom 15% of both) and by absolute thresholds.
- :func:`weight_summary`: how much of the SFT signal a gate keeps.
- :func:`top_counts`: the most frequent conflict tokens and the conversations holding most of them.
- :class:`PlaneAccumulator`: the sums of all of the above over many batches (one validation).
- :func:`pearson`, :func:`spearman`, :func:`topk_agreement`: how closely the top-K entropy tracks
  the full-vocabulary entropy (the paper's Fig. 6).

**Tie rule of the quantile thresholds.** A token is in the bottom ``q`` of a statistic when its value
is at most the threshold ``t``, the ``ceil(q * n)``-th smallest value, plus ``atol``. Every token tied
with the threshold is in, none is split from its equals by position, so the realised share can exceed
``q``: when half the tokens have entropy 0, the "bottom 15%" of entropy is that half. ``atol`` (1e-6
by default) counts fp32 rounding noise around the threshold as a tie, since near-deterministic rows
have entropies like 1e-9 instead of 0; without it the quantile would pick an arbitrary sliver of
them (the toy-world study saw it pick 0.9% of the tokens, all one symbol). :func:`conflict_shares`
applies ``atol`` to the entropy only: the label-probability threshold itself is often ~1e-6, so an
absolute tolerance there would sweep in every token below ~2e-6; label probabilities tie only when
exactly equal (``atol=0``). The realised shares are reported next to the thresholds so the effect
is visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from eaft_pl.loss.conflict import CONFLICT_MAX_LABEL_PROB, CONFLICT_MAX_NORM_ENTROPY, confident_conflict_mask

__all__ = [
    "PlaneGrid",
    "histogram2d",
    "quantile_threshold",
    "bottom_quantile",
    "conflict_shares",
    "weight_summary",
    "top_counts",
    "REGIONS",
    "region_masks",
    "PlaneAccumulator",
    "average_ranks",
    "pearson",
    "spearman",
    "topk_agreement",
]


@dataclass(frozen=True)
class PlaneGrid:
    """A fixed grid on the (label probability, entropy) plane.

    Attributes:
        h_max: Upper end of the entropy axis in nats (``ln K`` for top-K entropy).
        p_bins: Bins of label probability on ``[0, 1]``.
        h_bins: Bins of entropy on ``[0, h_max]``.
    """

    h_max: float
    p_bins: int = 20
    h_bins: int = 20

    def __post_init__(self) -> None:
        if not self.h_max > 0:
            raise ValueError(f"h_max must be > 0, got {self.h_max}")
        if self.p_bins < 1 or self.h_bins < 1:
            raise ValueError(f"p_bins and h_bins must be >= 1, got {self.p_bins} and {self.h_bins}")

    @property
    def p_edges(self) -> List[float]:
        return [i / self.p_bins for i in range(self.p_bins + 1)]

    @property
    def h_edges(self) -> List[float]:
        return [self.h_max * i / self.h_bins for i in range(self.h_bins + 1)]


def _bin(x: Tensor, n: int, upper: float) -> Tensor:
    # Half-open bins [lo, hi); the upper edge itself (p = 1, H = ln K) belongs to the last bin and
    # out-of-range values are clamped, so every token is counted exactly once.
    return torch.floor(x.double() / upper * n).long().clamp(0, n - 1)  # (N,)


def histogram2d(label_prob: Tensor, entropy: Tensor, grid: PlaneGrid, values: Optional[Tensor] = None) -> Tensor:
    """Per bin of ``grid``, the number of tokens (or the sum of ``values`` over them).

    Args:
        label_prob: ``(N,)`` label probabilities.
        entropy: ``(N,)`` entropies in nats.
        grid: The bins.
        values: Optional ``(N,)`` per-token values to sum instead of counting.

    Returns:
        ``(p_bins, h_bins)`` float64 tensor; row i is the i-th probability bin.
    """
    pi = _bin(label_prob, grid.p_bins, 1.0)
    hi = _bin(entropy, grid.h_bins, grid.h_max)
    flat = pi * grid.h_bins + hi  # (N,)
    weights = torch.ones_like(flat, dtype=torch.float64) if values is None else values.double()
    out = torch.zeros(grid.p_bins * grid.h_bins, dtype=torch.float64, device=flat.device)
    return out.index_add_(0, flat, weights).view(grid.p_bins, grid.h_bins)


def quantile_threshold(x: Tensor, q: float) -> float:
    """The ``ceil(q * n)``-th smallest value of ``x`` (at least the smallest); see the tie rule in the
    module docstring."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must lie in (0, 1], got {q!r}")
    if x.numel() == 0:
        raise ValueError("no tokens: a quantile of an empty set is undefined")
    k = max(1, min(x.numel(), math.ceil(q * x.numel())))
    # kthvalue is exact and has no size limit (torch.quantile refuses more than 16M elements).
    return float(torch.kthvalue(x.double().flatten(), k).values)


def bottom_quantile(x: Tensor, q: float, atol: float = 1e-6) -> Tuple[Tensor, float]:
    """Boolean mask of the tokens in the bottom ``q`` of ``x`` (ties included) and the threshold."""
    t = quantile_threshold(x, q)
    return x.double() <= t + atol, t


def conflict_shares(
    label_prob: Tensor,
    norm_entropy: Tensor,
    *,
    quantile: float = 0.15,
    max_norm_entropy: float = CONFLICT_MAX_NORM_ENTROPY,
    max_label_prob: float = CONFLICT_MAX_LABEL_PROB,
    atol: float = 1e-6,
) -> Dict[str, float]:
    """Share of confident conflicts under two definitions.

    - ``quantile``: both the normalised entropy and the label probability are in their bottom
      ``quantile`` (the pilot study's rule, Sec. 3.2), thresholds taken over these tokens with the
      tie rule of the module docstring (``atol`` on the entropy only; label probabilities tie only
      when equal).
    - ``absolute``: ``norm_entropy <= max_norm_entropy`` and ``label_prob <= max_label_prob`` (the
      rule of :func:`eaft_pl.loss.metrics.confident_conflicts`).

    Returns:
        ``quantile_share``, ``absolute_share``, the thresholds (``entropy_threshold``,
        ``prob_threshold``), the realised shares of each bottom set (``entropy_bottom_share``,
        ``prob_bottom_share``; above ``quantile`` when ties were included) and ``tokens``.
    """
    n = label_prob.numel()
    if n != norm_entropy.numel():
        raise ValueError(f"label_prob has {n} tokens but norm_entropy has {norm_entropy.numel()}")
    if n == 0:
        raise ValueError("no supervised tokens: conflict shares are undefined")
    low_h, h_t = bottom_quantile(norm_entropy, quantile, atol)
    # No tolerance on p: its threshold is itself ~1e-6 on real data (see the module docstring).
    low_p, p_t = bottom_quantile(label_prob, quantile, 0.0)
    absolute = confident_conflict_mask(norm_entropy, label_prob, max_norm_entropy, max_label_prob)
    return {
        "quantile_share": float((low_h & low_p).double().mean()),
        "absolute_share": float(absolute.double().mean()),
        "entropy_threshold": h_t,
        "prob_threshold": p_t,
        "entropy_bottom_share": float(low_h.double().mean()),
        "prob_bottom_share": float(low_p.double().mean()),
        "tokens": float(n),
    }


def _percentiles(x: Tensor, qs: Tuple[float, ...]) -> List[float]:
    """Linearly interpolated percentiles (``torch.quantile``'s default rule) from one sort: exact and,
    unlike ``torch.quantile``, with no 16M-element limit."""
    s = torch.sort(x).values
    last = s.numel() - 1
    out = []
    for q in qs:
        pos = q * last
        lo = math.floor(pos)
        hi = min(lo + 1, last)
        out.append(float(s[lo] + (pos - lo) * (s[hi] - s[lo])))
    return out


def weight_summary(weights: Tensor, ce: Tensor, bins: int = 10) -> Dict[str, Any]:
    """How much of the SFT signal a gate keeps.

    Returns ``mean`` (mean weight: the share of SFT's per-token signal kept), ``ce_kept``
    (``sum(w * CE) / sum(CE)``: the share of SFT's loss kept), the 10th/50th/90th percentiles and a
    histogram of ``bins`` equal bins on ``[0, 1]`` (weights above 1, possible with
    ``normalizer=None``, fall in the last bin).
    """
    if weights.numel() == 0:
        raise ValueError("no supervised tokens: the weight distribution is undefined")
    w, c = weights.detach().double(), ce.detach().double()
    counts = torch.bincount(_bin(w, bins, 1.0), minlength=bins)
    q = _percentiles(w.flatten(), (0.1, 0.5, 0.9))
    return {
        "mean": float(w.mean()),
        "ce_kept": float((w * c).sum() / c.sum()) if float(c.sum()) > 0 else float("nan"),
        "p10": q[0],
        "p50": q[1],
        "p90": q[2],
        "edges": [i / bins for i in range(bins + 1)],
        "counts": counts.tolist(),
    }


def top_counts(keys: Tensor, flags: Tensor, k: int = 20) -> List[Dict[str, int]]:
    """The ``k`` keys (token ids, or conversation indices) with the most flagged tokens.

    Returns ``[{"key", "flagged", "total"}, ...]`` sorted by ``flagged`` (then key), with ``total`` the
    number of tokens of that key, flagged or not. Keys with no flagged token are left out.
    """
    if keys.shape != flags.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and flags {tuple(flags.shape)} disagree")
    keys = keys.long().cpu()
    size = int(keys.max()) + 1 if keys.numel() else 0
    flagged = torch.bincount(keys[flags.cpu().bool()], minlength=size)
    total = torch.bincount(keys, minlength=size)
    order = sorted((i for i in range(size) if flagged[i] > 0), key=lambda i: (-int(flagged[i]), i))
    return [{"key": i, "flagged": int(flagged[i]), "total": int(total[i])} for i in order[:k]]


#: Regions of the plane the gradient proxy is reported on.
REGIONS = ("all", "conflict", "low_entropy", "high_entropy")


def region_masks(
    label_prob: Tensor,
    entropy: Tensor,
    norm_entropy: Tensor,
    *,
    low_max: float = 0.5,
    high_min: float = 2.0,
    max_norm_entropy: float = CONFLICT_MAX_NORM_ENTROPY,
    max_label_prob: float = CONFLICT_MAX_LABEL_PROB,
) -> Dict[str, Tensor]:
    """Boolean masks of :data:`REGIONS`: every token, the confident conflicts (absolute thresholds),
    low-entropy and high-entropy tokens (nats)."""
    return {
        "all": torch.ones_like(label_prob, dtype=torch.bool),
        "conflict": confident_conflict_mask(norm_entropy, label_prob, max_norm_entropy, max_label_prob),
        "low_entropy": entropy <= low_max,
        "high_entropy": entropy >= high_min,
    }


@dataclass
class PlaneAccumulator:
    """Sums over the tokens of many batches (a whole validation set), from which
    :meth:`summary` derives the diagnostics: the (p, H) histogram, the gradient landscape, the
    bucketed CE and the gradient proxy by region.

    The gradient proxy is the norm of the CE gradient on the logits, ``g = ||softmax(z) - e_y||``
    (:func:`eaft_pl.loss.stats.logit_grad_norm`), for SFT, and ``w * g`` for the active gate.

    Attributes:
        grid: The histogram's bins (entropy in nats).
        low_max: Upper bound (nats) of the low-entropy bucket.
        high_min: Lower bound (nats) of the high-entropy bucket.
        max_norm_entropy: Absolute conflict threshold on ``H / ln K``.
        max_label_prob: Absolute conflict threshold on the label probability.
    """

    grid: PlaneGrid
    low_max: float = 0.5
    high_min: float = 2.0
    max_norm_entropy: float = CONFLICT_MAX_NORM_ENTROPY
    max_label_prob: float = CONFLICT_MAX_LABEL_PROB
    sums: Dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.low_max > self.high_min:
            raise ValueError(f"low_entropy_max {self.low_max} lies above high_entropy_min {self.high_min}")
        self.reset()

    def reset(self) -> None:
        shape = (self.grid.p_bins, self.grid.h_bins)
        n = len(REGIONS)
        self.sums = {
            "counts": torch.zeros(shape, dtype=torch.float64),
            "grad": torch.zeros(shape, dtype=torch.float64),
            "grad_weighted": torch.zeros(shape, dtype=torch.float64),
            "region_tokens": torch.zeros(n, dtype=torch.float64),
            "region_ce": torch.zeros(n, dtype=torch.float64),
            "region_grad": torch.zeros(n, dtype=torch.float64),
            "region_grad_weighted": torch.zeros(n, dtype=torch.float64),
        }

    def update(
        self, label_prob: Tensor, entropy: Tensor, norm_entropy: Tensor, ce: Tensor, weights: Tensor, grad_norm: Tensor
    ) -> None:
        """Add a batch of per-token ``(N,)`` statistics (moved to CPU: the sums are tiny)."""
        p, h, hn = label_prob.detach().cpu(), entropy.detach().cpu(), norm_entropy.detach().cpu()
        c, w, g = ce.detach().cpu().double(), weights.detach().cpu().double(), grad_norm.detach().cpu().double()
        s = self.sums
        s["counts"] += histogram2d(p, h, self.grid)
        s["grad"] += histogram2d(p, h, self.grid, g)
        s["grad_weighted"] += histogram2d(p, h, self.grid, w * g)
        masks = region_masks(
            p, h, hn, low_max=self.low_max, high_min=self.high_min,
            max_norm_entropy=self.max_norm_entropy, max_label_prob=self.max_label_prob,
        )  # fmt: skip
        for i, name in enumerate(REGIONS):
            m = masks[name]
            s["region_tokens"][i] += m.sum()
            s["region_ce"][i] += c[m].sum()
            s["region_grad"][i] += g[m].sum()
            s["region_grad_weighted"][i] += (w * g)[m].sum()

    def metrics(self) -> Dict[str, float]:
        """Scalars to log (names without a prefix); a region with no token is left out.

        ``ce_<region>`` (unweighted CE: Fig. 4 for the entropy buckets), ``share_<region>`` (share of
        the tokens), ``grad_norm_<region>`` (mean ``g``, SFT) and ``grad_norm_weighted_<region>``
        (mean ``w * g``, the active gate).
        """
        s = self.sums
        total = float(s["region_tokens"][0])
        out: Dict[str, float] = {}
        for i, name in enumerate(REGIONS):
            n = float(s["region_tokens"][i])
            if n == 0:
                continue
            if name != "all":
                out[f"ce_{name}"] = float(s["region_ce"][i]) / n
                out[f"share_{name}"] = n / total
            out[f"grad_norm_{name}"] = float(s["region_grad"][i]) / n
            out[f"grad_norm_weighted_{name}"] = float(s["region_grad_weighted"][i]) / n
        return out

    def summary(self) -> Dict[str, Any]:
        """JSON-ready record: the grid, per-bin counts and mean gradient norms (``null`` in empty
        bins), the thresholds and :meth:`metrics`."""
        s = self.sums
        counts = s["counts"]

        def mean(x: Tensor) -> List[List[Optional[float]]]:
            m = torch.where(counts > 0, x / counts.clamp(min=1), torch.full_like(x, float("nan")))
            return [[None if math.isnan(v) else v for v in row] for row in m.tolist()]

        return {
            "p_edges": self.grid.p_edges,
            "h_edges": self.grid.h_edges,
            "counts": counts.long().tolist(),
            "mean_grad_norm": mean(s["grad"]),
            "mean_grad_norm_weighted": mean(s["grad_weighted"]),
            "thresholds": {
                "low_entropy_max": self.low_max,
                "high_entropy_min": self.high_min,
                "conflict_max_norm_entropy": self.max_norm_entropy,
                "conflict_max_label_prob": self.max_label_prob,
            },
            "metrics": self.metrics(),
        }

    def state_tensor(self) -> Tensor:
        """All sums as one flat tensor (to reduce across processes in a single call)."""
        return torch.cat([t.flatten() for t in self.sums.values()])

    def load_state_tensor(self, flat: Tensor) -> None:
        """Inverse of :meth:`state_tensor` (after a sum over processes)."""
        flat = flat.detach().cpu().double()
        offset = 0
        for name, t in self.sums.items():
            self.sums[name] = flat[offset : offset + t.numel()].view_as(t).clone()
            offset += t.numel()



# ---- top-K entropy against the full entropy (Fig. 6) ---------------------------------------------


def _paired(x: Tensor, y: Tensor, who: str) -> Tuple[Tensor, Tensor]:
    """``x`` and ``y`` as flat float64 vectors of the same length (at least two values)."""
    if x.numel() != y.numel():
        raise ValueError(f"{who}: x has {x.numel()} values but y has {y.numel()}; pass one value per token to both")
    if x.numel() < 2:
        raise ValueError(f"{who}: a correlation needs at least 2 values, got {x.numel()}")
    return x.detach().double().flatten().cpu(), y.detach().double().flatten().cpu()


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson's correlation of ``x`` and ``y`` (float64); NaN when either is constant (undefined)."""
    x, y = _paired(x, y, "pearson")
    dx, dy = x - x.mean(), y - y.mean()
    denom = float(dx.norm() * dy.norm())
    return float((dx * dy).sum()) / denom if denom > 0 else float("nan")


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of ``x`` (float64), tied values sharing the mean of their ranks: the rule that
    makes Spearman's correlation the Pearson correlation of the ranks even with ties (confident
    tokens tie at an entropy of 0 in fp32)."""
    _, inverse, counts = torch.unique(x.detach().flatten(), sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # rank of the last member of each group of equal values
    return (ends - (counts.double() - 1.0) / 2.0)[inverse]


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (ties get average ranks); 1 for any strictly
    increasing map of ``x``, NaN when either is constant."""
    x, y = _paired(x, y, "spearman")
    return pearson(average_ranks(x), average_ranks(y))


def topk_agreement(full: Tensor, topk: Tensor, mass: Tensor, k: int, mass_levels: Tuple[float, ...] = (0.9, 0.99)) -> Dict[str, float]:
    """How closely the top-K entropy of a set of tokens tracks their full-vocabulary entropy.

    Args:
        full: ``(N,)`` full-vocabulary entropies (nats), :func:`eaft_pl.loss.stats.full_entropy`.
        topk: ``(N,)`` top-K entropies (nats) of the same tokens, :func:`eaft_pl.loss.stats.topk_entropy`.
        mass: ``(N,)`` probability mass of the K most probable tokens, :func:`eaft_pl.loss.stats.topk_mass`.
        k: The K of ``topk`` and ``mass`` (for the normalised entropy ``H_K / ln K``, the EAFT weight).
        mass_levels: Report the share of tokens whose top-K mass is above each level.

    Returns:
        ``pearson`` and ``spearman`` (top-K against full), ``mean_full`` and ``mean_topk`` (nats),
        ``mean_topk_norm`` (mean ``H_K / ln K``), ``mean_abs_diff`` (mean ``|H_K - H|``, nats),
        ``mean_mass``, ``mass_above_<level>`` per level and ``tokens``.
    """
    if k < 2:
        raise ValueError(f"topk_agreement: k must be >= 2 (ln 1 = 0 normalises nothing), got {k}")
    if mass.numel() != full.numel():
        raise ValueError(f"topk_agreement: mass has {mass.numel()} values but full has {full.numel()}")
    f, t = _paired(full, topk, "topk_agreement")
    m = mass.detach().double().flatten().cpu()
    out = {
        "pearson": pearson(f, t),
        "spearman": spearman(f, t),
        "mean_full": float(f.mean()),
        "mean_topk": float(t.mean()),
        "mean_topk_norm": float(t.mean()) / math.log(k),
        "mean_abs_diff": float((t - f).abs().mean()),
        "mean_mass": float(m.mean()),
    }
    for level in mass_levels:
        out[f"mass_above_{level:g}"] = float((m > level).double().mean())
    out["tokens"] = int(f.numel())
    return out
