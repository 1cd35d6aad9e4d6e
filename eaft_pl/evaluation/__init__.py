"""Evaluation: benchmark-style tasks and the forgetting callback."""

from eaft_pl.evaluation.forgetting import ForgettingCallback, forgetting, suite_averages
from eaft_pl.evaluation.tasks import GenerationTask, MultipleChoiceTask, PerplexityTask

__all__ = ["ForgettingCallback", "GenerationTask", "MultipleChoiceTask", "PerplexityTask", "forgetting", "suite_averages"]
