"""Evaluation: benchmark-style tasks, the forgetting callback and lm-evaluation-harness benchmarks.

The exports are lazy: the tasks and the score arithmetic (``tasks.py``, ``scores.py``) import no
Lightning, so the Hugging Face integration uses them without loading the Lightning callbacks.
The function ``forgetting`` is imported from ``eaft_pl.evaluation.scores``: in this package the
name is the callback's module, ``eaft_pl.evaluation.forgetting``.
"""

from typing import TYPE_CHECKING

from eaft_pl._lazy import lazy_exports

_LAZY = {
    "BaseAgreementTask": "eaft_pl.evaluation.agreement",
    "FinalNumberScorer": "eaft_pl.evaluation.scorers",
    "ForgettingCallback": "eaft_pl.evaluation.forgetting",
    "GenerationTask": "eaft_pl.evaluation.tasks",
    "InstructionTask": "eaft_pl.evaluation.instructions",
    "LMEvalCallback": "eaft_pl.evaluation.harness",
    "MultipleChoiceTask": "eaft_pl.evaluation.tasks",
    "PerplexityTask": "eaft_pl.evaluation.tasks",
    "TextPerplexityTask": "eaft_pl.evaluation.tasks",
    "ToolCallScorer": "eaft_pl.evaluation.scorers",
    "suite_averages": "eaft_pl.evaluation.scores",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from eaft_pl.evaluation.agreement import BaseAgreementTask
    from eaft_pl.evaluation.forgetting import ForgettingCallback
    from eaft_pl.evaluation.harness import LMEvalCallback
    from eaft_pl.evaluation.instructions import InstructionTask
    from eaft_pl.evaluation.scorers import FinalNumberScorer, ToolCallScorer
    from eaft_pl.evaluation.scores import suite_averages
    from eaft_pl.evaluation.tasks import GenerationTask, MultipleChoiceTask, PerplexityTask, TextPerplexityTask

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
