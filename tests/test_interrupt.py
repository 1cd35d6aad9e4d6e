"""Interruption: a signal from outside stops a `fit` process at an optimizer step with a loadable
last.ckpt, a KILLED MLflow run and exit status 128 + signal, and the run resumes from it; a crash
marks the run FAILED and writes no checkpoint; a save that fails half-way leaves the previous
last.ckpt intact and no temporary file."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from eaft_pl.training.checkpoint_io import AtomicCheckpointIO
from eaft_pl.cli import cli_main
from test_resume import STEPS, fit_args, rows, the_run


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    return tmp_path


def start_fit(tmp_path, extra=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    code = "from eaft_pl.cli import main; main()"
    args = fit_args(tmp_path, "run", extra)
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(tmp_path, proc, count, timeout=240):
    steps = tmp_path / "run" / "steps.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if steps.exists() and len(steps.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"training did not reach micro-batch {count}: {proc.communicate()[0][-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_a_killed_run(in_tmp, signum):
    proc = start_fit(in_tmp)
    wait_for_steps(in_tmp, proc, 1)  # training has started
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, out[-3000:]
    client, run = the_run(in_tmp, "run")
    assert run.info.status == "KILLED"
    done = rows(in_tmp, "run")
    assert 0 < len(done) < 2 * STEPS and len(done) % 2 == 0  # stopped between optimizer steps
    last = Path(run.data.tags["checkpoint_dir"]) / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)  # loads as Lightning loads it
    assert checkpoint["global_step"] == len(done) // 2
    assert checkpoint["eaft_pl_resume"]["mlflow_run_id"] == run.info.run_id

    if signum == signal.SIGINT:
        return  # the resume is the same after either signal (test_resume checks it exactly)
    # Resumed from the file (test_resume uses `last`) on the same run: every micro-batch once, every
    # step logged once.
    cli_main(fit_args(in_tmp, "run", [f"--ckpt_path={last}"]))
    client, run = the_run(in_tmp, "run")
    assert run.info.status == "FINISHED"
    seen = [(r["epoch"], r["batch_idx"]) for r in rows(in_tmp, "run")]
    assert seen == [(e, b) for e in range(2) for b in range(STEPS)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(STEPS))


def test_a_crash_marks_the_run_failed_and_writes_no_checkpoint(in_tmp):
    with pytest.raises(RuntimeError, match="injected failure in micro-batch 3"):
        cli_main(fit_args(in_tmp, "run", ["--trainer.callbacks.raise_at=3"]))
    _, run = the_run(in_tmp, "run")
    assert run.info.status == "FAILED"
    assert not list((in_tmp / "run" / "outputs").rglob("*.ckpt"))  # mid-step state is not saved


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "global_step": 1}, target)

    real_save = torch.save

    def half_then_die(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # a partial file on disk, as a kill mid-write leaves
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(torch, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, target)
    monkeypatch.undo()
    assert os.listdir(target.parent) == ["last.ckpt"]
    previous = io.load_checkpoint(target)
    assert previous["global_step"] == 1 and torch.equal(previous["state_dict"]["w"], torch.arange(4.0))


def test_the_cli_writes_checkpoints_through_the_atomic_plugin(in_tmp):
    cli = cli_main(fit_args(in_tmp, "run")[1:], run=False)  # no subcommand with run=False
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_every_rank_stops_when_any_rank_got_the_signal():
    # Saving is a collective: the rank that got no signal must stop at the same step as the one that did.
    from types import SimpleNamespace

    from eaft_pl.training.interrupt import GracefulStop

    def trainer(world_size, others_received):
        def reduce(flag, reduce_op):
            assert reduce_op == "sum"
            return flag + float(others_received)  # the other rank's flag

        return SimpleNamespace(world_size=world_size, strategy=SimpleNamespace(reduce=reduce))

    module = SimpleNamespace(device=torch.device("cpu"))
    quiet, signalled = GracefulStop(), GracefulStop()
    signalled.received = signal.SIGTERM
    assert quiet._any_rank_received(trainer(2, others_received=True), module)
    assert not quiet._any_rank_received(trainer(2, others_received=False), module)
    assert signalled._any_rank_received(trainer(2, others_received=False), module)
    assert not quiet._any_rank_received(trainer(1, others_received=True), module)  # one process: no collective
