"""Evaluation: benchmark-style tasks, the forgetting callback and lm-evaluation-harness benchmarks."""

from eaft_pl.evaluation.agreement import BaseAgreementTask
from eaft_pl.evaluation.forgetting import ForgettingCallback, forgetting, suite_averages
from eaft_pl.evaluation.harness import LMEvalCallback
from eaft_pl.evaluation.instructions import InstructionTask
from eaft_pl.evaluation.tasks import GenerationTask, MultipleChoiceTask, PerplexityTask, TextPerplexityTask

__all__ = [
    "BaseAgreementTask",
    "ForgettingCallback",
    "GenerationTask",
    "InstructionTask",
    "LMEvalCallback",
    "MultipleChoiceTask",
    "PerplexityTask",
    "TextPerplexityTask",
    "forgetting",
    "suite_averages",
]
