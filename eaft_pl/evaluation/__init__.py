"""Evaluation: benchmark-style tasks, the forgetting callback and lm-evaluation-harness benchmarks."""

from eaft_pl.evaluation.forgetting import ForgettingCallback, forgetting, suite_averages
from eaft_pl.evaluation.harness import LMEvalCallback
from eaft_pl.evaluation.scorers import FinalNumberScorer, ToolCallScorer
from eaft_pl.evaluation.tasks import GenerationTask, MultipleChoiceTask, PerplexityTask

__all__ = [
    "FinalNumberScorer",
    "ForgettingCallback",
    "GenerationTask",
    "LMEvalCallback",
    "MultipleChoiceTask",
    "PerplexityTask",
    "ToolCallScorer",
    "forgetting",
    "suite_averages",
]
