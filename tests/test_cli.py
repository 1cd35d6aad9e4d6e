"""The eaft-pl CLI: a real fit in-process that writes an MLflow run, the other subcommands, --help,
every shipped config, and one end-to-end run through the console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import REPO
from eaft_pl.cli import cli_main

CONFIGS = REPO / "configs"
BASE = CONFIGS / "setup" / "quickstart.yaml"
DATA = REPO / "data" / "quickstart"

METRICS = ["ce", "loss", "label_prob", "topk_entropy", "eaft_weight", "weight", "conflict_share", "tokens"]


def quick_args(tmp_path, method="eaft", steps=6, extra=()):
    """Quickstart config, shortened, with every path made absolute (the test runs in tmp_path)."""
    return [
        "--config", str(BASE),
        "--config", str(CONFIGS / "method" / f"{method}.yaml"),
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=6",
        "--trainer.log_every_n_steps=1",
        f"--data.init_args.train_file={DATA / 'train.jsonl'}",
        f"--data.init_args.val_file={DATA / 'val.jsonl'}",
        f"--data.init_args.tokenizer_name_or_path={DATA / 'tokenizer'}",
        # Absolute: MLflow caches its store per URI string, so a relative one would keep pointing at
        # the first test's folder after the working directory changes.
        f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        *extra,
    ]  # fmt: skip


def runs(tmp_path, experiment="quickstart"):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # mlruns/ and outputs/ are relative to the working directory
    return tmp_path


def test_fit_writes_an_mlflow_run_with_metrics_config_and_tags(in_tmp):
    cli_main(["fit", *quick_args(in_tmp)])
    client, found = runs(in_tmp)
    (run,) = found
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in METRICS:
        assert f"train/{name}" in metrics and f"val/domain/{name}" in metrics, name
    assert "train/lr" in metrics
    # Training steps are logged with the optimizer step; 6 steps x 1 = 6 points, from step 0.
    history = client.get_metric_history(run.info.run_id, "train/ce")
    assert [m.step for m in history] == list(range(6))
    assert history[-1].value < history[0].value  # it learns
    # The mean EAFT weight and the active gate's weight coincide for the EAFT gate.
    assert metrics["train/weight"] == pytest.approx(metrics["train/eaft_weight"], rel=1e-5)
    # The supervised tokens of a step: 2 micro-batches of 16 chats, about 40 answer tokens each.
    assert 500 < metrics["train/tokens"] < 3000

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data_summary.json"} <= artifacts
    # The training diagnostics are on by default: metrics and a JSON + PNG per evaluation (steps 3, 6).
    assert {"val/domain/ce_high_entropy", "val/domain/grad_norm_weighted_all"} <= set(metrics)
    diagnostics = {a.path for a in client.list_artifacts(run.info.run_id, "diagnostics/val_domain")}
    assert diagnostics == {f"diagnostics/val_domain/step_{s:06d}.{ext}" for s in (3, 6) for ext in ("json", "png")}
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(in_tmp))).read_text())
    assert config["model"]["init_args"]["gate"]["class_path"] == "eaft_pl.loss.gates.EAFTGate"
    assert config["trainer"]["max_steps"] == 6
    assert config["model"]["init_args"]["model_config"]["max_position_embeddings"] == 192  # interpolated

    tags = run.data.tags
    assert tags["method"] == "eaft" and tags["stage"] == "fit"
    assert tags["model"] == "config:llama" and tags["data"].endswith("train.jsonl")
    ckpt_dir = Path(tags["checkpoint_dir"])
    assert ckpt_dir == in_tmp / "outputs" / run.info.experiment_id / run.info.run_id / "checkpoints"
    assert (ckpt_dir / "last.ckpt").is_file()


def test_validate_and_test_from_a_checkpoint(in_tmp):
    cli_main(["fit", *quick_args(in_tmp, method="sft", steps=3)])  # 6 micro-batches: ends on a validation
    _, (fit_run,) = runs(in_tmp)
    ckpt = Path(fit_run.data.tags["checkpoint_dir"]) / "last.ckpt"
    common = quick_args(in_tmp, method="sft") + [f"--data.init_args.test_file={DATA / 'val.jsonl'}"]
    cli_main(["validate", *common, f"--ckpt_path={ckpt}"])
    cli_main(["test", *common, f"--ckpt_path={ckpt}"])
    _, (_, val_run, test_run) = runs(in_tmp)
    assert val_run.data.tags["stage"] == "validate" and test_run.data.tags["stage"] == "test"
    # The same weights on the same data: validate and test agree with the end of training.
    assert val_run.data.metrics["val/domain/ce"] == pytest.approx(test_run.data.metrics["test/domain/ce"], rel=1e-5)
    assert val_run.data.metrics["val/domain/ce"] == pytest.approx(fit_run.data.metrics["val/domain/ce"], rel=1e-5)
    assert val_run.data.metrics["val/domain/weight"] == 1.0  # SFT


def test_predict_writes_per_example_statistics(in_tmp):
    cli_main(["fit", *quick_args(in_tmp, method="sft", steps=3)])
    _, (fit_run,) = runs(in_tmp)
    ckpt = Path(fit_run.data.tags["checkpoint_dir"]) / "last.ckpt"
    out = in_tmp / "preds" / "val.jsonl"
    cli_main(["predict", *quick_args(in_tmp, method="sft"), f"--ckpt_path={ckpt}", f"--predictions.output_file={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    val_lines = (DATA / "val.jsonl").read_text().splitlines()
    assert len(rows) == len(val_lines)
    assert [r["source"] for r in rows] == [f"{DATA / 'val.jsonl'}:{i + 1}" for i in range(len(val_lines))]
    assert all(r["tokens"] > 0 and r["ce"] > 0 and r["weight"] == 1.0 for r in rows)
    # The token-weighted mean of the per-example CE is the validation CE of the same checkpoint.
    mean_ce = sum(r["ce"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)
    assert mean_ce == pytest.approx(fit_run.data.metrics["val/domain/ce"], rel=1e-4)
    client, (_, predict_run) = runs(in_tmp)
    assert "val.jsonl" in {a.path for a in client.list_artifacts(predict_run.info.run_id)}
    assert not list(out.parent.glob("*.tmp"))


def test_help_shows_the_docstrings(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.help", "eaft_pl.EAFTModule"])
    out = capsys.readouterr().out
    assert "Peak AdamW learning rate" in out and "--model.gate" in out
    # Every option of a full config, with its documentation as a YAML comment.
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(BASE), "--print_config=comments"])
    out = capsys.readouterr().out
    assert "# Peak AdamW learning rate (the paper: 1e-5)" in out
    assert "known subclasses:" in out and "eaft_pl.loss.SigmoidGate" in out
    assert "# Truncate conversations to this many tokens" in out


def test_the_quickstart_ends_on_a_validation_and_a_checkpoint():
    # Lightning validates (and ModelCheckpoint saves) every val_check_interval micro-batches. The last
    # optimizer step must coincide with one, or the final model is neither evaluated nor saved.
    cfg = yaml.safe_load(BASE.read_text())
    trainer, data = cfg["trainer"], cfg["data"]["init_args"]
    examples = len((REPO / data["train_file"]).read_text().splitlines())
    batches_per_epoch = -(-examples // data["batch_size"])
    accumulate = trainer["accumulate_grad_batches"]
    assert batches_per_epoch % accumulate == 0, "each epoch would end with a short step"
    micro_batches = trainer["max_steps"] * accumulate
    assert micro_batches % trainer["val_check_interval"] == 0


def test_command_line_overrides_reach_interpolated_values(in_tmp):
    # omegaconf+ resolves ${...} after all overrides: the seed moves the base path and the torch seed.
    cli = cli_main(["--config", str(CONFIGS / "setup" / "toy_finetune.yaml"), "--data.init_args.seed=2"], run=False)
    assert cli.config["seed_everything"] == 2
    assert cli.config["model"]["init_args"]["model_name_or_path"].endswith("base-seed2")
    cli = cli_main(["--config", str(CONFIGS / "setup" / "toy_pretrain.yaml"), "--data.init_args.seed=1", "--data.init_args.max_length=48"], run=False)
    assert cli.config["trainer"]["logger"]["init_args"]["run_name"] == "base-seed1"
    assert cli.config["model"]["init_args"]["model_config"]["max_position_embeddings"] == 48


@pytest.mark.slow
def test_console_script_end_to_end(in_tmp):
    script = Path(sys.executable).parent / "eaft-pl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(script), "fit", *quick_args(in_tmp, steps=3)], cwd=in_tmp, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "object at 0x" not in proc.stdout + proc.stderr  # the entry point returns nothing to print
    _, (run,) = runs(in_tmp)
    assert run.info.status == "FINISHED" and "val/domain/ce" in run.data.metrics
