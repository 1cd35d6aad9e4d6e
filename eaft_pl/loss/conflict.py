"""The one rule for a confident conflict, and its thresholds.

A token is a *confident conflict* when the model is sure (normalised top-K entropy ``H_K / ln K`` at or
below :data:`CONFLICT_MAX_NORM_ENTROPY`) and yet gives the label little probability (at or below
:data:`CONFLICT_MAX_LABEL_PROB`). The metrics, the diagnostics, the cohort callback and the static
base-model gates all count conflicts with this function and these defaults, so they cannot disagree.

The entropy threshold 0.17 is the paper's beta (the bottom-15% entropy percentile of its math data);
0.1 on the label probability is "the model is sure of something else". The sigmoid gate's midpoint is
also 0.17, but it is a different knob (where the soft gate is half open) and is kept apart on purpose.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["CONFLICT_MAX_NORM_ENTROPY", "CONFLICT_MAX_LABEL_PROB", "confident_conflict_mask"]

CONFLICT_MAX_NORM_ENTROPY = 0.17
"""Normalised top-K entropy at or below which a token counts as confident."""

CONFLICT_MAX_LABEL_PROB = 0.1
"""Label probability at or below which a confident token counts as a conflict."""


def confident_conflict_mask(
    norm_entropy: Tensor,
    label_prob: Tensor,
    max_norm_entropy: float = CONFLICT_MAX_NORM_ENTROPY,
    max_label_prob: float = CONFLICT_MAX_LABEL_PROB,
) -> Tensor:
    """Boolean mask of confident conflicts: normalised entropy ``<= max_norm_entropy`` and label
    probability ``<= max_label_prob`` (the model is sure of something else)."""
    return (norm_entropy <= max_norm_entropy) & (label_prob <= max_label_prob)
