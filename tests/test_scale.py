"""Scale-out: the decoder-layer FSDP strategy (policy resolution, wiring, a 2-process CPU fit), the
overlays under configs/scale/ (parse, instantiate, arithmetic) and the multi-node launcher."""

import functools
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO, TINY_LLAMA
from eaft_pl import EAFTModule
from eaft_pl.cli import EAFTLightningCLI, cli_main
from eaft_pl.training.strategies import DecoderLayerFSDPStrategy, RootClipFSDPPrecision, decoder_layer_classes
from scale_fit import recorded_fit, write_records
from test_ddp import assert_records_equal, max_gap

SCALE = REPO / "configs" / "scale"
OVERLAYS = sorted(SCALE.glob("*.yaml"))
RECIPE = REPO / "configs" / "setup" / "quickstart.yaml"  # stands in for a paper recipe
GLOBAL_BATCH = 64  # the paper's

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
FAMILIES = {
    "llama": ("LlamaDecoderLayer", {"model_type": "llama", **SMALL}),
    "qwen2": ("Qwen2DecoderLayer", {"model_type": "qwen2", **SMALL}),
    "gemma2": ("Gemma2DecoderLayer", {"model_type": "gemma2", "head_dim": 8, **SMALL}),
}


def tiny_model(family):
    config = dict(FAMILIES[family][1])
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def policy_classes(policy):
    assert isinstance(policy, ModuleWrapPolicy)
    return set(policy._module_classes)


# ---- decoder_layer_classes -----------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_layer_classes_come_from_the_model(family):
    model = tiny_model(family)
    classes = decoder_layer_classes(model)
    assert classes == {type(model.model.layers[0])}
    assert [c.__name__ for c in classes] == [FAMILIES[family][0]]
    # The same when the model sits inside another module (the LightningModule holds it as .model).
    assert decoder_layer_classes(nn.ModuleDict({"model": model})) == classes


def test_layer_class_names_override_the_model():
    model = tiny_model("qwen2")
    assert {c.__name__ for c in decoder_layer_classes(model, ["Qwen2MLP", "Qwen2Attention"])} == {"Qwen2MLP", "Qwen2Attention"}


def test_no_matching_module_names_what_was_tried():
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM.*'NoSuchLayer'.*layer_class_names"):
        decoder_layer_classes(tiny_model("qwen2"), ["NoSuchLayer"])
    with pytest.raises(ValueError, match=r"Sequential declares no _no_split_modules.*layer_class_names"):
        decoder_layer_classes(nn.Sequential(nn.Linear(2, 2)))


# ---- the strategy's wiring, without starting processes ------------------------------------------


def built_module(tokenizer_dir, **kwargs):
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), **kwargs)
    module.configure_model()
    return module


def test_strategy_wraps_and_checkpoints_the_decoder_layer(tokenizer_dir):
    module = built_module(tokenizer_dir)
    layer = type(module.model.model.layers[0])
    strategy = DecoderLayerFSDPStrategy(sharding_strategy="SHARD_GRAD_OP", state_dict_type="sharded")
    assert "auto_wrap_policy" not in strategy.kwargs  # nothing is known before the model is built
    strategy.resolve_policies(module)
    assert strategy.layer_classes == {layer}
    assert policy_classes(strategy.kwargs["auto_wrap_policy"]) == {layer}
    assert policy_classes(strategy._activation_checkpointing_kwargs["auto_wrap_policy"]) == {layer}
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP" and strategy._state_dict_type == "sharded"

    no_ckpt = DecoderLayerFSDPStrategy(activation_checkpointing=False)
    no_ckpt.resolve_policies(module)
    assert policy_classes(no_ckpt.kwargs["auto_wrap_policy"]) == {layer} and not no_ckpt._activation_checkpointing_kwargs


def test_explicit_policies_are_kept(tokenizer_dir):
    module = built_module(tokenizer_dir)
    mlp = type(module.model.model.layers[0].mlp)
    strategy = DecoderLayerFSDPStrategy(auto_wrap_policy={mlp}, layer_class_names=["LlamaAttention"])
    strategy.resolve_policies(module)
    assert policy_classes(strategy.kwargs["auto_wrap_policy"]) == {mlp}
    assert {c.__name__ for c in policy_classes(strategy._activation_checkpointing_kwargs["auto_wrap_policy"])} == {"LlamaAttention"}


def test_hugging_face_checkpointing_and_fsdp_checkpointing_are_not_combined(tokenizer_dir):
    module = built_module(tokenizer_dir, gradient_checkpointing=True)
    with pytest.raises(ValueError, match=r"model\.init_args\.gradient_checkpointing.*activation_checkpointing"):
        DecoderLayerFSDPStrategy().resolve_policies(module)
    DecoderLayerFSDPStrategy(activation_checkpointing=False).resolve_policies(module)  # one of the two: fine


def test_empty_layer_class_names_is_refused():
    with pytest.raises(ValueError, match="layer_class_names is empty"):
        DecoderLayerFSDPStrategy(layer_class_names=[])


def test_trainer_precision_gets_norm_clipping():
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DecoderLayerFSDPStrategy(), precision="bf16-mixed", logger=False)
    plugin = trainer.strategy.precision_plugin
    assert isinstance(plugin, RootClipFSDPPrecision) and plugin.precision == "bf16-mixed"
    with pytest.raises(RuntimeError, match="not wrapped yet"):
        plugin.clip_grad_by_norm(None, 1.0)


# ---- FSDP itself: 2 CPU processes over gloo -------------------------------------------------------


@functools.lru_cache(maxsize=None)
def single_process_record(tokenizer_dir, clip):
    tmp = Path(tempfile.mkdtemp(prefix="scale-ref-"))
    return recorded_fit(tmp / "single.pt", Path(tokenizer_dir), write_records(tmp / "train.jsonl"), gradient_clip_val=clip)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2"])
def test_fsdp_on_two_cpu_processes_equals_one_process(tmp_path, tokenizer_dir, strategy):
    """Sharded, wrapped per decoder layer (FSDP1: DecoderLayerFSDPStrategy, checkpointed; FSDP2:
    FSDP2Strategy's fully_shard per layer), clipped by the global norm: the same step losses (rel
    1e-5) and the same weights after 2 steps (rel 1e-4) as one unsharded process on the same global
    batches. About 8 s each on 2 CPU cores."""
    clip = 0.5
    train = write_records(tmp_path / "train.jsonl")
    out = tmp_path / "fsdp.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    run = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scale_fit.py"), str(out), str(tokenizer_dir), str(train), str(clip), strategy],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    fsdp = torch.load(out)
    assert fsdp["param_types"] == (["DTensor"] if strategy == "fsdp2" else ["Parameter"])
    single = single_process_record(str(tokenizer_dir), clip)
    # Clipping acted (the recorded gradients are before clipping), so it had to be the global norm.
    assert all(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])) > clip for grads in single["grads"])
    assert_records_equal(fsdp, single, grads=False)
    assert max_gap(single_process_record(str(tokenizer_dir), None)["params"], single["params"]) > 1e-4


# ---- the overlays ---------------------------------------------------------------------------------

ARITHMETIC = re.compile(
    r"global batch: (\d+) devices x (\d+) nodes x (\d+) micro-batch x (\d+) accumulate_grad_batches = (\d+)"
)
# What an overlay may set besides trainer keys (documented at the top of each file).
ALLOWED_DATA = {"batch_size"}
ALLOWED_MODEL = {"loss_normalization", "gradient_checkpointing", "chunk_size"}


def test_there_are_overlays_for_each_strategy_and_several_nodes():
    names = {p.name for p in OVERLAYS}
    assert {"ddp_1x8.yaml", "fsdp_1x8.yaml", "fsdp2_1x8.yaml", "deepspeed_zero3_1x8.yaml", "fsdp_4x8.yaml"} <= names


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_arithmetic_comment_matches_its_values(overlay):
    text = overlay.read_text()
    found = ARITHMETIC.findall(text)
    assert len(found) == 1, f"{overlay.name}: one '# global batch: ...' line expected"
    devices, nodes, micro, accumulate, total = map(int, found[0])
    config = yaml.safe_load(text)
    trainer = config["trainer"]
    assert (devices, nodes, accumulate) == (trainer["devices"], trainer["num_nodes"], trainer["accumulate_grad_batches"])
    assert micro == config["data"]["init_args"]["batch_size"]
    assert devices * nodes * micro * accumulate == total == GLOBAL_BATCH
    # The file name says the layout: <strategy>_<nodes>x<devices>.yaml
    assert overlay.stem.endswith(f"_{nodes}x{devices}")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_sets_only_trainer_keys_and_what_its_strategy_needs(overlay):
    config = yaml.safe_load(overlay.read_text())
    assert set(config) <= {"trainer", "data", "model"}
    assert set(config.get("data", {})) <= {"init_args"} and set(config["data"]["init_args"]) <= ALLOWED_DATA
    assert set(config.get("model", {})) <= {"init_args"} and set(config.get("model", {}).get("init_args", {})) <= ALLOWED_MODEL


def parse_only(overlay, monkeypatch, *extra):
    monkeypatch.setattr(EAFTLightningCLI, "instantiate_classes", lambda self: None)
    return cli_main(["--config", str(RECIPE), "--config", str(overlay), *extra], run=False).config


@pytest.mark.parametrize("overlay", [p for p in OVERLAYS if not p.name.startswith("deepspeed")], ids=lambda p: p.stem)
def test_overlay_instantiates_with_a_recipe_on_cpu(overlay, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = yaml.safe_load(overlay.read_text())["trainer"]
    # Only the accelerator changes (no GPU here): the strategy, precision and counts are the file's.
    cli = cli_main(["--config", str(RECIPE), "--config", str(overlay), "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
    trainer = cli.trainer
    assert trainer.num_nodes == values["num_nodes"] and trainer.num_devices == values["devices"]
    assert trainer.accumulate_grad_batches == values["accumulate_grad_batches"]
    assert cli.datamodule.batch_size == yaml.safe_load(overlay.read_text())["data"]["init_args"]["batch_size"]
    if overlay.name.startswith("fsdp2"):
        from eaft_pl.training.fsdp2 import FSDP2Strategy

        strategy = trainer.strategy
        assert isinstance(strategy, FSDP2Strategy) and strategy._tensor_parallel_size == 1
        assert strategy._save_distributed_checkpoint is values["strategy"]["init_args"]["save_distributed_checkpoint"]
        assert trainer.precision == values["precision"]
        assert cli.model.hparams.gradient_checkpointing is True and cli.model.hparams.chunk_size is None
    elif overlay.name.startswith("fsdp"):
        strategy = trainer.strategy
        assert isinstance(strategy, DecoderLayerFSDPStrategy) and strategy.activation_checkpointing_enabled
        assert strategy.sharding_strategy.name == values["strategy"]["init_args"]["sharding_strategy"]
        assert isinstance(strategy.precision_plugin, RootClipFSDPPrecision)
        assert strategy.precision_plugin.precision == values["precision"]
        assert cli.model.hparams.gradient_checkpointing is False  # the strategy refuses HF's on top of its own
    else:
        assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.precision == values["precision"]


@pytest.mark.parametrize("overlay", [p for p in OVERLAYS if p.name.startswith("deepspeed")], ids=lambda p: p.stem)
def test_deepspeed_overlay_parses_and_fails_clearly_without_deepspeed(overlay, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_only(overlay, monkeypatch, "--trainer.accelerator=cpu", "--trainer.logger=false")
    assert config.trainer.strategy.class_path == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert config.trainer.strategy.init_args.stage == 3
    assert config.trainer.strategy.init_args.logging_batch_size_per_gpu == config.data.init_args.batch_size
    # module.setup refuses the step normalisation under DeepSpeed: the overlay switches it.
    assert config.model.init_args.loss_normalization == "micro_batch"
    assert config.model.init_args.chunk_size is None
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed: the missing-package message cannot be checked")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match=r"DeepSpeed installed.*pip install"):
        cli_main(["--config", str(RECIPE), "--config", str(overlay), "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)


# ---- the multi-node launcher ----------------------------------------------------------------------


def launch(*args, **env):
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "launch_multinode.sh"), *args],
        # Without MASTER_PORT from the test process (the DDP tests set it there): the default is checked.
        env={**{k: v for k, v in os.environ.items() if k != "MASTER_PORT"}, "PYTHON": sys.executable, "DRY_RUN": "1", **env},
        capture_output=True, text=True, timeout=60,
    )


def test_launcher_takes_the_process_counts_from_the_overlay():
    overlay = str(SCALE / "fsdp_4x8.yaml")
    run = launch("torchrun", "recipe.yaml", overlay, "--trainer.max_steps=5", MASTER_ADDR="node0", NODE_RANK="3")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [
        "torchrun", "--nnodes", "4", "--nproc-per-node", "8", "--node-rank", "3", "--master-addr", "node0",
        "--master-port", "29500", "-m", "eaft_pl.cli", "fit", "--config", "recipe.yaml", "--config", overlay,
        "--trainer.max_steps=5",
    ]
    run = launch("srun", "recipe.yaml", overlay)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[:7] == ["srun", "--nodes", "4", "--ntasks-per-node", "8", "--gpus-per-node", "8"]
    assert run.stdout.split()[7:10] == [sys.executable, "-m", "eaft_pl.cli"]


def test_launcher_names_what_is_missing():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NODE_RANK")}
    run = subprocess.run(
        ["bash", str(REPO / "scripts" / "launch_multinode.sh"), "torchrun", "r.yaml", str(SCALE / "fsdp_4x8.yaml")],
        env={**env, "PYTHON": sys.executable, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode != 0 and "MASTER_ADDR" in run.stderr
    run = launch("srun", "r.yaml", str(REPO / "configs" / "method" / "eaft.yaml"))  # no trainer.devices
    assert run.returncode != 0 and "trainer.devices" in run.stderr
