"""Exact resume: a run stopped by a signal mid-epoch and resumed with ``--ckpt_path last`` trains on
the same batches with the same losses and ends with the same weights as an uninterrupted run, on
the same MLflow run."""

import json
import signal
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import REPO
from eaft_pl.cli import cli_main

DATA = REPO / "data" / "quickstart"
BASE = REPO / "configs" / "setup" / "quickstart.yaml"
# 24 chats in micro-batches of 4: 6 micro-batches = 3 optimizer steps of 2 per epoch; 6 steps = 2 epochs.
EXAMPLES, BATCH, STEPS = 24, 4, 6
MODEL = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 192,
    "tie_word_embeddings": True, "attention_dropout": 0.2,  # dropout: the RNG streams matter
}  # fmt: skip


# SIGTERM after micro-batch 3, the first half of step 2 (of 3 in the first epoch): the stop comes
# at the end of step 2. After micro-batch 5, in the epoch's last step: the epoch ends as usual and the
# stop comes at the end of step 4, the first of the next epoch.
STOPS = {3: 2, 5: 4}
# Validation every 4 micro-batches (steps 2, 4, 6): one is due at the stop, and must run first.
VALIDATE = ["--trainer.limit_val_batches=2", "--trainer.val_check_interval=4"]


def fit_args(tmp_path, name, extra=()):
    train = tmp_path / "train.jsonl"
    if not train.exists():
        train.write_text("".join((DATA / "train.jsonl").read_text().splitlines(keepends=True)[:EXAMPLES]))
    return [
        "fit", "--config", str(BASE),
        f"--model.init_args.model_config={json.dumps(MODEL)}",
        f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1",
        f"--data.init_args.train_file={train}", f"--data.init_args.val_file={DATA / 'val.jsonl'}",
        f"--data.init_args.tokenizer_name_or_path={DATA / 'tokenizer'}", f"--data.init_args.batch_size={BATCH}",
        f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"--trainer.logger.init_args.experiment_name={name}",
        f"--trainer.default_root_dir={tmp_path}/{name}/outputs",
        "--trainer.callbacks+=resume_helpers.StepRecorder",
        f"--trainer.callbacks.path={tmp_path}/{name}/steps.jsonl",
        *extra,
    ]  # fmt: skip


def rows(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / name / "steps.jsonl").read_text().splitlines()]


def the_run(tmp_path, name):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    return client, run


def weights(run):
    path = Path(run.data.tags["checkpoint_dir"]) / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    return tmp_path


@pytest.mark.parametrize("signal_at", sorted(STOPS))
def test_a_run_stopped_mid_epoch_resumes_exactly(in_tmp, signal_at):
    cli_main(fit_args(in_tmp, "straight", VALIDATE))
    # The signal lands in the middle of a step: the run finishes that step (or, in an epoch's last
    # step, the next one), saves last.ckpt and exits with 128 + 15.
    signal_args = [f"--trainer.callbacks.signal_at={signal_at}"]
    with pytest.raises(SystemExit) as stopped:
        cli_main(fit_args(in_tmp, "resumed", [*VALIDATE, *signal_args]))
    assert stopped.value.code == 128 + signal.SIGTERM
    client, run = the_run(in_tmp, "resumed")
    assert run.info.status == "KILLED"
    first = rows(in_tmp, "resumed")
    stop = STOPS[signal_at]
    assert len(first) == 2 * stop and first[-1]["global_step"] == stop  # stopped at the step boundary

    cli_main(fit_args(in_tmp, "resumed", [*VALIDATE, *signal_args, "--ckpt_path=last"]))  # the same config
    straight, resumed = rows(in_tmp, "straight"), rows(in_tmp, "resumed")
    assert len(straight) == len(resumed) == 2 * STEPS  # nothing repeated, nothing skipped
    for a, b in zip(straight, resumed):
        assert (a["epoch"], a["batch_idx"], a["global_step"]) == (b["epoch"], b["batch_idx"], b["global_step"])
        assert a["examples"] == b["examples"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert straight[3]["examples"] != straight[4]["examples"]
    assert straight[0]["examples"] != straight[6]["examples"]  # a new shuffle in the second epoch

    # One MLflow run, continued: every step logged once, the config logged once.
    client, run = the_run(in_tmp, "resumed")
    _, straight_run = the_run(in_tmp, "straight")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(STEPS))
    straight_history = client.get_metric_history(straight_run.info.run_id, "train/loss")
    assert [m.value for m in history] == pytest.approx([m.value for m in straight_history], rel=1e-6)
    # The validation due at the stop ran before it, once: three evaluations, as uninterrupted.
    val = client.get_metric_history(run.info.run_id, "val/domain/ce")
    straight_val = client.get_metric_history(straight_run.info.run_id, "val/domain/ce")
    assert len(val) == len(straight_val) == 3 and [m.step for m in val] == [m.step for m in straight_val]
    assert [m.value for m in val] == pytest.approx([m.value for m in straight_val], rel=1e-6)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id) if a.path.startswith("config")) == ["config.yaml"]

    assert [p.name for p in Path(run.data.tags["checkpoint_dir"]).glob("last*")] == ["last.ckpt"]  # no last-v1
    final, reference = weights(run), weights(straight_run)
    assert final.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-6, atol=0)


def test_a_resumed_run_logs_its_config_again_only_when_it_changed(tmp_path):
    from eaft_pl.tracking import config_artifact_name

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("configs")).info.run_id
    start = "trainer:\n  max_steps: 6\nckpt_path: null\n"
    assert config_artifact_name(client, run_id, start) == "config.yaml"
    client.log_text(run_id, start, "config.yaml")
    # Resuming with the same config (only ckpt_path differs): nothing new.
    assert config_artifact_name(client, run_id, start.replace("null", "last")) is None
    longer = "trainer:\n  max_steps: 12\nckpt_path: last\n"
    assert config_artifact_name(client, run_id, longer) == "config-resume-1.yaml"
    client.log_text(run_id, longer, "config-resume-1.yaml")
    assert config_artifact_name(client, run_id, longer) is None  # that resume's config, again
    assert config_artifact_name(client, run_id, longer.replace("12", "18")) == "config-resume-2.yaml"


def test_the_sampler_resumes_mid_epoch_and_warns_when_the_data_changed():
    from eaft_pl.data.sampling import ResumableSampler

    sampler = ResumableSampler(range(10), seed=3)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == list(range(10)) and order != list(ResumableSampler(range(10), seed=3))  # epoch 0 differs
    state = sampler.state_dict(consumed_samples=4)

    resumed = ResumableSampler(range(10), seed=99)  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    assert list(resumed) == order[4:] and len(resumed) == 10
    resumed.set_epoch(2)
    assert len(list(resumed)) == 10  # only the interrupted epoch is cut

    finished = ResumableSampler(range(10))
    finished.load_state_dict({**state, "consumed_samples": 10})  # saved at the end of epoch 1
    assert finished.epoch == 2 and len(list(finished)) == 10
    with pytest.warns(UserWarning, match="resuming with 12 training examples on 1 rank.*the checkpoint had 10"):
        ResumableSampler(range(12)).load_state_dict(state)


def test_two_ranks_resume_their_own_shards():
    from eaft_pl.data.sampling import ResumableSampler

    ranks = [ResumableSampler(range(10), num_replicas=2, rank=r, seed=5) for r in (0, 1)]
    full = [list(s) for s in ranks]
    assert sorted(full[0] + full[1]) == list(range(10))  # disjoint shards, as DistributedSampler
    states = [s.state_dict(consumed_samples=2) for s in ranks]  # 2 micro-batches of 1 per rank
    resumed = [ResumableSampler(range(10), num_replicas=2, rank=r) for r in (0, 1)]
    for sampler, state in zip(resumed, states):
        sampler.load_state_dict(state)
    assert [list(s) for s in resumed] == [f[2:] for f in full]


def test_the_run_id_is_read_from_a_checkpoint_file_or_a_sharded_checkpoint_folder(tmp_path):
    # FSDP with state_dict_type: sharded writes a folder whose meta.pt holds the non-tensor state.
    from eaft_pl.training.resume import CHECKPOINT_KEY, checkpoint_run_id

    state = {CHECKPOINT_KEY: {"mlflow_run_id": "abc123"}, "global_step": 4}
    torch.save(state, tmp_path / "last.ckpt")
    assert checkpoint_run_id(str(tmp_path / "last.ckpt")) == "abc123"
    folder = tmp_path / "sharded" / "last.ckpt"
    folder.mkdir(parents=True)
    assert checkpoint_run_id(str(folder)) is None  # no metadata: no run to continue
    torch.save(state, folder / "meta.pt")
    assert checkpoint_run_id(str(folder)) == "abc123"
