"""Callbacks of the eaft-pl CLI."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from eaft_pl.export import export_hf_folder
from eaft_pl.sharded import gather_full_model, refuse_unsupported_sharding
from eaft_pl.tracking import mlflow_loggers

__all__ = ["TokenStatsWriter", "SaveHFModel"]


class TokenStatsWriter(BasePredictionWriter):
    """Writes what ``eaft-pl predict`` computes: one JSON line per example with its source
    (``file:line``) and the means of its supervised tokens (ce, label_prob, topk_entropy, weight,
    tokens). The file appears whole or not at all (written to a temporary name, then renamed) and is
    logged to the MLflow run as an artifact. Under several processes each rank writes
    ``<stem>.rank<k><suffix>``.

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
        for logger in mlflow_loggers(trainer):
            logger.experiment.log_artifact(logger.run_id, self._path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
            os.remove(self._path + ".tmp")  # no half-written predictions


class SaveHFModel(pl.Callback):
    """At the end of training, writes the model and its tokenizer as a Hugging Face folder
    (``save_pretrained``) that ``AutoModelForCausalLM.from_pretrained`` (or ``model_name_or_path``)
    loads. A LoRA model is written with its adapters merged into the base weights, so the folder needs
    no peft; the training model is left as it is. The folder is written under a temporary name and
    renamed, so it is complete or absent, and replaced if it exists. Rank zero writes it; under FSDP
    every rank first helps gather the full weights into a CPU copy on rank zero
    (:func:`eaft_pl.sharded.gather_full_model`), and the ranks leave the hook once the folder exists.

    Args:
        dirpath: Folder to write; by default ``hf`` next to the run's checkpoint folder
            (``<root>/<experiment id>/<run id>/hf`` with the MLflow logger), so every run keeps its own.
        save_adapter: With LoRA, also write the adapters alone (PEFT's format) under
            ``<dirpath>/adapter``.
    """

    def __init__(self, dirpath: Optional[str] = None, save_adapter: bool = False) -> None:
        self.dirpath = dirpath
        self.save_adapter = save_adapter

    def resolve_dirpath(self, trainer: pl.Trainer) -> str:
        """The folder this run writes: ``dirpath``, or ``hf`` beside the checkpoint folder."""
        if self.dirpath is not None:
            return self.dirpath
        ckpt_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
        if ckpt_dir:
            return os.path.join(os.path.dirname(os.path.normpath(ckpt_dir)), "hf")
        return os.path.join(trainer.default_root_dir, "hf")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Refused before training rather than after it: DeepSpeed / ModelParallel shards cannot be
        # gathered into the folder (export the Lightning checkpoint with `eaft-pl export` instead).
        if stage == "fit":
            refuse_unsupported_sharding(trainer.strategy, "SaveHFModel")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = gather_full_model(trainer.strategy, pl_module.model, device="cpu")  # a collective under FSDP
        if model is not None:
            dirpath = self.resolve_dirpath(trainer)
            export_hf_folder(pl_module, dirpath, save_adapter=self.save_adapter, model=model)
            del model  # the FSDP copy: free it before the other callbacks run
            for logger in mlflow_loggers(trainer):
                logger.experiment.set_tag(logger.run_id, "hf_model_dir", os.path.abspath(dirpath))
        trainer.strategy.barrier("save_hf_model")  # the folder exists when any rank goes on
