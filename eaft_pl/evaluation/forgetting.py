"""The forgetting callback: evaluate named suites before the first update, every N steps and at the
end, and log scores, forgetting against the base model and the domain gain."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch

from eaft_pl.evaluation.periodic import PeriodicEvaluation, kept_modes
from eaft_pl.evaluation.scores import Scores, forgetting, suite_averages
from eaft_pl.training.sharded import gather_full_model

__all__ = ["ForgettingCallback"]


class ForgettingCallback(PeriodicEvaluation):
    """Measures forgetting against the model as it was before fine-tuning.

    Suites come from the DataModule's ``evaluation_suites()`` (``{suite: [task, ...]}``; a task has
    ``name`` and ``evaluate(model, tokenizer, batch_size) -> {metric: value}``). They are evaluated
    at the start of training, before any optimizer step (the base scores), every ``every_n_steps``
    optimizer steps, and at the end. Logged, with the optimizer step as the step:

    - ``val/<suite>/<task>/<metric>`` and ``val/<suite>/avg/<metric>`` (mean over the suite's tasks);
    - ``forgetting/<suite>/<metric>``: base average minus current average (positive = forgot), for
      every suite except the domain suites;
    - ``gain/<suite>/<metric>``: current minus base, for the domain suites.

    The whole score matrix (every evaluation, every task) is logged as ``forgetting/scores.json`` on
    the MLflow run and kept in :attr:`history`. Evaluation runs on rank zero; the others wait. Under
    FSDP every rank first helps gather the full weights into a copy on rank zero's device
    (:func:`eaft_pl.training.sharded.gather_full_model`: rank zero then holds the whole model once more while
    it evaluates); DeepSpeed and ModelParallel are refused.

    Args:
        every_n_steps: Evaluate every this many optimizer steps (0: only at the start and the end).
        batch_size: Batch size of the evaluation forward passes and generation.
        domain_suites: Suites that measure the fine-tuning target (gain instead of forgetting).
    """

    def __init__(self, every_n_steps: int = 50, batch_size: int = 64, domain_suites: Optional[List[str]] = None) -> None:
        super().__init__(every_n_steps)
        self.batch_size = batch_size
        self.domain_suites = list(domain_suites) if domain_suites is not None else ["domain"]
        self.history: List[Dict[str, Any]] = []
        self._suites: Optional[Dict[str, List[Any]]] = None

    # ---- evaluation ----------------------------------------------------------------------------

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not self._new_step(step):  # only rank zero fills `history`; every rank reaches the barrier
            return
        model = gather_full_model(trainer.strategy, pl_module.model)  # every rank: a collective under FSDP
        if model is not None:
            with kept_modes(model), torch.no_grad():  # every submodule gets its own mode back
                scores: Scores = {
                    suite: {task.name: task.evaluate(model, pl_module.tokenizer, self.batch_size) for task in tasks}
                    for suite, tasks in self._suites.items()
                }
            del model  # the FSDP copy: free it before training goes on
            self.history.append({"step": step, "scores": scores})
            self._log(trainer, step, scores)
        trainer.strategy.barrier("forgetting_eval")

    def _log(self, trainer: pl.Trainer, step: int, scores: Scores) -> None:
        metrics: Dict[str, float] = {}
        for suite, tasks in scores.items():
            for task, values in tasks.items():
                metrics.update({f"val/{suite}/{task}/{m}": v for m, v in values.items()})
        base_avg = suite_averages(self.history[0]["scores"])
        for suite, averages in suite_averages(scores).items():
            for metric, value in averages.items():
                metrics[f"val/{suite}/avg/{metric}"] = value
                base = base_avg[suite][metric]
                if suite in self.domain_suites:
                    metrics[f"gain/{suite}/{metric}"] = -forgetting(base, value, metric)
                else:
                    metrics[f"forgetting/{suite}/{metric}"] = forgetting(base, value, metric)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ---- hooks ---------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_base_run(trainer)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "evaluation_suites"):
            raise ValueError(
                "ForgettingCallback needs a DataModule with evaluation_suites() returning {suite: [task, ...]}"
            )
        self._suites = datamodule.evaluation_suites()
        self.history = []
        self._last_step = None
        self._evaluate(trainer, pl_module)  # the base model: no optimizer step has run yet

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.is_global_zero:
            from lightning.pytorch.loggers import MLFlowLogger

            for logger in trainer.loggers:
                if isinstance(logger, MLFlowLogger):
                    logger.experiment.log_dict(logger.run_id, {"history": self.history}, "forgetting/scores.json")
