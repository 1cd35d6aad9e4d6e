"""Runs logged without MLflow keep their records: `eaft-pl fit` in-process with a TensorBoardLogger
and a CSVLogger writes the resolved config, the tags, the diagnostics figures and the forgetting
scores into each logger's log_dir, and `eaft-pl compare` reads the scores back from those folders."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from eaft_pl.cli import cli_main
from eaft_pl.data import ChatJsonlDataModule
from eaft_pl.data.chat import Conversation
from eaft_pl.evaluation.tasks import PerplexityTask
from eaft_pl.tracking import log_json, next_config_name, set_tags
from test_cli import quick_args

VAL = Path(__file__).resolve().parents[1] / "data" / "quickstart" / "val.jsonl"


def _conversations(first: int, last: int):
    records = [json.loads(line) for line in VAL.read_text().splitlines()[first:last]]
    return [Conversation(r["messages"]) if "messages" in r else
            Conversation([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}])
            for r in records]  # fmt: skip


class SuitedQuickstart(ChatJsonlDataModule):
    """The quickstart data plus the two perplexity suites ForgettingCallback scores."""

    def evaluation_suites(self):
        return {"domain": [PerplexityTask("arith", _conversations(0, 8))], "general": [PerplexityTask("more", _conversations(8, 16))]}


def logger_args(logs: Path):
    """The quickstart with a TensorBoardLogger and a CSVLogger instead of its MLflow logger (each in
    its own folder), and forgetting scored every 3 steps."""
    loggers = [
        {"class_path": f"lightning.pytorch.loggers.{kind}", "init_args": {"save_dir": str(logs / folder), "name": "quick-seed0"}}
        for kind, folder in (("TensorBoardLogger", "tb"), ("CSVLogger", "csv"))
    ]
    return [
        f"--trainer.logger={json.dumps(loggers)}",
        "--data.class_path=test_loggers.SuitedQuickstart",
        "--trainer.callbacks+=eaft_pl.evaluation.ForgettingCallback",
        "--trainer.callbacks.every_n_steps=3",
        "--trainer.callbacks.batch_size=8",
    ]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One fit (6 steps) logged by TensorBoard and CSV only."""
    pytest.importorskip("tensorboard")
    tmp_path = tmp_path_factory.mktemp("loggers")
    args = [a for a in quick_args(tmp_path, steps=6) if not a.startswith("--trainer.logger")]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        cli_main(["fit", *args, *logger_args(tmp_path / "logs")])
    return tmp_path / "logs"


@pytest.mark.parametrize("folder", ["tb", "csv"])
def test_a_run_without_mlflow_keeps_config_figures_and_tables_in_its_log_dir(logged, folder):
    (log_dir,) = (logged / folder / "quick-seed0").iterdir()
    assert log_dir.name == "version_0"
    files = {str(p.relative_to(log_dir)) for p in log_dir.rglob("*") if p.is_file()}
    assert {"config.yaml", "tags.json", "data_summary.json", "forgetting/scores.json"} <= files
    # The diagnostics of the evaluations at steps 3 and 6, as an MLflow run has them.
    assert {f"diagnostics/val_domain/step_{s:06d}.{ext}" for s in (3, 6) for ext in ("json", "png")} <= files
    assert (log_dir / "diagnostics/val_domain/step_000006.png").read_bytes()[:4] == b"\x89PNG"
    config = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 6
    assert [lg["class_path"].rsplit(".", 1)[1] for lg in config["trainer"]["logger"]] == ["TensorBoardLogger", "CSVLogger"]
    tags = json.loads((log_dir / "tags.json").read_text())
    assert tags["stage"] == "fit" and tags["method"] == "eaft" and "checkpoint_dir" in tags
    history = json.loads((log_dir / "forgetting/scores.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 3, 6]
    assert set(history[0]["scores"]) == {"domain", "general"}


@pytest.mark.parametrize("option, folder", [("--tensorboard", "tb"), ("--csv", "csv")])
def test_compare_reads_the_scores_back_from_the_log_folders(logged, option, folder):
    from eaft_pl.analysis.compare import main as compare

    (log_dir,) = (logged / folder / "quick-seed0").iterdir()
    history = json.loads((log_dir / "forgetting/scores.json").read_text())["history"]
    table = compare([option, str(logged / folder), "--domain_metric", "ce", "--general_metric", "ce", "--scale", "1"])
    (row,) = table["rows"]
    assert row["label"] == "quick" and row["n"] == 1  # the logger's name without its seed part
    # Base: the scores before the first step; result: those at the last evaluation (step 6).
    assert row["domain"]["arith"]["mean"] == pytest.approx(history[-1]["scores"]["domain"]["arith"]["ce"], rel=1e-6)
    assert table["base"]["general"]["more"]["mean"] == pytest.approx(history[0]["scores"]["general"]["more"]["ce"], rel=1e-6)


class NoFolderLogger(Logger):
    """A logger with metrics only (as a hosted service's): no log_dir, no MLflow artifacts."""

    name, version = "nofolder", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_each_folder_gets_the_file_once_and_a_logger_without_one_is_warned_about(tmp_path):
    shared = [CSVLogger(tmp_path, name="run"), TensorBoardLogger(tmp_path, name="run", version=0)]  # one folder
    trainer = SimpleNamespace(loggers=[*shared, CSVLogger(tmp_path / "other", name="run"), NoFolderLogger()])
    with pytest.warns(UserWarning, match="NoFolderLogger has no log_dir"):
        log_json(trainer, {"a": 1}, "tables/scores.json")
    for folder in (tmp_path / "run" / "version_0", tmp_path / "other" / "run" / "version_0"):
        assert json.loads((folder / "tables" / "scores.json").read_text()) == {"a": 1}
    set_tags(trainer, {"stage": "fit"})
    set_tags(trainer, {"model": "base"})  # merged, not replaced
    assert json.loads((tmp_path / "run" / "version_0" / "tags.json").read_text()) == {"model": "base", "stage": "fit"}


def test_a_resumed_run_adds_its_config_to_a_log_dir_only_when_it_changed():
    logged = {}
    start = "trainer:\n  max_steps: 6\nckpt_path: null\n"
    assert next_config_name(list(logged), logged.get, start) == "config.yaml"
    logged["config.yaml"] = start
    assert next_config_name(list(logged), logged.get, start.replace("null", "last")) is None
    assert next_config_name(list(logged), logged.get, start.replace("6", "12")) == "config-resume-1.yaml"
