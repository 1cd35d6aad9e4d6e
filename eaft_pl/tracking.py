"""Run records for any logger: the resolved config, run tags, the data summary, and the files a run
keeps (figures, evaluation tables). They go to the MLflow run where the trainer has an
``MLFlowLogger``, and into the ``log_dir`` of every other logger (TensorBoard, CSV) as plain files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_warn

from eaft_pl.fileio import atomic_write

__all__ = [
    "MLflowSaveConfig", "TAGS_FILE", "config_artifact_name", "log_figure", "log_files", "log_json", "log_text", "next_config_name",
    "logger_folders", "mlflow_loggers", "run_tags", "set_tags",
]  # fmt: skip

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"

#: Where the run tags of a logger without tags (TensorBoard, CSV) are kept, in its ``log_dir``.
TAGS_FILE = "tags.json"


def mlflow_loggers(trainer: pl.Trainer) -> Iterator[MLFlowLogger]:
    """The trainer's ``MLFlowLogger`` instances."""
    return (lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger))


def logger_folders(trainer: pl.Trainer) -> List[Path]:
    """The distinct ``log_dir`` folders of the trainer's loggers other than MLflow, in logger order.

    A logger with neither MLflow artifacts nor a ``log_dir`` (a custom or hosted one) is warned about
    once per logger type: the files of the run are not kept by it.
    """
    folders: List[Path] = []
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            continue
        folder = _log_dir(logger)
        if folder is None:
            _warn_no_folder(type(logger).__name__)
        elif folder not in folders:  # TensorBoard and CSV loggers often share one version folder
            folders.append(folder)
    return folders


def _log_dir(logger: Logger) -> Optional[Path]:
    folder = getattr(logger, "log_dir", None)
    return Path(folder).absolute() if folder else None


_WARNED: set = set()


def _warn_no_folder(kind: str) -> None:
    if kind not in _WARNED:
        _WARNED.add(kind)
        rank_zero_warn(
            f"{kind} has no log_dir and is no MLFlowLogger: the run's config, figures and evaluation tables are "
            "not kept by it. Add a TensorBoardLogger, CSVLogger or MLFlowLogger to trainer.logger to keep them"
        )


def _deliver(trainer: pl.Trainer, to_mlflow: Callable[[Any, str], None], to_folder: Callable[[Path], None]) -> None:
    """Call ``to_mlflow(client, run_id)`` for each MLflow logger and ``to_folder(log_dir)`` for each
    other logger's folder, so that every logger keeps the record."""
    for logger in mlflow_loggers(trainer):
        to_mlflow(logger.experiment, logger.run_id)
    for folder in logger_folders(trainer):
        to_folder(folder)


def log_text(trainer: pl.Trainer, text: str, name: str) -> None:
    """Keep ``text`` as the file ``name`` (a relative path, e.g. ``forgetting/scores.json``) of the run:
    an MLflow artifact, or ``<log_dir>/<name>`` for TensorBoard and CSV loggers."""
    _deliver(
        trainer,
        lambda client, run_id: client.log_text(run_id, text, name),
        lambda folder: atomic_write(folder / name, lambda p: p.write_text(text)),
    )


def log_json(trainer: pl.Trainer, obj: Any, name: str, default: Optional[Callable[[Any], Any]] = None) -> None:
    """:func:`log_text` of ``obj`` as indented JSON; ``default`` serialises what JSON cannot."""
    log_text(trainer, json.dumps(obj, indent=2, default=default), name)


def log_figure(trainer: pl.Trainer, figure: Any, name: str) -> None:
    """Keep a matplotlib figure as the image ``name`` (e.g. ``diagnostics/val/step_000010.png``)."""
    _deliver(
        trainer,
        lambda client, run_id: client.log_figure(run_id, figure, name),
        lambda folder: atomic_write(folder / name, lambda p: figure.savefig(p)),
    )


def log_files(trainer: pl.Trainer, local: Path, folder: Optional[str] = None) -> None:
    """Keep a local file or folder under ``folder`` of the run (at its top when None): an MLflow
    artifact, or a copy in each other logger's ``log_dir``."""
    local = Path(local)

    def to_mlflow(client: Any, run_id: str) -> None:
        if local.is_dir():
            client.log_artifacts(run_id, str(local), folder)
        else:
            client.log_artifact(run_id, str(local), folder)

    def to_folder(log_dir: Path) -> None:
        target = log_dir / folder if folder else log_dir
        if local.is_dir():
            shutil.copytree(local, target, dirs_exist_ok=True)
        else:
            atomic_write(target / local.name, lambda p: shutil.copyfile(local, p))

    _deliver(trainer, to_mlflow, to_folder)


def set_tags(trainer: pl.Trainer, tags: Dict[str, str]) -> None:
    """Run tags: MLflow tags (values cut at MLflow's 5000 characters), merged into ``tags.json`` in
    the ``log_dir`` of the other loggers."""

    def to_mlflow(client: Any, run_id: str) -> None:
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value)[:5000])

    def to_folder(folder: Path) -> None:
        path = folder / TAGS_FILE
        merged = {**(json.loads(path.read_text()) if path.is_file() else {}), **tags}
        atomic_write(path, lambda p: p.write_text(json.dumps(merged, indent=2, sort_keys=True)))

    _deliver(trainer, to_mlflow, to_folder)


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
        "stage": str(getattr(stage, "value", stage)),  # TrainerFn.FITTING -> "fit"
    }


def _without_ckpt_path(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("ckpt_path:"))


def config_artifact_name(client: Any, run_id: str, text: str) -> Optional[str]:
    """``config.yaml`` for a new run; for a resumed one None when the config is that of the run's
    start or of an earlier resume (up to ``ckpt_path``), else the next ``config-resume-<n>.yaml``."""
    names = [a.path for a in client.list_artifacts(run_id) if a.path.startswith("config")]
    with tempfile.TemporaryDirectory() as tmp:
        return next_config_name(names, lambda name: Path(client.download_artifacts(run_id, name, tmp)).read_text(), text)


def next_config_name(names: List[str], read: Callable[[str], str], text: str) -> Optional[str]:
    """The rule of :func:`config_artifact_name` over the config files ``names`` a run has, read by ``read``."""
    names = sorted(names)
    if "config.yaml" not in names:
        return "config.yaml"
    if any(_without_ckpt_path(read(name)) == _without_ckpt_path(text) for name in names):
        return None
    return f"config-resume-{len(names)}.yaml"


def _folder_config_name(folder: Path, text: str) -> Optional[str]:
    names = [p.name for p in folder.glob("config*.yaml")]
    return next_config_name(names, lambda name: (folder / name).read_text(), text)


class MLflowSaveConfig(SaveConfigCallback):
    """Logs the full resolved config as ``config.yaml`` on the MLflow run (instead of writing it into
    the log dir, which a sqlite-backed ``MLFlowLogger`` does not have), sets run tags and logs the
    DataModule's summary (examples kept, truncated and dropped) as ``data_summary.json``. With
    TensorBoard or CSV loggers the same files (and the tags, as ``tags.json``) go into their ``log_dir``.

    MLflow params are cut at 250 characters by Lightning's logger, so the artifact is the record of
    what ran. A resumed run (``fit --ckpt_path``, which continues its MLflow run) keeps its
    ``config.yaml``; a config that differs in more than ``ckpt_path`` is added as
    ``config-resume-<n>.yaml`` (in a log dir the same way).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        text = self.parser.dump(self.config, skip_none=False)
        for logger in mlflow_loggers(trainer):
            client, run_id = logger.experiment, logger.run_id
            name = config_artifact_name(client, run_id, text)
            if name is not None:
                client.log_text(run_id, text, name)
        for folder in logger_folders(trainer):
            name = _folder_config_name(folder, text)
            if name is not None:
                atomic_write(folder / name, lambda p: p.write_text(text))
        set_tags(trainer, run_tags(pl_module, datamodule, stage))
        summary = getattr(datamodule, "summary", None)
        if summary:
            log_json(trainer, summary, "data_summary.json")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The checkpoint folder is only resolved once training starts; put it on the run so it can be
        # found from the UI.
        ckpt = trainer.checkpoint_callback
        if trainer.is_global_zero and ckpt is not None and getattr(ckpt, "dirpath", None):
            set_tags(trainer, {"checkpoint_dir": os.path.abspath(ckpt.dirpath)})
