"""MLflow glue: the resolved config as a run artifact, run tags, and the data summary."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

__all__ = ["MLflowSaveConfig", "config_artifact_name", "mlflow_loggers", "run_tags"]

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def mlflow_loggers(trainer: pl.Trainer) -> Iterator[MLFlowLogger]:
    return (lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger))


def run_tags(pl_module: pl.LightningModule, datamodule: Any, stage: str) -> Dict[str, str]:
    """Tags that make runs filterable in the MLflow UI: method, model, data, stage."""
    hp = getattr(pl_module, "hparams", {})
    model = hp.get("model_name_or_path") or f"config:{(hp.get('model_config') or {}).get('model_type', '?')}"
    if datamodule is None:
        data = "none"
    else:
        data = (getattr(datamodule, "files", None) or {}).get("train") or type(datamodule).__name__
    return {
        "method": str(getattr(pl_module, "method", type(pl_module).__name__)),
        "gate": repr(getattr(pl_module, "gate", None)),
        "model": str(model),
        "data": str(data),
        "stage": stage,
    }


def _without_ckpt_path(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("ckpt_path:"))


def config_artifact_name(client: Any, run_id: str, text: str) -> Optional[str]:
    """``config.yaml`` for a new run; for a resumed one None when the config is that of the run's
    start or of an earlier resume (up to ``ckpt_path``), else the next ``config-resume-<n>.yaml``."""
    names = sorted(a.path for a in client.list_artifacts(run_id) if a.path.startswith("config"))
    if "config.yaml" not in names:
        return "config.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            logged = Path(client.download_artifacts(run_id, name, tmp)).read_text()
            if _without_ckpt_path(logged) == _without_ckpt_path(text):
                return None
    return f"config-resume-{len(names)}.yaml"


class MLflowSaveConfig(SaveConfigCallback):
    """Logs the full resolved config as ``config.yaml`` on the MLflow run (instead of writing it into
    the log dir, which a sqlite-backed ``MLFlowLogger`` does not have), sets run tags and logs the
    DataModule's summary (examples kept, truncated and dropped) as ``data_summary.json``.

    MLflow params are cut at 250 characters by Lightning's logger, so the artifact is the record of
    what ran. A resumed run (``fit --ckpt_path``, which continues its MLflow run) keeps its
    ``config.yaml``; a config that differs in more than ``ckpt_path`` is added as
    ``config-resume-<n>.yaml``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        for logger in mlflow_loggers(trainer):
            client, run_id = logger.experiment, logger.run_id
            text = self.parser.dump(self.config, skip_none=False)
            name = config_artifact_name(client, run_id, text)
            if name is not None:
                client.log_text(run_id, text, name)
            for key, value in run_tags(pl_module, datamodule, stage).items():
                client.set_tag(run_id, key, value[:5000])
            summary = getattr(datamodule, "summary", None)
            if summary:
                client.log_dict(run_id, summary, "data_summary.json")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The checkpoint folder is only resolved once training starts; put it on the run so it can be
        # found from the UI.
        ckpt = trainer.checkpoint_callback
        if trainer.is_global_zero and ckpt is not None and getattr(ckpt, "dirpath", None):
            for logger in mlflow_loggers(trainer):
                logger.experiment.set_tag(logger.run_id, "checkpoint_dir", os.path.abspath(ckpt.dirpath))
