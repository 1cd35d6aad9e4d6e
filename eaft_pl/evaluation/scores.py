"""Arithmetic on evaluation scores, shared by the Lightning and the Hugging Face forgetting callbacks
(no Lightning here): suite means and forgetting against the base."""

from __future__ import annotations

from typing import Dict, List, Optional

from eaft_pl.evaluation.tasks import LOWER_IS_BETTER

__all__ = ["Scores", "forgetting", "suite_averages"]

Scores = Dict[str, Dict[str, Dict[str, float]]]  # suite -> task -> metric -> value


def suite_averages(scores: Scores) -> Dict[str, Dict[str, float]]:
    """Mean of each metric over the tasks of a suite that report it (``suite -> metric -> mean``)."""
    out: Dict[str, Dict[str, float]] = {}
    for suite, tasks in scores.items():
        sums: Dict[str, List[float]] = {}
        for metrics in tasks.values():
            for metric, value in metrics.items():
                sums.setdefault(metric, []).append(value)
        out[suite] = {metric: sum(v) / len(v) for metric, v in sums.items()}
    return out


def forgetting(base: float, current: float, metric: str, lower_is_better: Optional[bool] = None) -> float:
    """How much worse ``current`` is than ``base``: positive = forgot. The sign flips for metrics
    where lower is better: ``lower_is_better`` when given, else the names in ``LOWER_IS_BETTER``."""
    if lower_is_better is None:
        lower_is_better = metric in LOWER_IS_BETTER
    return current - base if lower_is_better else base - current
