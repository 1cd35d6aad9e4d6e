"""Exact resume: the RNG streams and the MLflow run travel in the checkpoint, and ``fit --ckpt_path``
continues the run it came from.

Lightning restores the weights, optimizer, LR scheduler, loop counters and callback/DataModule state;
it does not save the RNG states, and its MLFlowLogger starts a new run unless it is given a run id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import random

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from mlflow import MlflowClient

from eaft_pl.tracking import mlflow_loggers

__all__ = ["ResumeState", "rng_states", "set_rng_states", "checkpoint_run_id", "continue_mlflow_run", "latest_resumable_run"]

#: Key of this module's entry in a Lightning checkpoint.
CHECKPOINT_KEY = "eaft_pl_resume"


def rng_states() -> Dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and python, as tensors, ints and
    strings only: Lightning loads checkpoints with ``weights_only=True``, which refuses numpy arrays."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    """Put back what :func:`rng_states` returned (CUDA only where there is CUDA)."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


class ResumeState(Callback):
    """Stores the RNG states (torch, CUDA, numpy, python) and the MLflow run id in every checkpoint
    and restores the RNG states when training resumes.

    The states are put back in ``on_train_start``: after everything a resumed run does that the
    uninterrupted one does not (sanity validation, re-creating the data iterator), so dropout and
    every other random draw of the next step are those of the uninterrupted run. The states are
    rank 0's: ``seed_everything`` gives every rank the same streams.

    Args:
        enabled: Save and restore the states (``--resume.enabled=false`` switches it off).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._rng_to_restore: Optional[Dict[str, Any]] = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        run_ids = [lg.run_id for lg in mlflow_loggers(trainer)]
        checkpoint[CHECKPOINT_KEY] = {"rng_states": rng_states(), "mlflow_run_id": run_ids[0] if run_ids else None}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Dict[str, Any]) -> None:
        if self.enabled and CHECKPOINT_KEY in checkpoint:
            self._rng_to_restore = checkpoint[CHECKPOINT_KEY]["rng_states"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def checkpoint_run_id(path: str) -> Optional[str]:
    """The MLflow run id stored in the checkpoint at ``path``, or None.

    Memory-maps the file, so the tensors are not read: cheap even for a large model. Loaded with
    ``weights_only`` (no pickled code), as Lightning loads it to resume. A sharded FSDP checkpoint
    (``state_dict_type: sharded``) is a folder whose ``meta.pt`` holds everything but the tensors.
    """
    if Path(path).is_dir():
        path = str(Path(path) / "meta.pt")
        if not Path(path).is_file():
            return None
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return (checkpoint.get(CHECKPOINT_KEY) or {}).get("mlflow_run_id")


def latest_resumable_run(client: Any, experiment_id: str) -> Optional[str]:
    """The most recently started run of the experiment whose ``checkpoint_dir`` tag (set by
    :class:`eaft_pl.tracking.MLflowSaveConfig`) holds a ``last*.ckpt``, or None."""
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=200)
    for run in runs:
        folder = run.data.tags.get("checkpoint_dir")
        if folder and any(Path(folder).glob("last*.ckpt")):
            return run.info.run_id
    return None


def _resume_run_id(trainer: pl.Trainer, ckpt_path: str, client: Any, experiment_name: str) -> Optional[str]:
    if ckpt_path != "last":
        return checkpoint_run_id(ckpt_path) if Path(ckpt_path).exists() else None
    folders = [cb.dirpath for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    if folders:  # a fixed folder: Lightning takes its newest last*.ckpt; so do we
        found = sorted((p for d in folders for p in Path(d).glob("last*.ckpt")), key=lambda p: p.stat().st_mtime)
        return checkpoint_run_id(str(found[-1])) if found else None
    experiment = client.get_experiment_by_name(experiment_name)
    return latest_resumable_run(client, experiment.experiment_id) if experiment is not None else None


def continue_mlflow_run(trainer: pl.Trainer, ckpt_path: Optional[str]) -> Optional[str]:
    """Point the trainer's MLFlowLoggers at the run a resumed ``fit`` comes from and mark it RUNNING.

    ``ckpt_path`` is a file (its stored run id) or ``"last"``: with a ModelCheckpoint ``dirpath``
    the run id of that folder's newest ``last*.ckpt``; without one (the folder is
    ``<root>/<experiment id>/<run id>/checkpoints``, which depends on the run) the newest run of the
    logger's experiment with a ``last*.ckpt``, whose folder Lightning's ``"last"`` then finds.
    Returns the run id, or None (a new run) for other values, no checkpoint or no stored id.
    """
    loggers = [lg for lg in mlflow_loggers(trainer) if not lg._initialized]  # no run created yet
    if not ckpt_path or ckpt_path in ("best", "hpc") or not loggers:
        return None
    # MLFlowLogger creates its run on first use; until then only its constructor arguments exist.
    client = MlflowClient(loggers[0]._tracking_uri)
    run_id = _resume_run_id(trainer, str(ckpt_path), client, loggers[0]._experiment_name)
    if run_id is None:
        return None
    for logger in loggers:
        logger._run_id = run_id
    if trainer.is_global_zero:
        client.update_run(run_id, status="RUNNING")
    return run_id
