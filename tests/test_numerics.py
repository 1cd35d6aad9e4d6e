"""Numerical faults: a step with a non-finite loss or gradient is skipped (weights and AdamW state
unchanged), counted, logged to MLflow, and training stops past ``max_skipped_steps`` naming the step
and batch; a DDP rank whose micro-batch has no supervised token neither hangs nor changes the
gradients. (Extreme logits through every gate: tests/test_losses.py.)"""

import json
import math
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from torch.utils.data import DataLoader

from conftest import TINY_LLAMA
from test_module import RECORDS, InOrderData
from eaft_pl import EAFTModule
from eaft_pl.data.chat import EncodedExample, collate
from eaft_pl.loss.gates import EAFTGate
from eaft_pl.loss.stats import IGNORE_INDEX
from eaft_pl.training.numerics import NonFiniteStepError, all_finite

TESTS = Path(__file__).resolve().parent


class Poisoned(EAFTModule):
    """Poisons chosen micro-batches: ``"loss"`` multiplies the loss by NaN (NaN loss and gradients),
    ``"grad"`` writes an inf into one gradient after backward (finite loss)."""

    poison: dict = {}

    def training_step(self, batch, batch_idx):
        self._current = batch_idx
        return super().training_step(batch, batch_idx)

    def token_stats(self, batch, **kwargs):
        stats, weights, total = super().token_stats(batch, **kwargs)
        if self.training and self.poison.get(getattr(self, "_current", None)) == "loss":
            total = total * float("nan")
        return stats, weights, total

    def on_after_backward(self):
        if self.poison.get(self._current) == "grad":
            next(p for p in self.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


class WithSources(InOrderData):
    """Batches carry their examples' ``file:line`` (``"sources"``), which the error then names."""

    def _loader(self, split, shuffle):
        loader = super()._loader(split, shuffle)
        fill = partial(collate, pad_token_id=self.pad_token_id)

        def with_sources(examples):
            return {**fill(examples), "sources": [e.source for e in examples]}

        return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=with_sources)


def snapshot(module, optimizer):
    """Weights and every AdamW state tensor (moments and step counts), cloned."""
    weights = [p.detach().clone() for p in module.parameters()]
    state = [{k: v.clone() for k, v in optimizer.state.get(p, {}).items()} for p in module.parameters()]
    return weights, state


def same(a, b):
    (wa, sa), (wb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(wa, wb)) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(sa, sb)
    )


class StepRecorder(Callback):
    """Snapshots before and after every micro-batch (one micro-batch is one step here)."""

    def __init__(self):
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[batch_idx] = snapshot(module, trainer.optimizers[0])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[batch_idx] = snapshot(module, trainer.optimizers[0])


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


def fit(train_file, tokenizer_dir, poison, steps=4, accumulate=1, limit=10, precision="32-true", logger=False, callbacks=()):
    pl.seed_everything(0)
    module = Poisoned(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), learning_rate=1e-3, max_skipped_steps=limit)
    module.poison = poison
    data = WithSources(train_file=train_file, tokenizer_name_or_path=str(tokenizer_dir), batch_size=1)
    trainer = pl.Trainer(
        max_steps=steps, accumulate_grad_batches=accumulate, precision=precision, logger=logger, log_every_n_steps=1,
        callbacks=list(callbacks), accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module, trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_non_finite_step_is_skipped_counted_logged_and_training_goes_on(tmp_path, train_file, tokenizer_dir, precision):
    recorder = StepRecorder()
    logger = MLFlowLogger(experiment_name="numerics", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.warns(UserWarning, match=r"optimizer step 1 \(epoch 0\): non-finite loss in batch 1 \(examples .*train.jsonl:2\)"):
        module, trainer = fit(
            train_file, tokenizer_dir, {1: "loss", 2: "grad"}, precision=precision, logger=logger, callbacks=[recorder]
        )
    # Both poisoned steps left the weights and every AdamW moment and step count as they were ...
    for batch_idx in (1, 2):
        assert same(recorder.before[batch_idx], recorder.after[batch_idx]), batch_idx
    # ... the others trained, and the run went on to max_steps.
    for batch_idx in (0, 3):
        assert not same(recorder.before[batch_idx], recorder.after[batch_idx]), batch_idx
    assert trainer.global_step == 4 and module.skipped_steps == 2
    adam_steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert adam_steps == {2.0}  # 4 optimizer steps, 2 of them skipped
    # The schedule is a function of global_step: it advanced through the skipped steps too.
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    history = client.get_metric_history(logger.run_id, "train/skipped_steps")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0)]  # at each skipped step, the count
    # The NaN statistics of the skipped step never reach MLflow.
    ce = client.get_metric_history(logger.run_id, "train/ce")
    assert ce and all(math.isfinite(m.value) for m in ce)


@pytest.mark.parametrize(
    "poison, limit, accumulate, match",
    [
        # 0: stop at the first; the message names the step, the batch and its example.
        ({1: "loss"}, 0, 1, r"optimizer step 1 \(epoch 0\): non-finite loss in batch 1 \(examples \S*train.jsonl:2\)"),
        # The second skipped step exceeds a limit of 1.
        ({0: "loss", 2: "grad"}, 1, 1, r"after 2 skipped steps; last: optimizer step 2 .*finite loss but a non-finite gradient .*batch 2"),
        # Accumulation: step 1 is made of micro-batches 2 and 3; the NaN one is named.
        ({3: "loss"}, 0, 2, r"optimizer step 1 \(epoch 0\): non-finite loss in batch 3 \(examples \S*train.jsonl:4\)"),
    ],
)
def test_past_the_limit_training_stops_naming_step_and_batch(train_file, tokenizer_dir, poison, limit, accumulate, match):
    with pytest.raises(NonFiniteStepError, match=match), pytest.warns(UserWarning):
        fit(train_file, tokenizer_dir, poison, steps=4, accumulate=accumulate, limit=limit)


def test_all_finite_sees_nan_and_inf_in_any_dtype_without_overflowing():
    big = torch.full((3,), 3e38)  # its L2 norm would overflow float32; the max-abs norm does not
    assert bool(all_finite([big, torch.ones(2, dtype=torch.bfloat16)]))
    assert not bool(all_finite([big, torch.tensor([0.0, float("nan")], dtype=torch.bfloat16)]))
    assert not bool(all_finite([torch.tensor([-float("inf")])]))
    assert bool(all_finite([]))


# ---- DDP: a rank whose micro-batch has no supervised token ---------------------------------------


class WithEmptyRank(InOrderData):
    """Training data in the order [a, E, b, E], E an example whose labels are all -100. The unshuffled
    distributed sampler deals indices 0, 2 to rank 0 and 1, 3 to rank 1: rank 1 gets only E."""

    def setup(self, stage=None):
        super().setup(stage)
        a, b = self.datasets["train"][:2]
        empty = EncodedExample(list(b.input_ids), [IGNORE_INDEX] * len(b.input_ids), "empty:1")
        self.datasets["train"] = [a, empty, b, empty]


class SaveGrads(EAFTModule):
    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        if self.trainer.is_global_zero:
            torch.save({n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}, self.grads_path)


def empty_rank_grads(train_file, tokenizer_dir, out, chunk_size, devices, batch_size):
    """One optimizer step on [a, E, b, E]; the gradients it applied are saved to ``out``."""
    pl.seed_everything(0)
    module = SaveGrads(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), gate=EAFTGate(), chunk_size=chunk_size)
    module.grads_path = str(out)
    data = WithEmptyRank(train_file=train_file, tokenizer_name_or_path=str(tokenizer_dir), batch_size=batch_size)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)


class InfLossOnRankOne(EAFTModule):
    """Rank 1's loss is inf while its gradients stay finite (an inf added to the loss only): without
    the flag's all-reduce, rank 1 would skip the step and rank 0 would take it, and the replicas would
    drift apart."""

    def token_stats(self, batch, **kwargs):
        stats, weights, total = super().token_stats(batch, **kwargs)
        return stats, weights, total + float("inf") if self.training and self.global_rank == 1 else total

    def on_train_start(self):
        super().on_train_start()
        self.initial = [p.detach().clone() for p in self.parameters()]

    def on_train_end(self):
        same_as_initial = all(torch.equal(a, b) for a, b in zip(self.initial, self.parameters()))
        torch.save({"skipped": self.skipped_steps, "unchanged": same_as_initial}, f"{self.out}_{self.global_rank}.pt")


def one_rank_inf_loss(train_file, tokenizer_dir, out):
    pl.seed_everything(0)
    module = InfLossOnRankOne(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir))
    module.out = str(out)
    data = InOrderData(train_file=train_file, tokenizer_name_or_path=str(tokenizer_dir), batch_size=2)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)


@pytest.mark.slow
def test_ddp_an_empty_rank_neither_hangs_nor_changes_the_gradients_and_all_ranks_skip_together(tmp_path, train_file, tokenizer_dir):
    # The DDP runs go in a subprocess with a timeout: a hang fails the test instead of blocking CI.
    code = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent)!r}]
        from test_numerics import empty_rank_grads, one_rank_inf_loss
        if __name__ == "__main__":
            for chunk in (None, 5):
                empty_rank_grads({train_file!r}, {str(tokenizer_dir)!r}, {str(tmp_path)!r} + f"/ddp_{{chunk}}.pt", chunk, 2, 2)
            one_rank_inf_loss({train_file!r}, {str(tokenizer_dir)!r}, {str(tmp_path)!r} + "/inf")
        """
    )
    script = tmp_path / "ddp_empty_rank.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for chunk in (None, 5):
        empty_rank_grads(train_file, tokenizer_dir, tmp_path / f"one_{chunk}.pt", chunk, 1, 4)
        one, ddp = torch.load(tmp_path / f"one_{chunk}.pt"), torch.load(tmp_path / f"ddp_{chunk}.pt")
        assert one.keys() == ddp.keys() and one
        for name in one:
            torch.testing.assert_close(ddp[name], one[name], rtol=1e-4, atol=1e-7, msg=name)
    # A non-finite loss on one rank only: both ranks skip the step together (one flag, summed).
    for rank in (0, 1):
        assert torch.load(tmp_path / f"inf_{rank}.pt") == {"skipped": 1, "unchanged": True}, rank


def test_the_skip_count_survives_a_resume(tokenizer_dir):
    # max_skipped_steps bounds the whole run, not each restart of it.
    saved = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir))
    saved.skipped_steps = 3
    checkpoint = {"state_dict": {}}
    saved.on_save_checkpoint(checkpoint)
    resumed = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir))
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.skipped_steps == 3
