"""A callback for the resume tests: records every micro-batch (step, loss, the examples' tokens) to a
JSONL file and can send this process a signal at a chosen micro-batch."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from lightning.pytorch.callbacks import Callback


class StepRecorder(Callback):
    """Args:
        path: JSONL file to append one row per training micro-batch to.
        signal_at: Send ``signum`` to this process after this many micro-batches of the run, counted
            across resumes (0: never).
        signum: The signal to send.
        raise_at: Raise a RuntimeError in this micro-batch's training step, counted like ``signal_at``
            (0: never).
    """

    def __init__(self, path: str, signal_at: int = 0, signum: int = int(signal.SIGTERM), raise_at: int = 0) -> None:
        self.path = path
        self.signal_at = signal_at
        self.signum = signum
        self.raise_at = raise_at

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop.total_batch_idx + 1 == self.raise_at:
            raise RuntimeError(f"injected failure in micro-batch {self.raise_at}")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        rows = batch["input_ids"].tolist()
        with open(self.path, "a") as f:
            f.write(json.dumps({
                "epoch": trainer.current_epoch,
                "batch_idx": batch_idx,
                "global_step": trainer.global_step,
                "loss": float(outputs["loss"]),
                "examples": [hash(tuple(r)) for r in rows],
            }) + "\n")  # fmt: skip
        if trainer.fit_loop.total_batch_idx + 1 == self.signal_at:
            os.kill(os.getpid(), self.signum)
