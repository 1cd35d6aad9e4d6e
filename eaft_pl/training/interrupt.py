"""Stopping on SIGTERM/SIGINT at the end of an optimizer step with a resumable checkpoint.

Lightning (2.6) turns SIGTERM into a ``SIGTERMException`` raised after the current micro-batch and
its validation, even between the micro-batches of an accumulated step (whose gradients a checkpoint
does not hold), and turns SIGINT into a KeyboardInterrupt wherever it lands; neither writes a
checkpoint, and the process exits 0 after SIGTERM. This callback waits for the optimizer step to
end, lets Lightning's SIGTERM path stop the loop there (after that step's validation and logging)
and writes ``last.ckpt``; the CLI then marks the MLflow run KILLED and exits with ``128 + signal``.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Dict, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["GracefulStop", "last_checkpoint_path"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop(Callback):
    """On SIGTERM or SIGINT during training: finish the optimizer step in progress (and its
    validation, if one is due), save ``last.ckpt`` in the ModelCheckpoint folder, mark the MLflow
    run KILLED and exit with status 128 + signal. A second signal stops at once (KeyboardInterrupt,
    no checkpoint; the run is marked FAILED).

    Args:
        enabled: Install the handlers during training (``--interrupt.enabled=false`` leaves
            Lightning's behaviour).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.received: Optional[int] = None
        self.checkpoint_path: Optional[str] = None
        self._previous: Dict[int, Any] = {}
        self._stopping = False

    # ---- signals -------------------------------------------------------------------------------

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # the second signal: stop now
            self._restore_handlers()
            raise KeyboardInterrupt
        self.received = signum
        rank_zero_info(
            f"Received {signal.Signals(signum).name}: stopping after the current optimizer step with a checkpoint "
            "(send it again to stop at once without one)"
        )

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning's own SIGTERM handler (registered when fit starts), replacing it
        # while training runs; Lightning puts its predecessor back when fit ends.
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        self.received, self._stopping, self.checkpoint_path = None, False, None
        for signum in _SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    # ---- stopping at a step boundary ---------------------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled or self._stopping:
            return
        # Not at an epoch's last step: Lightning's SIGTERM path would stop before the epoch-end
        # bookkeeping, and a checkpoint from there resumes with the next epoch's batch counter off. The
        # epoch ends as usual and the stop comes one optimizer step later (or training simply ends).
        last_of_epoch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and not last_of_epoch
        if step_done and self._any_rank_received(trainer, pl_module):
            self._stopping = True
            self._lightning_sigterm(trainer, True)

    def _any_rank_received(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether any rank got a signal. Every rank must decide alike: saving a checkpoint is a
        collective (a barrier under DDP, a gather under FSDP), so a rank that went on training while
        another saved would hang both. One scalar all-reduce per optimizer step, only with several
        processes."""
        received = self.received is not None
        if trainer.world_size == 1:
            return received
        flag = torch.tensor(float(received), device=pl_module.device)
        return bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's evaluation loop also stops on its SIGTERM flag: let the validation due at this
        # step run to the end, as it would have in an uninterrupted run.
        if self._stopping:
            self._lightning_sigterm(trainer, False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stopping and not trainer.sanity_checking:
            # Save here, where ModelCheckpoint saves after a validation: a resume from this point
            # skips the validation and counts the step's logging index itself. Saved later (in
            # on_exception, after the loop counted it), every metric would be logged one step late.
            self._save(trainer)
            self._lightning_sigterm(trainer, True)

    @staticmethod
    def _lightning_sigterm(trainer: pl.Trainer, value: bool) -> None:
        # Lightning's flag, checked after the batch's validation and logging (TrainingEpochLoop
        # .on_advance_end): the one place where a batch is completely done.
        trainer._signal_connector.received_sigterm = value

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if not (self._stopping and isinstance(exception, SIGTERMException)):
            return  # a crash: the last periodic checkpoint stays (see the README's Reliability section)
        if self.checkpoint_path is None:  # no validation at the last step: save after the step
            self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        self.checkpoint_path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(self.checkpoint_path)
        rank_zero_info(f"Saved {self.checkpoint_path}; continue with `fit ... --ckpt_path last` (or this path)")


def last_checkpoint_path(trainer: pl.Trainer) -> str:
    """Where ``--ckpt_path last`` will look: ``last.ckpt`` in the first ModelCheckpoint's folder
    (the default root folder without one). The callback records it as its last checkpoint, as it
    does for its own saves, so that the resumed run overwrites it instead of adding ``last-v1.ckpt``."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            callback.last_model_path = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
            return callback.last_model_path
    return os.path.join(trainer.default_root_dir, "last.ckpt")
