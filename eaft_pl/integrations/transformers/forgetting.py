"""The forgetting callback for ``transformers.Trainer``: general suites scored on the model in memory.

The metric names are those of the Lightning callback (:class:`eaft_pl.evaluation.ForgettingCallback`),
so runs of both trainers compare on one dashboard.

A ``TrainerCallback`` sees the model and the tokenizer but not the trainer, and the Trainer has
already handed the evaluation's metrics to its ``report_to`` loggers when ``on_evaluate`` runs. The
callback therefore keeps the trainer (:meth:`ForgettingCallback.attach`) and logs through
``trainer.log``, the path every reporting integration (TensorBoard, W&B, MLflow, ...) listens on;
the same values are also added to the ``metrics`` of ``on_evaluate``, which ``trainer.evaluate()``
returns.
"""

from __future__ import annotations

import warnings
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from eaft_pl.evaluation.scores import Scores, forgetting, suite_averages
from eaft_pl.evaluation.tasks import LOWER_IS_BETTER

__all__ = ["ForgettingCallback", "Scores", "evaluate_suites", "forgetting_metrics"]


def evaluate_suites(model: nn.Module, tokenizer: Any, suites: Mapping[str, Sequence[Any]], batch_size: int) -> Scores:
    """Every task's ``evaluate(model, tokenizer, batch_size)`` without gradient, the model in eval
    mode and given back in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {
                suite: {task.name: dict(task.evaluate(model, tokenizer, batch_size)) for task in tasks} for suite, tasks in suites.items()
            }
    finally:
        model.train(was_training)


def forgetting_metrics(
    base: Scores, current: Scores, domain_suites: Collection[str] = ("domain",), lower_is_better: Optional[Collection[str]] = None
) -> Dict[str, float]:
    """The logged metrics of one evaluation against the base scores (those taken before training).

    - ``val/<suite>/<task>/<metric>`` and ``val/<suite>/avg/<metric>`` (the mean over the suite's tasks);
    - ``forgetting/<suite>/<metric>``: how much worse the suite's mean is than the base's (positive =
      forgot), for every suite but the domain suites;
    - ``gain/<suite>/<metric>``: how much better, for the domain suites.

    "Worse" is lower, except for the metrics in ``lower_is_better`` (default: the package's own,
    ``eaft_pl.evaluation.tasks.LOWER_IS_BETTER``: ``ce``, ``ppl`` and lm-eval's perplexities).
    """
    if lower_is_better is None:
        lower_is_better = LOWER_IS_BETTER
    out: Dict[str, float] = {}
    for suite, tasks in current.items():
        for task, values in tasks.items():
            out.update({f"val/{suite}/{task}/{metric}": value for metric, value in values.items()})
    base_means = suite_averages(base)
    for suite, means in suite_averages(current).items():
        for metric, value in means.items():
            out[f"val/{suite}/avg/{metric}"] = value
            reference = base_means.get(suite, {}).get(metric)
            if reference is None:
                continue
            worse = forgetting(reference, value, metric, lower_is_better=metric in lower_is_better)
            if suite in domain_suites:
                out[f"gain/{suite}/{metric}"] = -worse
            else:
                out[f"forgetting/{suite}/{metric}"] = worse
    return out


class ForgettingCallback(TrainerCallback):
    """Measures forgetting during Hugging Face training: scores the general suites on the model in
    memory before the first update (the base) and at every evaluation, and logs them.

    A task is any object with ``name`` and ``evaluate(model, tokenizer, batch_size) -> {metric: value}``:
    the package's :class:`~eaft_pl.evaluation.tasks.GenerationTask`,
    :class:`~eaft_pl.evaluation.tasks.MultipleChoiceTask` and
    :class:`~eaft_pl.evaluation.tasks.PerplexityTask`, or your own. Metrics: see
    :func:`forgetting_metrics`; they go to the Trainer's ``report_to`` loggers at the step of the
    evaluation, to ``trainer.state.log_history``, and into the metrics ``trainer.evaluate()`` returns.
    Every evaluation's scores are kept in :attr:`history`.

    Scoring runs on the main process (the others go on to their next collective and wait there). Under
    FSDP and DeepSpeed ZeRO-3 no process holds the whole model, so they are refused.

    Example::

        trainer = SFTTrainer(model=model, args=SFTConfig(..., eval_strategy="steps", eval_steps=200), ...)
        ForgettingCallback({"general": [MultipleChoiceTask("mc", items)]}).attach(trainer)
        trainer.train()

    Args:
        suites: ``{suite: [task, ...]}``.
        tokenizer: The tokenizer the tasks use; ``None`` takes the trainer's ``processing_class``.
        batch_size: Batch size of the tasks' forward passes and generation.
        domain_suites: Suites that measure the fine-tuning target (``gain/`` instead of ``forgetting/``).
    """

    def __init__(
        self,
        suites: Mapping[str, Sequence[Any]],
        *,
        tokenizer: Any = None,
        batch_size: int = 64,
        domain_suites: Sequence[str] = ("domain",),
    ) -> None:
        if not isinstance(suites, Mapping) or not suites:
            raise ValueError(f"ForgettingCallback(suites=...) must be a non-empty mapping {{suite: [task, ...]}}, got {suites!r}")
        for suite, tasks in suites.items():
            bad = [t for t in tasks if not (hasattr(t, "name") and callable(getattr(t, "evaluate", None)))]
            if isinstance(tasks, (str, bytes)) or bad:
                raise ValueError(
                    f"ForgettingCallback(suites=...): suite {suite!r} must be a list of tasks with a name and "
                    f"evaluate(model, tokenizer, batch_size), got {bad or tasks!r}"
                )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ForgettingCallback(batch_size=...) must be a positive integer, got {batch_size!r}")
        self.suites = {suite: list(tasks) for suite, tasks in suites.items()}
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.domain_suites = list(domain_suites)
        #: One record per evaluation: ``{"step": int, "scores": Scores}``; the first is the base.
        self.history: List[Dict[str, Any]] = []
        self.trainer: Any = None
        self._last_step: Optional[int] = None
        self._last_metrics: Dict[str, float] = {}

    def attach(self, trainer: Any) -> "ForgettingCallback":
        """Add the callback to ``trainer`` and log through it (``trainer.log``); returns the callback."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    # ---- scoring -------------------------------------------------------------------------------

    def _score(self, state: TrainerState, model: nn.Module, processing_class: Any) -> Dict[str, float]:
        """Score every suite and log, once per optimizer step (several eval sets, or an evaluate()
        after the last step, call on_evaluate again at the same step); returns the step's metrics
        ({} on the other processes)."""
        if state.global_step == self._last_step:
            return self._last_metrics
        self._last_step = state.global_step
        self._last_metrics = {}
        if not state.is_world_process_zero:
            return {}
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        scores = evaluate_suites(model, tokenizer, self.suites, self.batch_size)
        self.history.append({"step": state.global_step, "scores": scores})
        metrics = forgetting_metrics(self.history[0]["scores"], scores, self.domain_suites)
        self.trainer.log(dict(metrics))  # a copy: log adds the epoch to the dict it is given
        self._last_metrics = metrics
        return metrics

    # ---- hooks ---------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.trainer is None:
            raise ValueError(
                "ForgettingCallback logs through the trainer, which callbacks are not given; add it with "
                "ForgettingCallback(...).attach(trainer) instead of Trainer(callbacks=[...])"
            )
        from transformers.integrations import is_deepspeed_zero3_enabled

        if getattr(self.trainer, "is_fsdp_enabled", False) or is_deepspeed_zero3_enabled():
            raise ValueError("ForgettingCallback scores the whole model on one process, which FSDP and DeepSpeed ZeRO-3 never hold")
        if self.tokenizer is None and kwargs.get("processing_class") is None:
            raise ValueError("ForgettingCallback needs a tokenizer: pass tokenizer=, or give the trainer processing_class=")
        if state.global_step > 0:
            warnings.warn(
                f"ForgettingCallback: training resumes at step {state.global_step}, so the scores taken now (the reference "
                "for forgetting) are those of the checkpoint, not of the base model",
                stacklevel=2,
            )
        self.history = []
        self._last_step = None
        self._score(state, kwargs["model"], kwargs.get("processing_class"))

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.trainer is None or not self.history:  # evaluate() called outside train(): no base scores
            return
        metrics = self._score(state, kwargs["model"], kwargs.get("processing_class"))
        if kwargs.get("metrics") is not None:
            kwargs["metrics"].update(metrics)
