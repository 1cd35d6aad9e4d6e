"""The schedule shared by the evaluating callbacks: at the start of training, every N optimizer steps
and at the end, at most once per optimizer step."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["PeriodicEvaluation"]


class PeriodicEvaluation(Callback):
    """Calls :meth:`_evaluate` every ``every_n_steps`` optimizer steps and at the end of training
    (a subclass calls it at the start itself). ``every_n_steps=0``: only at the end."""

    def __init__(self, every_n_steps: int, key: str = "every_n_steps") -> None:
        if every_n_steps < 0:
            raise ValueError(f"{key} must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._last_step: Optional[int] = None

    def _new_step(self, step: int) -> bool:
        """True the first time ``step`` is seen. Several micro-batches share an optimizer step, and the
        end can fall on an every-N point. Every rank keeps this counter, so under DDP all ranks agree
        on whether to reach the barrier of an evaluation."""
        if step == self._last_step:
            return False
        self._last_step = step
        return True

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _evaluate(trainer, pl_module)")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module)
