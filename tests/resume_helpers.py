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
    """

    def __init__(self, path: str, signal_at: int = 0, signum: int = int(signal.SIGTERM)) -> None:
        self.path = path
        self.signal_at = signal_at
        self.signum = signum

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
