"""Reading the results dict of lm-evaluation-harness: MLflow-safe metric names, the scores of every task
and group, the primary metric of a task and the suite average over the requested benchmarks.

lm-eval keys a score as ``"<metric>,<filter>"``: ``"acc,none"``, ``"exact_match,strict-match"``,
``"acc_stderr,none"``. Here a score is named ``<metric>`` when its filter is ``none`` and
``<metric>_<filter>`` otherwise (``acc``, ``exact_match_strict-match``); characters MLflow does not
accept in a metric name (anything but letters, digits, ``_``, ``-`` and ``.``) become ``_``. Standard
errors (``*_stderr``) are uncertainties, not scores, and are left out.
"""

from __future__ import annotations

import math
import re
from numbers import Real
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from eaft_pl.evaluation.tasks import LOWER_IS_BETTER

__all__ = [
    "PRIMARY_PREFERENCE",
    "lower_is_better",
    "metric_name",
    "parse_metric_key",
    "primary_metric",
    "primary_scores",
    "safe_name",
    "task_scores",
    "top_level",
]

#: The primary metric of a task is the first of these it reports, else the first metric lm-eval lists
#: for it. lm-eval's tables quote ``acc_norm`` for HellaSwag and ARC; MMLU reports ``acc`` alone;
#: IFEval's first metric is ``prompt_level_strict_acc`` and GSM8K's ``exact_match_strict-match``.
PRIMARY_PREFERENCE = ("acc_norm", "acc")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def safe_name(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric name (and ``/``, which would nest it)
    replaced by ``_``."""
    return _UNSAFE.sub("_", name)


def parse_metric_key(key: str) -> Optional[Tuple[str, str]]:
    """``(metric, filter)`` of a score key of lm-eval's results (``"acc,none"`` -> ``("acc", "none")``);
    None for a key that is not a score (``alias``, ``sample_len``) or is a standard error."""
    metric, sep, filt = key.partition(",")
    if not sep or metric.endswith("_stderr"):
        return None
    return metric, filt


def metric_name(metric: str, filt: str) -> str:
    """The logged name of lm-eval's ``"<metric>,<filter>"``: ``acc`` for ``acc,none``,
    ``exact_match_strict-match`` for ``exact_match,strict-match``."""
    return safe_name(metric if filt == "none" else f"{metric}_{filt}")


def task_scores(entry: Mapping[str, Any]) -> Dict[str, Tuple[float, str]]:
    """The scores of one entry of ``results["results"]`` in lm-eval's order, as
    ``{logged name: (value, lm-eval metric)}``. Values that are not numbers (``"N/A"``, the
    ``sample_count`` dict of a group) are skipped."""
    out: Dict[str, Tuple[float, str]] = {}
    for key, value in entry.items():
        parsed = parse_metric_key(key)
        if parsed is None or isinstance(value, bool) or not isinstance(value, Real):
            continue
        out[metric_name(*parsed)] = (float(value), parsed[0])
    return out


def lower_is_better(results: Mapping[str, Any], task: str, metric: str) -> bool:
    """Whether a smaller ``metric`` (lm-eval's name, without the filter) of ``task`` is better: the
    task's own ``higher_is_better`` table in the results, else the known names in ``LOWER_IS_BETTER``."""
    table = (results.get("higher_is_better") or {}).get(task) or {}
    if metric in table and table[metric] is not None:
        return not table[metric]
    return metric in LOWER_IS_BETTER


def primary_metric(names: Sequence[str]) -> Optional[str]:
    """The primary of a task's logged metric names (in lm-eval's order): see ``PRIMARY_PREFERENCE``."""
    for preferred in PRIMARY_PREFERENCE:
        if preferred in names:
            return preferred
    return names[0] if names else None


def top_level(results: Mapping[str, Any]) -> List[str]:
    """The entries of ``results["results"]`` that no group contains: the benchmarks asked for (a
    group such as ``mmlu`` stands for its subtasks; a tag's tasks stand each for itself)."""
    inside = {name for members in (results.get("group_subtasks") or {}).values() for name in members}
    return [name for name in results["results"] if name not in inside]


def _primary(results: Mapping[str, Any], name: str, seen: Tuple[str, ...] = ()) -> Optional[Tuple[str, float, bool]]:
    """``(metric, value, lower is better)`` of a task or group; a group without scores of its own
    (no ``aggregate_metric_list``) takes the mean of its members' primary values."""
    scores = task_scores(results["results"].get(name, {}))
    chosen = primary_metric(list(scores))
    if chosen is not None:
        value, lm_metric = scores[chosen]
        return chosen, value, lower_is_better(results, name, lm_metric)
    members = [m for m in (results.get("group_subtasks") or {}).get(name, []) if m not in seen]
    found = [p for p in (_primary(results, m, seen + (name,)) for m in members) if p is not None]
    if not found or len({p[2] for p in found}) > 1:
        return None  # nothing scored, or members pointing in both directions: no meaningful mean
    return "mean_of_members", sum(p[1] for p in found) / len(found), found[0][2]


def primary_scores(results: Mapping[str, Any]) -> Dict[str, Tuple[str, float, bool]]:
    """``{benchmark: (primary metric, value, lower is better)}`` for every top-level entry that has
    one; NaN values (an empty task) are dropped."""
    out = {}
    for name in top_level(results):
        found = _primary(results, name)
        if found is not None and not math.isnan(found[1]):
            out[name] = found
    return out
