"""The units EAFTModule's step is made of, without Lightning: the option checks, the step-level token
normalisation, the non-finite step guard and the optimiser's schedule. The fits in test_module.py and
test_numerics.py check the same behaviour end to end."""

import math

import pytest
import torch

from eaft_pl.training.normalization import StepNormalizer, scale_gradients
from eaft_pl.training.numerics import NonFiniteStepError, NonFiniteStepGuard
from eaft_pl.training.optim import adamw_warmup_cosine
from eaft_pl.training.options import check_module_options, check_strategy_options

GOOD = dict(
    model_name_or_path="some/model", model_config=None, top_k=20, learning_rate=1e-5, weight_decay=0.0, warmup_ratio=0.03,
    min_lr_ratio=0.0, adam_betas=(0.9, 0.999), adam_eps=1e-8, loss_normalization="step", torch_dtype=None,
    conflict_max_norm_entropy=0.17, conflict_max_label_prob=0.1, chunk_size=None, reference_source="cache",
    reference_kl_coef=0.0, reference_kl_direction="policy_ref", max_skipped_steps=10,
)  # fmt: skip


def identity(x):
    return x


# ---- options -----------------------------------------------------------------------------------


def test_the_defaults_pass():
    check_module_options(**GOOD)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"model_config": {"model_type": "llama"}}, "exactly one of model.init_args.model_name_or_path"),
        ({"model_name_or_path": None}, "exactly one of model.init_args.model_name_or_path"),
        ({"top_k": True}, "model.init_args.top_k"),
        ({"top_k": 1}, "model.init_args.top_k"),
        ({"learning_rate": math.inf}, "model.init_args.learning_rate"),
        ({"warmup_ratio": 1.0}, "model.init_args.warmup_ratio"),
        ({"adam_betas": (0.9,)}, "model.init_args.adam_betas"),
        ({"conflict_max_label_prob": 1.5}, "model.init_args.conflict_max_label_prob"),
        ({"max_skipped_steps": 1.0}, "model.init_args.max_skipped_steps"),
        ({"torch_dtype": "float33"}, "model.init_args.torch_dtype"),
        ({"chunk_size": 0}, "model.init_args.chunk_size"),
        ({"reference_kl_coef": 0.5, "chunk_size": 64, "reference_source": "frozen"}, "unset model.init_args.chunk_size"),
        ({"reference_kl_coef": 0.5}, "set model.init_args.reference_source: frozen"),
    ],
)
def test_each_bad_option_is_named(change, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_module_options(**{**GOOD, **change})


# ---- step-level normalisation ------------------------------------------------------------------


def accumulated_gradient(token_counts, world_size=1):
    """The gradient of w after backpropagating each micro-batch's loss as Lightning does (divided by
    the accumulation) and rescaling once; each micro-batch's weighted sum is w * tokens."""
    w = torch.nn.Parameter(torch.tensor(1.0))
    norm, accumulate = StepNormalizer(), len(token_counts)
    # Every rank holds the same micro-batches here: a sum over ranks multiplies by world_size, DDP's
    # averaging of the gradients leaves them as they are.
    reduce_sum = lambda x: x * world_size  # noqa: E731
    for n in token_counts:
        loss = norm.micro_batch_loss(w * n, n, accumulate=accumulate, world_size=world_size, reduce_sum=reduce_sum, reduce_max=identity)
        (loss / accumulate).backward()
    scale = norm.gradient_scale(accumulate=accumulate, world_size=world_size, reduce_sum=reduce_sum, device=torch.device("cpu"))
    if scale is not None:
        scale_gradients([w], scale)
    return w.grad.item(), norm


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("counts", [[3, 40], [7], [1, 1, 50, 2]])
def test_a_step_is_normalised_by_all_its_tokens(counts, world_size):
    # The step's loss is the sum over ranks and micro-batches of w * n_i over N_global, the tokens of
    # all of them: its gradient is exactly 1, whatever the split of the tokens.
    grad, _ = accumulated_gradient(counts, world_size)
    assert grad == pytest.approx(1.0)


def test_the_divisor_is_fixed_by_the_first_micro_batch_and_the_step_resets():
    _, norm = accumulated_gradient([3, 40])
    assert norm.divisor == 3.0 and norm.step_tokens == 0
    # Per-token values that differ between micro-batches: a mean per micro-batch would give (2 + 5) / 2.
    w = torch.nn.Parameter(torch.tensor(1.0))
    for n, x in ((3, 2.0), (40, 5.0)):
        (norm.micro_batch_loss(w * x * n, n, accumulate=2, world_size=1, reduce_sum=identity, reduce_max=identity) / 2).backward()
    scale_gradients([w], norm.gradient_scale(accumulate=2, world_size=1, reduce_sum=identity, device=torch.device("cpu")))
    assert w.grad.item() == pytest.approx((3 * 2 + 40 * 5) / 43)
    assert norm.divisor == 3.0  # kept across steps (and, through the checkpoint, across a resume)


def test_a_step_of_one_micro_batch_needs_no_rescaling():
    norm = StepNormalizer()
    loss = norm.micro_batch_loss(torch.tensor(12.0), 4, accumulate=1, world_size=1, reduce_sum=identity, reduce_max=identity)
    assert loss.item() == 3.0
    assert norm.gradient_scale(accumulate=1, world_size=1, reduce_sum=identity, device=torch.device("cpu")) is None
    assert norm.step_tokens == 0


# ---- non-finite steps --------------------------------------------------------------------------


def test_a_finite_step_is_kept_and_a_nan_loss_is_skipped_and_named():
    guard = NonFiniteStepGuard(max_skipped=1)
    guard.record(0, torch.tensor(1.0))
    assert not guard.step_is_bad([torch.ones(3)], check_grads=True, reduce_sum=identity, device="cpu")
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    guard.record(4, torch.tensor(float("nan")), ["train.jsonl:9"])
    assert guard.step_is_bad([p.grad], check_grads=True, reduce_sum=identity, device="cpu")
    message = guard.skip([p], global_step=7, epoch=0, rank=0, world_size=1)
    assert p.grad is None and guard.skipped == 1
    assert "optimizer step 7" in message and "batch 4 (examples train.jsonl:9)" in message
    guard.stop_if_exhausted(message)  # 1 skipped, 1 allowed


def test_an_inf_gradient_counts_only_without_a_grad_scaler():
    guard = NonFiniteStepGuard(max_skipped=0)
    guard.record(0, torch.tensor(1.0))
    grads = [torch.tensor([1.0, math.inf])]
    assert not guard.step_is_bad(grads, check_grads=False, reduce_sum=identity, device="cpu")
    guard.record(0, torch.tensor(1.0))
    assert guard.step_is_bad(grads, check_grads=True, reduce_sum=identity, device="cpu")
    message = guard.skip([], global_step=1, epoch=0, rank=0, world_size=1)
    assert "finite loss but a non-finite gradient" in message
    with pytest.raises(NonFiniteStepError, match="training stopped after 1 skipped steps"):
        guard.stop_if_exhausted(message)


def test_another_ranks_bad_step_is_skipped_here_too():
    guard = NonFiniteStepGuard(max_skipped=5)
    guard.record(0, torch.tensor(1.0))
    assert guard.step_is_bad([], check_grads=True, reduce_sum=lambda x: x + 1.0, device="cpu")  # one rank flagged


# ---- optimiser ---------------------------------------------------------------------------------


def test_only_matrices_decay_and_the_schedule_warms_up_then_decays():
    layer = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    config = adamw_warmup_cosine(
        [*layer.parameters(), frozen], lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6,
        total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1,
    )  # fmt: skip
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [layer.weight.shape] and decay["weight_decay"] == 0.1
    assert [p.shape for p in no_decay["params"]] == [layer.bias.shape] and no_decay["weight_decay"] == 0.0
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # 10 warmup steps
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


@pytest.mark.parametrize(
    "strategy, options, match",
    [
        ("FSDPStrategy", {"chunk_size": 64}, r"chunk_size is not supported with FSDPStrategy"),
        ("ModelParallelStrategy", {"chunk_size": 64}, r"chunk_size is not supported with ModelParallelStrategy"),
        ("DeepSpeedStrategy", {"loss_normalization": "step"}, r"set model\.init_args\.loss_normalization: micro_batch"),
    ],
)
def test_options_a_strategy_cannot_honour_are_refused(strategy, options, match):
    with pytest.raises(ValueError, match=match):
        check_strategy_options(strategy, **{"chunk_size": None, "loss_normalization": "step", **options})


def test_ddp_takes_every_option():
    check_strategy_options("DDPStrategy", chunk_size=64, loss_normalization="step")
