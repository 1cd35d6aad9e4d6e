"""The whole model on rank zero under FSDP and FSDP2 (eaft_pl/training/sharded.py) and the rank-zero callbacks
that use it: SaveHFModel, ForgettingCallback, ConflictCohortCallback. One FSDP (or fully_shard) process
in this process for the copy itself (tied weights, dtype), two CPU processes over gloo for the
callbacks, and for FSDP2's losses and resumed LoRA fits."""

import dataclasses
import functools
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO, TINY_LLAMA
from eaft_pl.evaluation.forgetting import ForgettingCallback
from eaft_pl.training.adapter_checkpoints import frozen_base_keys
from eaft_pl.training.sharded import gather_full_model, refuse_unsupported_sharding, unwrapped_name
from gather_fit import VARIANTS, gather_fit
from test_ddp import assert_records_equal
from scale_fit import write_records


def tiny_model(**config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_LLAMA, "vocab_size": 64, **config}))


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one process: FSDP wraps (root + one unit per layer) and summons for
    real, without spawning; with one rank there is nothing to shard (the 2-process test gathers)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class Holder(torch.nn.Module):
    """Stands in for the LightningModule that Lightning's FSDP wraps: the model is one of its children."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def fsdp_strategy(model, version=1):
    """What gather_full_model reads of Lightning's FSDPStrategy (``version=1``) or ModelParallelStrategy
    (2: ``fully_shard`` on each decoder layer and the model, as EAFTModule.configure_model applies it)."""
    layer = type(model.model.layers[0])
    if version == 2:
        from torch.distributed.device_mesh import init_device_mesh

        from eaft_pl.training.fsdp2 import shard_with_fsdp2

        holder = Holder(model)
        holder._device_mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        assert shard_with_fsdp2(holder)
        root = holder
    else:
        root = FullyShardedDataParallel(Holder(model), auto_wrap_policy=ModuleWrapPolicy({layer}), device_id=torch.device("cpu"), use_orig_params=True)
    return SimpleNamespace(model=root, is_global_zero=True, root_device=torch.device("cpu"))


def test_wrapper_parts_leave_the_names():
    name = "_fsdp_wrapped_module.model.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.weight"
    assert unwrapped_name(name) == "model.model.layers.0.mlp.up_proj.weight"


def test_without_sharding_rank_zero_gets_the_model_itself_and_the_others_nothing():
    model = tiny_model()
    assert gather_full_model(SimpleNamespace(model=model, is_global_zero=True), model) is model
    assert gather_full_model(SimpleNamespace(model=model, is_global_zero=False), model) is None


def test_unsupported_sharding_is_refused_by_name():
    fake = type("DeepSpeedStrategy", (), {"model": None, "is_global_zero": True})()
    with pytest.raises(ValueError, match="ForgettingCallback .* under DeepSpeedStrategy"):
        ForgettingCallback().on_train_start(SimpleNamespace(strategy=fake, global_step=0), None)
    # ModelParallelStrategy (FSDP2) is gathered now: the refusal does not name it.
    refuse_unsupported_sharding(type("ModelParallelStrategy", (), {})(), "ForgettingCallback")


@pytest.mark.parametrize("version", [1, 2], ids=["fsdp", "fsdp2"])
@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_copy_holds_the_full_weights_and_keeps_ties(one_rank_group, tied, version):
    from torch.distributed.fsdp import FSDPModule

    model = tiny_model(tie_word_embeddings=tied)
    own_class = type(model)  # fully_shard makes it an FSDPLlamaForCausalLM; the copy must not be
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = torch.tensor([[3, 5, 7, 11]])
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    strategy = fsdp_strategy(model, version)
    kind = FullyShardedDataParallel if version == 1 else FSDPModule
    assert sum(isinstance(m, kind) for m in strategy.model.modules()) == 1 + TINY_LLAMA["num_hidden_layers"]
    copy = gather_full_model(strategy, model)
    assert copy is not model and type(copy) is own_class and not copy.training
    got = dict(copy.named_parameters())
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert (copy.lm_head.weight is copy.model.embed_tokens.weight) is tied
    with torch.no_grad():
        torch.testing.assert_close(copy(input_ids=inputs).logits, logits, rtol=0, atol=1e-6)  # buffers (rotary) too
    half = gather_full_model(strategy, model, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_fsdp2_sharding_acts_only_under_a_data_parallel_mesh():
    from eaft_pl.training.fsdp2 import shard_with_fsdp2

    model = tiny_model()
    assert shard_with_fsdp2(SimpleNamespace(model=model, _device_mesh=None)) is False  # no ModelParallelStrategy

    class TensorParallelMesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return SimpleNamespace(size=lambda: 2 if name == "tensor_parallel" else 1)

    with pytest.raises(ValueError, match=r"without tensor parallelism.*tensor-parallel size of 2.*FSDP2Strategy"):
        shard_with_fsdp2(SimpleNamespace(model=model, _device_mesh=TensorParallelMesh()))
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())  # refused before touching it


# ---- the callbacks under FSDP on 2 CPU processes ------------------------------------------------


@functools.lru_cache(maxsize=None)
def single_process_results(tokenizer_dir, monkeypatch):
    monkeypatch.setattr("torch.utils.collect_env.get_pretty_env_info", lambda: "skipped in tests")
    tmp = Path(tempfile.mkdtemp(prefix="gather-ref-"))
    train = write_records(tmp / "train.jsonl")
    return tmp, {v: gather_fit(tmp / v, Path(tokenizer_dir), train, options) for v, options in VARIANTS.items()}


def same_numbers(a, b):
    """Nested scores/cohort records equal to float rounding (NaN for an empty cohort equals NaN)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_numbers(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_numbers(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b if isinstance(a, (int, str)) else math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2"])
def test_fsdp_export_and_rank_zero_evaluations_equal_one_process(tmp_path, tokenizer_dir, monkeypatch, strategy):
    """Under 2-process FSDP (DecoderLayerFSDPStrategy) and FSDP2 (FSDP2Strategy: fully_shard through
    Lightning's ModelParallelStrategy), full fine-tuning and LoRA: the step losses and final weights
    equal the unsharded run's (rel 1e-5 / 1e-4); the exported folder holds the gathered trained
    weights, loads with from_pretrained and equals the unsharded run's; the forgetting scores and the
    cohort records and the lm-eval scores at every step equal the unsharded run's (and nothing hangs).
    About 10 s per strategy on 2 CPU cores (one launch, both variants)."""
    train = write_records(tmp_path / "train.jsonl")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    run = subprocess.run(
        [sys.executable, str(REPO / "tests" / "gather_fit.py"), str(tmp_path), str(tokenizer_dir), str(train), strategy],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    single_dir, singles = single_process_results(str(tokenizer_dir), monkeypatch)
    for variant, single in singles.items():
        fsdp = torch.load(tmp_path / variant / "result.pt", weights_only=False)
        assert fsdp["param_types"] == (["DTensor"] if strategy == "fsdp2" else ["Parameter"]), variant  # sharded by fully_shard
        assert_records_equal(fsdp, single, grads=False)  # the same loss, ce and tokens at each step; the same weights
        assert len(fsdp["forgetting"]) == 3 and same_numbers(fsdp["forgetting"], single["forgetting"]), variant
        assert len(fsdp["cohort"]) == 3 and same_numbers(fsdp["cohort"], single["cohort"]), variant
        assert fsdp["cohort"][0]["cohort/conflict/tokens"] > 0  # both cohorts are scored
        assert len(fsdp["lm_eval"]) == 3 and same_numbers(fsdp["lm_eval"], single["lm_eval"]), variant
        # The model's own class, not fully_shard's FSDPLlamaForCausalLM: other tools read this name.
        assert AutoConfig.from_pretrained(tmp_path / variant / "hf").architectures == ["LlamaForCausalLM"], variant
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / variant / "hf").state_dict()
        reference = AutoModelForCausalLM.from_pretrained(single_dir / variant / "hf").state_dict()
        assert exported.keys() == reference.keys()
        for name, value in exported.items():
            torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6, msg=f"{variant}: {name}")
        if variant == "full":  # the folder holds exactly what FSDP's own summon_full_params shows
            for name, value in fsdp["params"].items():
                assert torch.equal(exported[name], value), name
            assert max((v - fsdp["initial"][n]).abs().max() for n, v in fsdp["params"].items()) > 1e-4  # trained
        else:
            adapters = load_file(tmp_path / variant / "hf" / "adapter" / "adapter_model.safetensors")
            expected = load_file(single_dir / variant / "hf" / "adapter" / "adapter_model.safetensors")
            assert adapters.keys() == expected.keys() and adapters
            for name, value in adapters.items():
                torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


class Forwarding(Holder):
    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def test_fsdp_mixed_precision_keeps_the_rotary_buffers_in_float32(one_rank_group):
    # Lightning's FSDP mixed precision casts buffers to bf16: the rotary inv_freq would be rounded at
    # the first forward. The strategy's precision plugin keeps buffers in float32.
    from eaft_pl.training.strategies import RootClipFSDPPrecision

    config = RootClipFSDPPrecision("bf16-mixed").mixed_precision_config
    assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    model = tiny_model()
    exact = model.model.rotary_emb.inv_freq.clone()
    layer = type(model.model.layers[0])
    for buffers, expected in ((torch.bfloat16, torch.bfloat16), (config.buffer_dtype, torch.float32)):
        model = tiny_model()
        mixed = dataclasses.replace(config, buffer_dtype=buffers)
        root = FullyShardedDataParallel(
            Forwarding(model), auto_wrap_policy=ModuleWrapPolicy({layer}), device_id=torch.device("cpu"), mixed_precision=mixed
        )
        with torch.no_grad():
            root(torch.tensor([[3, 5, 7, 11]]))  # the root's forward is where FSDP casts the buffers
        inv_freq = model.model.rotary_emb.inv_freq
        assert inv_freq.dtype == expected  # the control: Lightning's own choice rounds it
        assert torch.equal(inv_freq.float(), exact) is (expected == torch.float32)


def test_lora_checkpoints_under_fsdp_keep_the_adapters(one_rank_group, tokenizer_dir):
    # Under FSDP, named_parameters shows wrapper parts ("_fsdp_wrapped_module.") that state-dict keys
    # lack: the adapters must still be told apart from the frozen base, or an adapter-only checkpoint
    # would drop them.
    from eaft_pl import EAFTModule

    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), lora={"r": 2, "alpha": 4.0})
    module.configure_model()
    keys = list(module.state_dict())
    adapters = {k for k in keys if "lora_" in k}
    assert adapters and frozen_base_keys(module.model, keys) == {k for k in keys if k.startswith("model.")} - adapters
    layer = type(module.model.get_base_model().model.layers[0])
    module.model = FullyShardedDataParallel(
        module.model, auto_wrap_policy=ModuleWrapPolicy({layer}), device_id=torch.device("cpu"), use_orig_params=True
    )
    assert any("_fsdp_wrapped_module" in n for n, _ in module.model.named_parameters())
    assert frozen_base_keys(module.model, keys) == {k for k in keys if k.startswith("model.")} - adapters


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["dist", "file"])
def test_fsdp2_lora_fits_resume_exactly(tmp_path, tokenizer_dir, checkpoint):
    """FSDP2 (2 CPU processes) with LoRA on a model_name_or_path base: a fit resumed from its step-2
    checkpoint (the strategy's sharded folder, or one file) ends with the uninterrupted fit's adapters,
    exactly. The strategy loads checkpoints itself and strictly, so they keep the base weights (not
    adapter-only as under DDP/FSDP1). About 10 s each on 2 CPU cores (three 2-process fits)."""
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    model = tiny_model(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)))
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(base)
    train = write_records(tmp_path / "train.jsonl")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    run = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fsdp2_resume_fit.py"), str(tmp_path / "out"), str(base), str(train), checkpoint],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "out" / "result.pt")
    assert result["straight"].keys() == result["resumed"].keys() and all("lora_" in n for n in result["straight"])
    for name, value in result["straight"].items():
        torch.testing.assert_close(result["resumed"][name], value, rtol=0, atol=0, msg=name)
    assert any("lora_" in k for k in result["checkpoint_keys"])
    assert "model.base_model.model.model.embed_tokens.weight" in result["checkpoint_keys"]  # the base is kept
