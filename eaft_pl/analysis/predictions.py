"""What ``eaft-pl predict`` writes: per-example means of the token statistics, as JSON lines."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from eaft_pl.loss.stats import IGNORE_INDEX, TokenStats
from eaft_pl.tracking import log_files

__all__ = ["TokenStatsWriter", "per_example_means"]


def per_example_means(stats: TokenStats, weights: Tensor, labels: Tensor) -> Dict[str, Tensor]:
    """Each example's means over its supervised tokens (``(B,)`` each): ``ce``, ``label_prob``,
    ``topk_entropy``, ``weight``, and its token count ``tokens`` (0 and means of 0 for an example
    without one). ``labels`` is the batch's ``(B, T)``; the statistics are those of its shifted
    positions, in order, as :func:`eaft_pl.loss.stats.token_statistics` keeps them."""
    shifted = labels[:, 1:]  # (B, T-1)
    row = torch.nonzero(shifted != IGNORE_INDEX, as_tuple=True)[0]  # (N,) example index of each token
    batch_size = shifted.shape[0]
    tokens = torch.zeros(batch_size, device=row.device).index_add_(0, row, torch.ones_like(row, dtype=torch.float))
    out = {"tokens": tokens}
    for key, values in (("ce", stats.ce.detach()), ("label_prob", stats.label_prob), ("topk_entropy", stats.topk_entropy), ("weight", weights)):
        sums = torch.zeros(batch_size, device=row.device).index_add_(0, row, values.float())
        out[key] = sums / tokens.clamp(min=1)
    return out


class TokenStatsWriter(BasePredictionWriter):
    """Writes what ``eaft-pl predict`` computes: one JSON line per example with its source
    (``file:line``) and the means of its supervised tokens (ce, label_prob, topk_entropy, weight,
    tokens). The file appears whole or not at all (written to a temporary name, then renamed) and is
    logged to the MLflow run as an artifact (copied into other loggers' ``log_dir``). Under several
    processes each rank writes ``<stem>.rank<k><suffix>``.

    Args:
        output_file: Path of the JSONL file.
    """

    def __init__(self, output_file: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output_file = output_file
        self._handle: Any = None
        self._path: Optional[str] = None

    def _final_path(self, trainer: pl.Trainer) -> str:
        if trainer.world_size == 1:
            return self.output_file
        stem, suffix = os.path.splitext(self.output_file)
        return f"{stem}.rank{trainer.global_rank}{suffix}"

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._path = self._final_path(trainer)
        os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
        self._handle = open(self._path + ".tmp", "w")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Optional[Sequence[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        dataset = getattr(getattr(trainer, "datamodule", None), "datasets", {}).get("val")
        n = len(prediction["tokens"])
        indices = list(batch_indices) if batch_indices is not None else [None] * n
        for row, index in enumerate(indices):
            record = {"index": index}
            if dataset is not None and index is not None:
                record["source"] = dataset[index].source
            record.update({key: float(value[row]) for key, value in prediction.items()})
            self._handle.write(json.dumps(record) + "\n")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._handle.close()
        os.replace(self._path + ".tmp", self._path)
        log_files(trainer, Path(self._path))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
            os.remove(self._path + ".tmp")  # no half-written predictions
