"""The paper's recipes (configs/setup/paper.yaml with a domain file of configs/setup/): every domain x method x scale-out combination parses and
instantiates its classes on CPU without downloading anything, with the paper's hyperparameters."""

import re

import pytest
import yaml

from conftest import REPO
from eaft_pl.training.export import SaveHFModel
from eaft_pl.cli import cli_main
from eaft_pl.data import HFChatDataModule
from eaft_pl.data.layouts import RecordLayout
from eaft_pl.evaluation import LMEvalCallback
from eaft_pl.loss.gates import EAFTGate, SFTGate

SETUP = REPO / "configs" / "setup"
METHOD = REPO / "configs" / "method"
DOMAINS = {
    "qwen3_4b_math": "Qwen/Qwen3-4B-Instruct-2507",
    "qwen3_4b_medical": "Qwen/Qwen3-4B-Thinking-2507",
    "qwen3_4b_agentic": "Qwen/Qwen3-4B-Instruct-2507",
}
METHODS = {"sft": SFTGate, "eaft": EAFTGate}
# Every DDP/FSDP overlay; DeepSpeed's refuses paper.yaml's rank-zero callbacks (its own comment and
# test_the_deepspeed_overlay_needs_the_recipe_callbacks_replaced).
OVERLAYS = ["ddp_1x8", "fsdp_1x8", "fsdp2_1x8", "fsdp_2x8", "fsdp_4x8"]


def instantiate(domain, method, overlay, launcher_order=False):
    files = [SETUP / "paper.yaml", SETUP / f"{domain}.yaml", METHOD / f"{method}.yaml", REPO / "configs" / "scale" / f"{overlay}.yaml"]
    if launcher_order:  # scripts/launch_multinode.sh passes RECIPE, OVERLAY, then the extra --config files
        files = [files[0], files[3], files[1], files[2]]
    args = [a for f in files for a in ("--config", str(f))]
    # No GPU here: only the accelerator changes; devices, nodes, strategy and precision are the files'.
    return cli_main([*args, "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_recipe_instantiates_with_the_papers_settings(domain, method, overlay, tmp_path, monkeypatch, no_downloads):
    monkeypatch.chdir(tmp_path)
    cli = instantiate(domain, method, overlay)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    hp = model.hparams
    assert hp.model_name_or_path == DOMAINS[domain] and model.model is None  # built later, in configure_model
    assert type(model.gate) is METHODS[method]
    assert (hp.learning_rate, hp.warmup_ratio, hp.min_lr_ratio, hp.top_k) == (1e-5, 0.03, 0.0, 20)
    assert hp.torch_dtype == "float32"  # fp32 master weights under bf16-mixed
    assert isinstance(data, HFChatDataModule) and data.max_length == 16384
    assert trainer.max_epochs == 10 and trainer.precision == "bf16-mixed"
    # The global batch of the paper, whatever the layout.
    assert trainer.num_devices * trainer.num_nodes * data.batch_size * trainer.accumulate_grad_batches == 64
    callbacks = {type(c): c for c in trainer.callbacks}
    assert SaveHFModel in callbacks
    assert callbacks[LMEvalCallback].tasks == ["mmlu", "ifeval"]


def test_the_multinode_launcher_order_gives_the_same_run(tmp_path, monkeypatch, no_downloads):
    monkeypatch.chdir(tmp_path)
    dumps = []
    for launcher_order in (False, True):
        cli = instantiate("qwen3_4b_math", "eaft", "fsdp_4x8", launcher_order)
        config = cli.config.clone()
        config.pop("config", None)  # the list of files given, in their order
        dumps.append(cli.parser.dump(config))
    assert dumps[0] == dumps[1]


def test_recipe_comments_state_the_step_arithmetic():
    # "ceil(N samples / 64) = S steps per epoch x 10 epochs = T optimizer steps" must add up.
    for domain in DOMAINS:
        text = (SETUP / f"{domain}.yaml").read_text()
        pattern = r"ceil\(([\d,]+) samples / 64\) = ([\d,]+) steps per epoch x 10 epochs = ([\d,]+) optimizer steps"
        found = re.findall(pattern, re.sub(r"\n# ?", " ", text))
        assert found, f"{domain}: no step arithmetic in the comments"
        for samples, per_epoch, steps in found:
            samples, per_epoch, steps = (int(x.replace(",", "")) for x in (samples, per_epoch, steps))
            assert -(-samples // 64) == per_epoch and per_epoch * 10 == steps, domain


def test_medical_recipe_maps_huatuo_columns_to_a_reasoning_turn():
    init = yaml.safe_load((SETUP / "qwen3_4b_medical.yaml").read_text())["data"]["init_args"]
    layout = RecordLayout(init["layout"], init["columns"])
    record = {"Question": "A 45-year-old ...?", "Complex_CoT": "Consider ...", "Response": "Start with ..."}
    conversation = layout.to_conversation(record, "huatuo:0")
    assert conversation.messages == [
        {"role": "user", "content": "A 45-year-old ...?"},
        {"role": "assistant", "content": "Start with ...", "reasoning_content": "Consider ..."},
    ]


def test_the_export_folder_defaults_to_one_per_run(tmp_path):
    # The recipes leave SaveHFModel's dirpath unset: SFT and EAFT runs must not overwrite each other.
    from types import SimpleNamespace

    run = SimpleNamespace(checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path / "7" / "abc123" / "checkpoints")), default_root_dir="x")
    assert SaveHFModel().resolve_dirpath(run) == str(tmp_path / "7" / "abc123" / "hf")
    no_ckpt = SimpleNamespace(checkpoint_callback=None, default_root_dir=str(tmp_path))
    assert SaveHFModel().resolve_dirpath(no_ckpt) == str(tmp_path / "hf")
    assert SaveHFModel(dirpath="out/model").resolve_dirpath(run) == "out/model"


def test_the_deepspeed_overlay_needs_the_recipe_callbacks_replaced():
    # SaveHFModel and LMEvalCallback cannot gather a ZeRO-3 model: they refuse it at setup, before
    # any training, and the overlay's comment says what to do.
    from types import SimpleNamespace

    deepspeed = SimpleNamespace(strategy=type("DeepSpeedStrategy", (), {})(), global_step=0)
    with pytest.raises(ValueError, match="SaveHFModel needs the whole model on rank zero.*DeepSpeedStrategy"):
        SaveHFModel().setup(deepspeed, None, "fit")
    with pytest.raises(ValueError, match="LMEvalCallback needs the whole model on rank zero.*DeepSpeedStrategy"):
        LMEvalCallback(tasks=["mmlu"]).on_train_start(deepspeed, None)
    assert "replace its trainer.callbacks" in (REPO / "configs" / "scale" / "deepspeed_zero3_1x8.yaml").read_text()
