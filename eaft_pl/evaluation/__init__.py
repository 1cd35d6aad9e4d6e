"""Evaluation: benchmark-style tasks, the forgetting callback and lm-evaluation-harness benchmarks.

The exports are lazy: the tasks and the score arithmetic (``tasks.py``, ``scores.py``) import no
Lightning, so the Hugging Face integration uses them without loading the Lightning callbacks.
"""

from typing import TYPE_CHECKING

from eaft_pl._lazy import lazy_exports

_LAZY = {
    "ForgettingCallback": "eaft_pl.evaluation.forgetting",
    "GenerationTask": "eaft_pl.evaluation.tasks",
    "LMEvalCallback": "eaft_pl.evaluation.harness",
    "MultipleChoiceTask": "eaft_pl.evaluation.tasks",
    "PerplexityTask": "eaft_pl.evaluation.tasks",
    "forgetting": "eaft_pl.evaluation.scores",
    "suite_averages": "eaft_pl.evaluation.scores",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from eaft_pl.evaluation.forgetting import ForgettingCallback
    from eaft_pl.evaluation.harness import LMEvalCallback
    from eaft_pl.evaluation.scores import forgetting, suite_averages
    from eaft_pl.evaluation.tasks import GenerationTask, MultipleChoiceTask, PerplexityTask

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
