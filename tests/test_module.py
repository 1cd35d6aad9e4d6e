"""EAFTModule: step-level token normalisation, model loading, schedule, and per-example predictions."""

import json
import math

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import Logger
import torch

from conftest import TINY_LLAMA
from eaft_pl import EAFTModule
from eaft_pl.models.loading import build_causal_lm
from eaft_pl.loss.gates import EAFTGate, SFTGate
from eaft_pl.module import warmup_cosine
from scale_fit import InOrderData

# Four chats whose answers differ in length, so the two micro-batches of an accumulation window hold
# very different numbers of supervised tokens (ab: short, cd: long).
RECORDS = [
    {"prompt": "a", "response": "1"},
    {"prompt": "b", "response": "22"},
    {"prompt": "c", "response": "a much longer answer than the others"},
    {"prompt": "d", "response": "and another long answer, longer still"},
]


class CaptureGrads(EAFTModule):
    """Keeps the gradients as the optimizer will see them (after eaft-pl's rescaling)."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.captured = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


def first_step_grads(
    train_file, tokenizer_dir, micro_batch, accumulate, normalization="step", gate=None, precision="32-true", steps=1, lr=1e-5
):
    """The gradients of the last of ``steps`` optimizer steps, as the optimizer sees them."""
    pl.seed_everything(0)
    module = CaptureGrads(
        model_config=TINY_LLAMA,
        tokenizer_name_or_path=str(tokenizer_dir),
        gate=gate or EAFTGate(),
        loss_normalization=normalization,
        learning_rate=lr,
    )
    data = InOrderData(train_file=train_file, tokenizer_name_or_path=str(tokenizer_dir), batch_size=micro_batch)
    trainer = pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        precision=precision,
    )
    trainer.fit(module, datamodule=data)
    return module.captured


def assert_grads_close(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("gate", [SFTGate(), EAFTGate()], ids=["sft", "eaft"])
def test_accumulated_micro_batches_equal_one_batch(train_file, tokenizer_dir, gate):
    one_batch = first_step_grads(train_file, tokenizer_dir, micro_batch=4, accumulate=1, gate=gate)
    two_micro = first_step_grads(train_file, tokenizer_dir, micro_batch=2, accumulate=2, gate=gate)
    four_micro = first_step_grads(train_file, tokenizer_dir, micro_batch=1, accumulate=4, gate=gate)
    assert_grads_close(two_micro, one_batch)
    assert_grads_close(four_micro, one_batch)


def test_the_partial_window_at_the_end_of_an_epoch_is_normalised_by_its_own_tokens(tmp_path, train_file, tokenizer_dir):
    # 3 examples, 2 micro-batches per step: step 2 holds only the third example. lr = 1e-30 leaves
    # the weights unchanged by step 1, so step 2's gradients are those of example 3 alone.
    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:3]))
    only_third = tmp_path / "third.jsonl"
    only_third.write_text(json.dumps(RECORDS[2]) + "\n")
    partial = first_step_grads(str(three), tokenizer_dir, micro_batch=1, accumulate=2, steps=2, lr=1e-30)
    alone = first_step_grads(str(only_third), tokenizer_dir, micro_batch=1, accumulate=1)
    assert_grads_close(partial, alone)


def test_micro_batch_means_would_not_be_equal(train_file, tokenizer_dir):
    # The bug the step normalisation prevents: averaging micro-batch means over-weights the tokens of
    # the short micro-batch. This shows the equality test above can fail.
    one_batch = first_step_grads(train_file, tokenizer_dir, micro_batch=4, accumulate=1)
    means = first_step_grads(train_file, tokenizer_dir, micro_batch=2, accumulate=2, normalization="micro_batch")
    diff = max((means[n] - one_batch[n]).abs().max().item() for n in one_batch)
    scale = max(one_batch[n].abs().max().item() for n in one_batch)
    assert diff > 0.05 * scale


def test_bf16_mixed_precision_trains_with_close_gradients(train_file, tokenizer_dir):
    fp32 = first_step_grads(train_file, tokenizer_dir, micro_batch=2, accumulate=2)
    bf16 = first_step_grads(train_file, tokenizer_dir, micro_batch=2, accumulate=2, precision="bf16-mixed")
    a = torch.cat([fp32[n].flatten() for n in fp32])
    b = torch.cat([bf16[n].flatten() for n in fp32])
    assert torch.isfinite(b).all()
    # bf16 keeps 8 bits of mantissa: the direction agrees closely, the values only to about 1%.
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert not torch.equal(a, b)  # autocast really ran in bf16


def test_gradients_equal_the_weighted_loss_gradient(train_file, tokenizer_dir):
    # The rescaled sum equals the gradient of the plain token-mean loss on the same batch.
    grads = first_step_grads(train_file, tokenizer_dir, micro_batch=4, accumulate=1)
    pl.seed_everything(0)
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir))
    module.configure_model()
    data = InOrderData(train_file=train_file, tokenizer_name_or_path=str(tokenizer_dir), batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    stats, weights, _ = module.token_stats(batch)
    ((weights * stats.ce).sum() / stats.num_tokens).backward()
    expected = {f"model.{n}": p.grad for n, p in module.model.named_parameters()}
    assert_grads_close(grads, expected)


def test_a_model_saved_to_disk_loads_through_the_same_path(tmp_path, char_tokenizer):
    torch.manual_seed(0)
    model = build_causal_lm(TINY_LLAMA, char_tokenizer)
    model.save_pretrained(tmp_path / "m")
    char_tokenizer.save_pretrained(tmp_path / "m")
    module = EAFTModule(model_name_or_path=str(tmp_path / "m"))
    module.configure_model()
    module.configure_model()  # idempotent: Lightning calls it again for test after fit
    ids = torch.randint(0, len(char_tokenizer), (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(module(ids), model(input_ids=ids).logits)
    assert len(module.tokenizer) == len(char_tokenizer)


def test_weights_load_in_the_requested_dtype(tmp_path, char_tokenizer):
    build_causal_lm(TINY_LLAMA, char_tokenizer).save_pretrained(tmp_path / "m")
    char_tokenizer.save_pretrained(tmp_path / "m")
    module = EAFTModule(model_name_or_path=str(tmp_path / "m"), torch_dtype="bfloat16")
    module.configure_model()
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="torch_dtype: 'bf16' is not a torch dtype"):
        EAFTModule(model_name_or_path=str(tmp_path / "m"), torch_dtype="bf16").configure_model()


def test_a_loaded_model_trains_in_train_mode(tmp_path, char_tokenizer, train_file):
    # from_pretrained returns eval mode; dropout must be on in training_step, off in validation.
    build_causal_lm(TINY_LLAMA, char_tokenizer).save_pretrained(tmp_path / "m")
    char_tokenizer.save_pretrained(tmp_path / "m")
    modes = []

    class Spy(EAFTModule):
        def training_step(self, batch, i):
            modes.append(("train", self.model.training))
            return super().training_step(batch, i)

        def validation_step(self, batch, i, dataloader_idx=0):
            modes.append(("val", self.model.training))
            return super().validation_step(batch, i, dataloader_idx)

    data = InOrderData(train_file=train_file, val_file=train_file, tokenizer_name_or_path=str(tmp_path / "m"), batch_size=4)
    trainer = pl.Trainer(max_steps=2, val_check_interval=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Spy(model_name_or_path=str(tmp_path / "m")), datamodule=data)
    assert ("train", True) in modes and ("val", False) in modes
    assert ("train", False) not in modes and ("val", True) not in modes


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, char_tokenizer):
    model = build_causal_lm({**TINY_LLAMA, "vocab_size": 50}, None)
    model.save_pretrained(tmp_path / "m")
    char_tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="101 tokens but the model's embedding has 50 rows"):
        EAFTModule(model_name_or_path=str(tmp_path / "m")).configure_model()


def test_gradient_checkpointing_gives_the_same_gradients(train_file, tokenizer_dir):
    data = InOrderData(train_file=train_file, tokenizer_name_or_path=str(tokenizer_dir), batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    grads = []
    for checkpointing in (False, True):
        pl.seed_everything(0)
        module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), gradient_checkpointing=checkpointing)
        module.configure_model()
        name = "is_activation_checkpointing" if hasattr(module.model, "is_activation_checkpointing") else "is_gradient_checkpointing"
        assert getattr(module.model, name) is checkpointing
        module.train()
        stats, weights, _ = module.token_stats(batch)
        ((weights * stats.ce).sum() / stats.num_tokens).backward()
        grads.append({n: p.grad for n, p in module.named_parameters()})
    assert_grads_close(grads[0], grads[1])


class ListLogger(Logger):
    """Keeps every logged metric as (step, name, value)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    name = "list"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.rows += [(step, k, float(v)) for k, v in metrics.items()]

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_train_metrics_cover_every_micro_batch_of_a_step_and_log_its_lr(train_file, tokenizer_dir):
    pl.seed_everything(0)
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), learning_rate=1e-3, warmup_ratio=0.5)
    data = InOrderData(train_file=train_file, tokenizer_name_or_path=str(tokenizer_dir), batch_size=1)
    logger = ListLogger()
    trainer = pl.Trainer(
        max_steps=3, accumulate_grad_batches=4, log_every_n_steps=1, logger=logger, accelerator="cpu",
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    data.setup("fit")
    all_tokens = sum(e.num_supervised for e in data.datasets["train"])
    logged = {(step, name): value for step, name, value in logger.rows}
    # Each step holds all four examples (one epoch per step), the first one included.
    assert [logged[(step, "train/tokens")] for step in range(3)] == [all_tokens] * 3
    # warmup 0.5 of 3 steps = 2 steps: step 0 runs at half the rate, step 1 at the full rate. The rate
    # logged for a step is the one it used, not the scheduler's next value.
    assert [logged[(step, "train/lr")] for step in range(3)] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_metric_sums_stay_float64_under_bf16_true(train_file, tokenizer_dir):
    pl.seed_everything(0)
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir))
    data = InOrderData(train_file=train_file, val_file=train_file, tokenizer_name_or_path=str(tokenizer_dir), batch_size=1)
    trainer = pl.Trainer(precision="bf16-true", logger=False, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    (result,) = trainer.validate(module, datamodule=data)
    assert next(module.model.parameters()).dtype == torch.bfloat16
    assert module.eval_metrics["val_domain"].ce.dtype == torch.float64
    # The exact token-weighted CE of the same bf16 model, summed in float64.
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            stats, _, _ = module.token_stats(batch)
            total += stats.ce.double().sum().item()
            count += stats.num_tokens
    assert result["val/domain/ce"] == pytest.approx(total / count, rel=1e-6)


def test_predict_returns_per_example_means(train_file, tokenizer_dir):
    pl.seed_everything(0)
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir))
    module.configure_model()
    data = InOrderData(train_file=train_file, val_file=train_file, tokenizer_name_or_path=str(tokenizer_dir), batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    out = module.predict_step(batch, 0)
    for i in range(4):
        stats, weights, _ = module.token_stats({k: v[i : i + 1] for k, v in batch.items()})
        assert out["tokens"][i].item() == stats.num_tokens
        for key, values in (("ce", stats.ce), ("label_prob", stats.label_prob), ("topk_entropy", stats.topk_entropy), ("weight", weights)):
            assert out[key][i].item() == pytest.approx(values.mean().item(), rel=1e-5), key


def test_warmup_cosine_schedule():
    total, warmup = 100, 10
    assert warmup_cosine(0, total, warmup) == pytest.approx(0.1)
    assert warmup_cosine(9, total, warmup) == pytest.approx(1.0)
    assert warmup_cosine(10, total, warmup) == pytest.approx(1.0)
    assert warmup_cosine(55, total, warmup) == pytest.approx(0.5)
    assert warmup_cosine(100, total, warmup) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(100, total, warmup, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(32, total, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.32)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of model.init_args.model_name_or_path"),
        ({"model_name_or_path": "x", "model_config": {}}, "exactly one"),
        ({"model_config": TINY_LLAMA, "top_k": 1}, "top_k must be >= 2"),
        ({"model_config": TINY_LLAMA, "top_k": 20.0}, "top_k must be >= 2"),
        ({"model_config": TINY_LLAMA, "learning_rate": -1e-5}, "learning_rate must be > 0"),
        ({"model_config": TINY_LLAMA, "weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"model_config": TINY_LLAMA, "warmup_ratio": 1.0}, "warmup_ratio"),
        ({"model_config": TINY_LLAMA, "loss_normalization": "batch"}, "loss_normalization"),
    ],
)
def test_bad_module_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EAFTModule(**kwargs)
