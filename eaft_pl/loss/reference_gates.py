"""Gates computed from the base model (the model before fine-tuning), not from the model being trained.

EAFT's gate is dynamic: it reads the current model's entropy, and once the neighbouring tokens are
learned the entropy at a conflict slot rises and the gate "reopens" (``docs`` study 2, and the
cohort curves of :mod:`eaft_pl.evaluation.cohort`). These gates freeze the decision at the base model:

- :class:`StaticEAFTGate`: the base model's normalised top-K entropy, fixed for the whole run;
- :class:`StaticConflictMaskGate`: weight 0 on the tokens that were confident conflicts under the
  base (normalised entropy and label probability both at or below absolute thresholds), else 1;
- :class:`EAFTStaticMaskGate`: the dynamic EAFT weight times that static mask;
- :class:`FLOWGate`: FLOW (Sanyal et al. 2025), a static per-example weight ``exp(-loss_i / tau)``
  from the base model's mean CE of the example, ``tau`` the median of those losses.

They read ``TokenStats.reference`` (filled by :class:`eaft_pl.module.EAFTModule` from the reference
pass of :mod:`eaft_pl.reference`), are token-local (so the chunked loss computes them chunk by chunk)
and import nothing from Lightning.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from eaft_pl.loss.conflict import CONFLICT_MAX_LABEL_PROB, CONFLICT_MAX_NORM_ENTROPY, confident_conflict_mask
from eaft_pl.loss.gates import EAFTGate, Gate, Normalizer, _check_power, _check_quantile, gate_option_error
from eaft_pl.loss.stats import TokenStats

__all__ = [
    "flow_weights",
    "StaticEAFTGate",
    "StaticConflictMaskGate",
    "EAFTStaticMaskGate",
    "FLOWGate",
]


def flow_weights(sample_ce: Tensor, tau: float) -> Tensor:
    """FLOW's weight ``exp(-loss_i / tau)`` of an example whose mean token CE under the base is
    ``loss_i`` (the same weight on every token of the example)."""
    if not tau > 0:
        raise ValueError(f"FLOW's tau must be > 0, got {tau!r}")
    return torch.exp(-sample_ce / tau)


def _base_norm_entropy(stats: TokenStats, who: str) -> Tensor:
    return stats.require_reference("topk_entropy", who) / math.log(stats.top_k)


class StaticEAFTGate(Gate):
    """Static EAFT: the base model's normalised top-K entropy ``(H_base / ln K) ** alpha``, fixed.

    Args:
        alpha: Power of the weight (1: the paper's linear gate).
    """

    name = "static_eaft"
    token_local = True
    needs_reference = True

    def __init__(self, alpha: float = 1.0) -> None:
        _check_power(alpha, type(self).__name__)
        self.alpha = float(alpha)

    def weights(self, stats: TokenStats) -> Tensor:
        return _base_norm_entropy(stats, type(self).__name__) ** self.alpha


class StaticConflictMaskGate(Gate):
    """A static hard mask: weight 0 on the tokens that were confident conflicts under the base model
    (normalised top-K entropy ``<= max_norm_entropy`` and label probability ``<= max_label_prob``),
    1 elsewhere. The thresholds are absolute, so the masked share is whatever the data holds.

    Args:
        max_norm_entropy: "Confident" at or below this base normalised entropy (0.17, the paper's beta).
        max_label_prob: "Conflict" at or below this base label probability.
    """

    name = "static_mask"
    token_local = True
    needs_reference = True

    def __init__(self, max_norm_entropy: float = CONFLICT_MAX_NORM_ENTROPY, max_label_prob: float = CONFLICT_MAX_LABEL_PROB) -> None:
        _check_quantile("max_norm_entropy", max_norm_entropy, type(self).__name__)
        _check_quantile("max_label_prob", max_label_prob, type(self).__name__)
        self.max_norm_entropy = float(max_norm_entropy)
        self.max_label_prob = float(max_label_prob)

    def mask(self, stats: TokenStats) -> Tensor:
        """``(N,)`` weights: 0 on base-model confident conflicts, 1 elsewhere."""
        who = type(self).__name__
        conflict = confident_conflict_mask(
            _base_norm_entropy(stats, who), stats.require_reference("label_prob", who), self.max_norm_entropy, self.max_label_prob
        )
        return (~conflict).float()

    def weights(self, stats: TokenStats) -> Tensor:
        return self.mask(stats)


class EAFTStaticMaskGate(StaticConflictMaskGate):
    """The dynamic EAFT weight of the current model times the static base-model conflict mask.

    Args:
        alpha: Power of the EAFT weight.
        normalizer: EAFT's normaliser (see :class:`eaft_pl.loss.gates.EAFTGate`).
        max_norm_entropy: Base-model "confident" threshold of the mask.
        max_label_prob: Base-model "conflict" threshold of the mask.
    """

    name = "eaft_static_mask"

    def __init__(
        self, alpha: float = 1.0, normalizer: Normalizer = "log_k", max_norm_entropy: float = CONFLICT_MAX_NORM_ENTROPY, max_label_prob: float = CONFLICT_MAX_LABEL_PROB
    ) -> None:
        super().__init__(max_norm_entropy, max_label_prob)
        self.eaft = EAFTGate(alpha=alpha, normalizer=normalizer)

    def weights(self, stats: TokenStats) -> Tensor:
        return self.eaft.weights(stats) * self.mask(stats)


class FLOWGate(Gate):
    """FLOW (Sanyal et al. 2025, "Upweighting Easy Samples in Fine-Tuning Mitigates Forgetting"): each
    example gets the static weight ``exp(-loss_i / tau)``, ``loss_i`` its mean token CE under the base
    model and ``tau`` the median of ``loss_i`` over the training set (the reference pass computes it).

    Difference from FLOW's code: the weighted per-token CE is normalised by the step's token count like
    every gate here (FLOW weights per-example losses); the relative weights of the examples are FLOW's.

    Args:
        tau: Temperature; ``None`` (default) uses the median per-example base loss of the training data.
    """

    name = "flow"
    token_local = True
    needs_reference = True

    def __init__(self, tau: Optional[float] = None) -> None:
        if tau is not None and not (tau > 0 and math.isfinite(tau)):
            raise gate_option_error(type(self).__name__, "tau", f"tau must be > 0 and finite, or null, got {tau!r}")
        self.tau = tau

    def weights(self, stats: TokenStats) -> Tensor:
        who = type(self).__name__
        sample_ce = stats.require_reference("sample_ce", who)
        if self.tau is not None:
            return flow_weights(sample_ce, self.tau)
        if sample_ce.numel() == 0:
            return torch.ones_like(stats.ce)
        tau = stats.require_reference("sample_ce_median", who)  # the same value on every token
        return torch.exp(-sample_ce / tau.clamp(min=1e-12))
