"""The schedule shared by the evaluating callbacks: at the start of training, every N optimizer steps
and at the end, at most once per optimizer step."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from eaft_pl.training.sharded import refuse_unsupported_sharding

__all__ = ["PeriodicEvaluation", "kept_modes"]


@contextmanager
def kept_modes(module: torch.nn.Module) -> Iterator[None]:
    """Puts ``module`` in eval mode and, on exit, gives every submodule back its own train/eval mode
    (a submodule kept in eval mode on purpose stays so, which ``module.train()`` would undo)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


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

    def _check_base_run(self, trainer: pl.Trainer) -> None:
        """For callbacks that score the whole model on rank zero and measure forgetting against the
        scores taken at the start: refuse the sharded strategies the gather does not serve (DeepSpeed,
        ModelParallel), warn when training resumes."""
        name = type(self).__name__
        # FSDP is served by gathering the model on rank zero (eaft_pl.training.sharded); the others are refused.
        refuse_unsupported_sharding(trainer.strategy, name)
        if trainer.global_step > 0:
            rank_zero_warn(
                f"{name}: training resumes at step {trainer.global_step}, so the scores taken now (the reference "
                "for forgetting) are those of the checkpoint, not of the base model"
            )

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _evaluate(trainer, pl_module)")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module)
