"""torchmetrics metrics over the per-token statistics of :mod:`eaft_pl.loss.stats`.

The metrics read the very :class:`~eaft_pl.loss.stats.TokenStats` the loss was computed from, so what is
logged and what is trained on cannot disagree (the shifted, supervised tokens only).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor
from torchmetrics import Metric

from eaft_pl.loss.stats import TokenStats
from eaft_pl.loss.conflict import CONFLICT_MAX_LABEL_PROB, CONFLICT_MAX_NORM_ENTROPY, confident_conflict_mask

__all__ = ["TokenStatsMetric", "confident_conflicts"]


def confident_conflicts(stats: TokenStats, max_norm_entropy: float, max_label_prob: float) -> Tensor:
    """Boolean ``(N,)`` mask of confident-conflict tokens: the model is sure (normalised top-K
    entropy at most ``max_norm_entropy``) yet gives the label a probability of at most
    ``max_label_prob``."""
    return confident_conflict_mask(stats.norm_entropy, stats.label_prob, max_norm_entropy, max_label_prob)


class TokenStatsMetric(Metric):
    """Token-weighted means of the loss statistics, summed across batches and processes.

    ``compute()`` returns a dict of scalars (names without a prefix):

    - ``ce``: unweighted cross-entropy, comparable across methods;
    - ``loss``: the weighted loss ``sum(w * CE) / tokens`` that is optimised;
    - ``label_prob``: mean probability of the label;
    - ``topk_entropy``: mean top-K entropy in nats;
    - ``eaft_weight``: mean normalised top-K entropy ``H / ln K`` (EAFT's weight, whatever the gate);
    - ``weight``: mean weight of the active gate (``1 - weight`` is the share of signal suppressed);
    - ``conflict_share``: share of confident-conflict tokens (see :func:`confident_conflicts`);
    - ``full_entropy``: mean full-vocabulary entropy, only when ``full_entropy=True``;
    - ``tokens``: number of supervised tokens seen.

    Args:
        conflict_max_norm_entropy: A token is "confident" at or below this normalised entropy.
        conflict_max_label_prob: A confident token "conflicts" at or below this label probability.
        full_entropy: Track full-vocabulary entropy (the statistics must include it).
    """

    is_differentiable = False
    higher_is_better: Optional[bool] = None
    full_state_update = False

    _SUMS = ("ce", "loss", "label_prob", "topk_entropy", "eaft_weight", "weight", "conflicts")

    def __init__(
        self,
        conflict_max_norm_entropy: float = CONFLICT_MAX_NORM_ENTROPY,
        conflict_max_label_prob: float = CONFLICT_MAX_LABEL_PROB,
        full_entropy: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.conflict_max_norm_entropy = conflict_max_norm_entropy
        self.conflict_max_label_prob = conflict_max_label_prob
        self.track_full_entropy = full_entropy
        # float64 sums: a long validation adds millions of tokens and fp32 would lose the low digits.
        for name in self._SUMS + (("full_entropy",) if full_entropy else ()):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, stats: TokenStats, weights: Tensor) -> None:  # type: ignore[override]
        ce = stats.ce.detach().double()
        w = weights.detach().double()
        self.tokens += stats.num_tokens
        self.ce += ce.sum()
        self.loss += (w * ce).sum()
        self.label_prob += stats.label_prob.double().sum()
        self.topk_entropy += stats.topk_entropy.double().sum()
        self.eaft_weight += stats.norm_entropy.double().sum()
        self.weight += w.sum()
        self.conflicts += confident_conflicts(
            stats, self.conflict_max_norm_entropy, self.conflict_max_label_prob
        ).sum()
        if self.track_full_entropy:
            if stats.full_entropy is None:
                raise ValueError("TokenStatsMetric(full_entropy=True) needs statistics computed with full entropy")
            self.full_entropy += stats.full_entropy.double().sum()

    def compute(self) -> Dict[str, Tensor]:  # type: ignore[override]
        n = self.tokens.double()
        out = {name: (getattr(self, name) / n).float() for name in self._SUMS if name != "conflicts"}
        out["conflict_share"] = (self.conflicts / n).float()
        if self.track_full_entropy:
            out["full_entropy"] = (self.full_entropy / n).float()
        out["tokens"] = self.tokens.float()
        return out
