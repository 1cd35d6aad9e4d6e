"""Runs repeat exactly: a short toy-world pretraining and fine-tuning, run twice from nothing and once
more with the pretraining stopped by SIGTERM and resumed, log the same value for every metric at
every step (equality, not closeness). The docs' results files rely on it: a results file is only
worth committing if the same command reproduces it (tests/test_toyworld.py recomputes one)."""

import math
import signal
from typing import Dict, List, Tuple

import pytest
import torch
from mlflow import MlflowClient

from eaft_pl.cli import cli_main
from eaft_pl.experiments.toyworld.driver import FINETUNE, METHODS, PRETRAIN

PRETRAIN_STEPS, FINETUNE_STEPS = 12, 6
# Timings differ between runs by nature; every other metric must be equal.
TIMING = ("seconds", "_s", "time")


def _common(root, tokenizer) -> List[str]:
    return [
        "--data.init_args.seed=0", "--data.init_args.n_entities=12", "--data.init_args.n_general_val=64",
        f"--data.init_args.tokenizer_name_or_path={tokenizer}",
        f"--trainer.logger.init_args.tracking_uri=sqlite:///{root}/mlflow.db", f"--trainer.default_root_dir={root}/outputs",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]  # fmt: skip


def pretrain(root, tokenizer, extra=()) -> None:
    cli_main([
        "fit", "--config", str(PRETRAIN), *_common(root, tokenizer),
        f"--trainer.max_steps={PRETRAIN_STEPS}", "--data.init_args.n_pretrain=1024", "--trainer.val_check_interval=4",
        "--trainer.log_every_n_steps=1", "--trainer.enable_checkpointing=true",
        f"--trainer.callbacks.init_args.dirpath={root}/base",
        "--trainer.callbacks+=resume_helpers.StepRecorder", f"--trainer.callbacks.path={root}/steps.jsonl", *extra,
    ])  # fmt: skip


def finetune(root, tokenizer) -> None:
    cli_main([
        "fit", "--config", str(FINETUNE), "--config", str(METHODS / "eaft.yaml"), *_common(root, tokenizer),
        f"--model.init_args.model_name_or_path={root}/base", f"--trainer.max_steps={FINETUNE_STEPS}",
        "--trainer.log_every_n_steps=1", "--trainer.callbacks.init_args.every_n_steps=3", "--cohort.every_n_steps=3",
    ])  # fmt: skip


def metrics(root) -> Dict[Tuple[str, str], List[Tuple[int, float]]]:
    """Every metric of every run in the store at ``root``: (experiment, key) -> [(step, value)]."""
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    out = {}
    for experiment in ("toyworld-base", "toyworld"):
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        for key in run.data.metrics:
            if not any(t in key for t in TIMING):
                # NaN (a cohort with no member) is never equal to itself: compared as the string "nan".
                history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                out[(experiment, key)] = [(step, "nan" if math.isnan(value) else value) for step, value in history]
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from eaft_pl.experiments.toyworld.world import save_world_tokenizer

    return save_world_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer"))


def test_runs_repeat_exactly_from_nothing_and_through_a_stop_and_resume(tmp_path, tokenizer, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as the demo pins it: the thread count orders float reductions
    try:
        logged = {}
        for name in ("first", "second"):
            root = tmp_path / name
            monkeypatch.chdir(tmp_path)
            pretrain(root, tokenizer)
            finetune(root, tokenizer)
            logged[name] = metrics(root)
        root = tmp_path / "resumed"
        with pytest.raises(SystemExit) as stopped:  # SIGTERM in micro-batch 5: stops after step 5 with last.ckpt
            pretrain(root, tokenizer, ["--trainer.callbacks.signal_at=5"])
        assert stopped.value.code == 128 + signal.SIGTERM
        pretrain(root, tokenizer, ["--trainer.callbacks.signal_at=5", "--ckpt_path=last"])
        finetune(root, tokenizer)
        logged["resumed"] = metrics(root)
    finally:
        torch.set_num_threads(threads)
    first = logged["first"]
    assert ("toyworld-base", "train/loss") in first and ("toyworld", "forgetting/general/exact") in first
    assert len(first[("toyworld-base", "train/loss")]) == PRETRAIN_STEPS
    assert len(first) > 20  # every logged metric, not a chosen few
    assert logged["second"] == first
    assert logged["resumed"] == first
