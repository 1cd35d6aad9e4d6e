"""LoRA through PEFT on a tiny Llama saved to disk and loaded by model_name_or_path (a user's path):
only the adapters train, both loss paths agree, adapter-only checkpoints resume exactly, and the
exported Hugging Face folder loads without peft and gives the trained model's logits."""

import json
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import REPO, TINY_LLAMA
from eaft_pl import ChatJsonlDataModule, EAFTModule
from eaft_pl.training.export import SaveHFModel
from eaft_pl.cli import cli_main
from eaft_pl.training.export import export_hf_folder
from eaft_pl.models.loading import build_causal_lm
from eaft_pl.training.lora import AdapterDisabled, LoRAOptions
from eaft_pl.loss.gates import SFTGate
from eaft_pl.module import ADAPTER_ONLY_KEY

pytest.importorskip("peft")

RECORDS = [
    {"prompt": "a", "response": "1"},
    {"prompt": "b", "response": "22"},
    {"prompt": "c", "response": "a much longer answer than the others"},
    {"prompt": "d", "response": "and another long answer, longer still"},
]
LORA = dict(r=4, alpha=8.0, dropout=0.0)
CONSTANT_LR = dict(learning_rate=1e-2, warmup_ratio=0.0, min_lr_ratio=1.0)


class InOrderData(ChatJsonlDataModule):
    """No shuffling: a resumed run sees the batches an uninterrupted one sees."""

    def train_dataloader(self):
        return self._loader("train", shuffle=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer written with save_pretrained, as a downloaded model would be."""
    from eaft_pl.models.char_tokenizer import build_char_tokenizer

    path = tmp_path_factory.mktemp("base")
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    build_causal_lm(TINY_LLAMA, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


@pytest.fixture(scope="module")
def batch(base_dir, train_file):
    data = InOrderData(train_file=train_file, tokenizer_name_or_path=base_dir, batch_size=4)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def lora_module(base_dir, seed=0, **kwargs):
    pl.seed_everything(seed)  # the adapters' random initialisation
    options = LoRAOptions(**{**LORA, **kwargs.pop("lora", {})})
    return EAFTModule(model_name_or_path=base_dir, lora=options, **kwargs)


def fit(module, base_dir, train_file, root, steps, ckpt_path=None, callbacks=()):
    data = InOrderData(train_file=train_file, tokenizer_name_or_path=base_dir, batch_size=2)
    trainer = pl.Trainer(
        max_steps=steps, logger=False, default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True), *callbacks],
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def named(module, trainable):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad is trainable}


def test_only_the_adapters_train(base_dir, train_file, tmp_path):
    module = lora_module(base_dir, learning_rate=1e-2)
    module.configure_model()
    base_before, adapters_before = named(module, False), named(module, True)
    assert adapters_before and all("lora_" in n for n in adapters_before)
    trainer = fit(module, base_dir, train_file, tmp_path, steps=3)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.parameters() if p.requires_grad}
    for name, value in named(module, False).items():
        torch.testing.assert_close(value, base_before[name], rtol=0, atol=0, msg=name)
    changed = [n for n, v in named(module, True).items() if not torch.equal(v, adapters_before[n])]
    assert sorted(changed) == sorted(adapters_before)  # every A and B moved


def loss_and_grads(module, batch):
    module.train()
    stats, weights, total = module.token_stats(batch)
    loss = total / stats.num_tokens
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("gate", [None, SFTGate()], ids=["eaft", "sft"])
def test_plain_and_chunked_losses_agree_through_the_adapters(base_dir, batch, gate):
    # Random A and B: the adapters change the logits, so agreeing losses mean the chunked path's
    # get_decoder() ran the adapted layers.
    results = []
    for chunk_size in (None, 5):
        module = lora_module(base_dir, chunk_size=chunk_size, gate=gate, lora={"init_lora_weights": False})
        module.configure_model()
        results.append(loss_and_grads(module, batch))
        with module.model.disable_adapter(), torch.no_grad():
            stats, weights, total = module.token_stats(batch)
            base_loss = total / stats.num_tokens
    (plain, plain_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    assert abs(plain - base_loss) > 1e-3
    assert plain_grads.keys() == chunked_grads.keys() and all("lora_" in n for n in plain_grads)
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_adapter_gradients(base_dir, batch):
    grads = []
    for checkpointing in (False, True):
        module = lora_module(base_dir, gradient_checkpointing=checkpointing, lora={"init_lora_weights": False})
        module.configure_model()
        grads.append(loss_and_grads(module, batch)[1])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_frozen_reference_is_the_base_with_adapters_off(base_dir, batch):
    from transformers import AutoModelForCausalLM

    from eaft_pl.reference import frozen_reference
    from eaft_pl.loss.reference_gates import StaticEAFTGate

    module = lora_module(base_dir, gate=StaticEAFTGate(), reference_source="frozen", lora={"init_lora_weights": False})
    module.configure_model()
    assert isinstance(module._frozen[0], AdapterDisabled)  # no copy of the weights
    module.train()
    reference, _ = module.batch_reference(batch)
    expected, _ = frozen_reference(AutoModelForCausalLM.from_pretrained(base_dir).eval(), batch, module.hparams.top_k)
    for name, value in expected.items():
        torch.testing.assert_close(reference[name], value, equal_nan=True, msg=name)
    assert module.model.training  # the reference pass put the model back in training mode


def test_the_cached_reference_is_the_base_shared_with_full_fine_tuning(base_dir, train_file, tmp_path):
    from eaft_pl.loss.reference_gates import StaticEAFTGate

    cache = str(tmp_path / "cache")
    full = EAFTModule(model_name_or_path=base_dir, gate=StaticEAFTGate(), reference_cache_dir=cache)
    fit(full, base_dir, train_file, tmp_path / "full", steps=1)
    # Random adapters: a pass on the adapted model would differ (and key the cache by other weights).
    adapted = lora_module(base_dir, gate=StaticEAFTGate(), reference_cache_dir=cache, lora={"init_lora_weights": False})
    fit(adapted, base_dir, train_file, tmp_path / "lora", steps=1)
    assert full.reference_cache_hit is False and adapted.reference_cache_hit is True
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_the_lm_head_with_the_chunked_loss_is_refused(base_dir):
    module = lora_module(base_dir, chunk_size=8, lora={"target_modules": ["q_proj", "lm_head"]})
    refused = r"model.init_args.chunk_size .* peft\..*Linear \(lm_head in model.init_args.lora.target_modules"
    with pytest.raises(ValueError, match=refused):
        module.configure_model()
    module = lora_module(base_dir, chunk_size=8, lora={"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]})
    with pytest.raises(ValueError, match="ModulesToSaveWrapper"):
        module.configure_model()


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"modules_to_save": [""]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ],
)
def test_bad_options_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"model\.init_args\.lora\.{key} "):
        LoRAOptions(**kwargs)


def test_the_cli_parses_lora_from_yaml_and_reports_bad_values(tmp_path):
    base = ["--config", str(REPO / "configs/setup/quickstart.yaml"), "--config", str(REPO / "configs/method/eaft.yaml")]
    config = tmp_path / "lora.yaml"
    config.write_text("model:\n  init_args:\n    lora: {r: 8, alpha: 16, dropout: 0.1, target_modules: [q_proj, v_proj]}\n")
    cli = cli_main([*base, "--config", str(config), "--trainer.logger=false"], run=False)
    assert cli.model.lora == LoRAOptions(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"model.init_args.lora.r must be an integer >= 1, got 0"):
        cli_main([*base, "--model.init_args.lora.r=0", "--trainer.logger=false"], run=False)


def test_a_missing_peft_says_how_to_install_it(base_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ImportError, match=r"model.init_args.lora needs the peft package: pip install 'eaft-pl\[lora\]'"):
        lora_module(base_dir).configure_model()


def test_adapter_only_checkpoints_are_small_and_resume_exactly(base_dir, train_file, tmp_path):
    # A constant rate: the cosine schedule's length depends on max_steps, which differs between runs.
    straight = lora_module(base_dir, **CONSTANT_LR)
    fit(straight, base_dir, train_file, tmp_path / "straight", steps=4)

    first = lora_module(base_dir, **CONSTANT_LR)
    fit(first, base_dir, train_file, tmp_path / "first", steps=2)
    ckpt = tmp_path / "first" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    assert checkpoint[ADAPTER_ONLY_KEY] == base_dir
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    full = EAFTModule(model_name_or_path=base_dir, **CONSTANT_LR)
    fit(full, base_dir, train_file, tmp_path / "full", steps=2)
    ratio = ckpt.stat().st_size / (tmp_path / "full" / "last.ckpt").stat().st_size
    print(f"adapter-only / full checkpoint size: {ratio:.3f}")
    assert ratio < 0.3

    # Resuming with as many steps as were done restores without training: the adapters are the saved ones.
    restored = lora_module(base_dir, seed=1, **CONSTANT_LR)  # other random adapters until loaded
    fit(restored, base_dir, train_file, tmp_path / "restored", steps=2, ckpt_path=str(ckpt))
    for name, value in named(first, True).items():
        torch.testing.assert_close(dict(restored.named_parameters())[name], value, rtol=0, atol=0, msg=name)
    # Resuming to 4 steps gives the uninterrupted run's adapters (optimizer and schedule restored too).
    resumed = lora_module(base_dir, seed=1, **CONSTANT_LR)
    fit(resumed, base_dir, train_file, tmp_path / "resumed", steps=4, ckpt_path=str(ckpt))
    for name, value in named(straight, True).items():
        torch.testing.assert_close(dict(resumed.named_parameters())[name], value, rtol=1e-6, atol=1e-7, msg=name)

    # An adapter-only checkpoint needs the LoRA config; a full one still loads.
    with pytest.raises(ValueError, match="holds only LoRA adapter weights"):
        EAFTModule.load_from_checkpoint(ckpt, lora=None)
    loaded = EAFTModule.load_from_checkpoint(tmp_path / "full" / "last.ckpt")
    for name, value in full.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)


def logits_of(model, batch):
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def load_without_peft(path, monkeypatch):
    from transformers import AutoModelForCausalLM

    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "peft", None)
        return AutoModelForCausalLM.from_pretrained(path)


def test_the_export_callback_writes_a_merged_folder_that_loads_without_peft(
    base_dir, train_file, tmp_path, batch, monkeypatch
):
    module = lora_module(base_dir, learning_rate=1e-2, lora={"dropout": 0.1})
    out = tmp_path / "hf"
    fit(module, base_dir, train_file, tmp_path, steps=2, callbacks=[SaveHFModel(str(out), save_adapter=True)])
    assert not (out / "adapter_config.json").exists() and (out / "adapter" / "adapter_config.json").is_file()
    exported = load_without_peft(out, monkeypatch)
    assert type(exported).__name__ == "LlamaForCausalLM"
    expected = logits_of(module.model, batch)  # the in-memory LoRA model, adapters on
    torch.testing.assert_close(logits_of(exported, batch), expected, rtol=1e-5, atol=1e-5)
    assert (logits_of(load_without_peft(base_dir, monkeypatch), batch) - expected).abs().max() > 1e-3  # it trained
    # The adapter folder is PEFT's: on the base it gives the same logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")
    torch.testing.assert_close(logits_of(adapted, batch), expected, rtol=1e-5, atol=1e-5)
    # The training model kept its adapters (nothing merged into it).
    assert type(module.model).__name__ == "PeftModelForCausalLM"
    assert any("lora_" in n for n, _ in module.model.named_parameters())
    with module.model.disable_adapter():
        base_logits = logits_of(module.model, batch)
    torch.testing.assert_close(base_logits, logits_of(load_without_peft(base_dir, monkeypatch), batch), rtol=0, atol=0)


def write_config(tmp_path, base_dir, train_file, lora):
    model = {"model_name_or_path": base_dir, "learning_rate": 1e-2}
    if lora:
        model["lora"] = LORA
    config = {
        "model": {"class_path": "eaft_pl.module.EAFTModule", "init_args": model},
        "data": {
            "class_path": "eaft_pl.data.ChatJsonlDataModule",
            "init_args": {"train_file": train_file, "tokenizer_name_or_path": base_dir},
        },
        "trainer": {"logger": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_export_from_a_checkpoint_gives_the_trained_model(base_dir, train_file, tmp_path, batch, monkeypatch, lora):
    if lora:
        module = lora_module(base_dir, learning_rate=1e-2)
    else:
        module = EAFTModule(model_name_or_path=base_dir, learning_rate=1e-2)
    fit(module, base_dir, train_file, tmp_path, steps=2)
    out = tmp_path / "export"
    config = write_config(tmp_path, base_dir, train_file, lora)
    cli_main(["export", "--config", config, f"--ckpt_path={tmp_path / 'last.ckpt'}", f"--output_dir={out}"])
    exported = load_without_peft(out, monkeypatch)
    torch.testing.assert_close(logits_of(exported, batch), logits_of(module.model, batch), rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").is_file()


def test_a_failed_export_leaves_the_previous_folder_and_no_temporary_one(base_dir, tmp_path, monkeypatch):
    module = lora_module(base_dir)
    module.configure_model()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "previous").write_text("kept")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module.tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf_folder(module, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and (out / "previous").read_text() == "kept"


# ---- peft's own LoraConfig fields (model.init_args.lora) -------------------------------------------


def lora_modules(model):
    """``name -> LoRA layer`` of the adapted layers of a PEFT model."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


OLD_KEYS = dict(r=8, alpha=16.0, dropout=0.1, target_modules=["q_proj", "v_proj"], modules_to_save=None, use_rslora=True)


def test_the_old_keys_give_the_peft_config_they_gave_before():
    from peft import LoraConfig

    # What LoRAOptions.to_peft_config built when it had these seven fields (343be77), written out.
    def before(r=16, alpha=32.0, dropout=0.05, target_modules="all-linear", modules_to_save=None, use_rslora=False, init_lora_weights=True):
        return LoraConfig(
            task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=target_modules,
            modules_to_save=modules_to_save, bias="none", use_rslora=use_rslora, init_lora_weights=init_lora_weights,
        )  # fmt: skip

    for old in ({}, OLD_KEYS, {**OLD_KEYS, "init_lora_weights": "gaussian", "modules_to_save": ["lm_head"]}):
        assert LoRAOptions(**old).to_peft_config().to_dict() == before(**old).to_dict(), old
    peft_names = {**OLD_KEYS, "lora_alpha": OLD_KEYS["alpha"], "lora_dropout": OLD_KEYS["dropout"]}
    del peft_names["alpha"], peft_names["dropout"]
    assert LoRAOptions(**peft_names) == LoRAOptions(**OLD_KEYS)
    assert LoRAOptions(**OLD_KEYS).alpha == 16.0 and LoRAOptions(**OLD_KEYS).lora_alpha == 16.0


def test_a_peft_lora_config_and_the_class_path_form_are_taken_as_given():
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, layers_to_transform=[1])
    options = LoRAOptions.from_value(config)
    assert options.to_peft_config().to_dict() == {**config.to_dict(), "task_type": "CAUSAL_LM"}
    # peft's defaults where the config left them: peft's r=8 stays 8 (not the package's 16).
    assert LoRAOptions.from_value(LoraConfig(target_modules=["q_proj"])).r == 8
    # The class_path form is the mapping form: the same fields, the package's defaults.
    spec = {"class_path": "peft.LoraConfig", "init_args": {"lora_alpha": 4.0, "use_dora": True}}
    assert LoRAOptions.from_value(spec) == LoRAOptions(lora_alpha=4.0, use_dora=True)
    with pytest.raises(ValueError, match=r"model.init_args.lora: the class_path form takes class_path: peft.LoraConfig"):
        LoRAOptions.from_value({"class_path": "peft.IA3Config", "init_args": {}})


def test_dora_builds_trains_a_step_and_its_checkpoint_reloads(base_dir, train_file, tmp_path):
    module = lora_module(base_dir, learning_rate=1e-2, lora={"use_dora": True})
    module.configure_model()
    layers = lora_modules(module.model)
    assert layers and all(layer.use_dora["default"] for layer in layers.values())
    before = named(module, True)
    magnitudes = [n for n in before if "lora_magnitude_vector" in n]
    assert magnitudes and all("lora_" in n for n in before)
    fit(module, base_dir, train_file, tmp_path, steps=1)
    after = named(module, True)
    assert all(not torch.equal(after[n], before[n]) for n in magnitudes)  # DoRA's magnitudes trained
    # The checkpoint's hparams are plain data (weights_only) and rebuild the same DoRA model.
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["lora"] == LoRAOptions(r=4, alpha=8.0, dropout=0.0, use_dora=True).to_dict()
    loaded = EAFTModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert loaded.lora == module.lora
    for name, value in after.items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], value, rtol=0, atol=0, msg=name)


def test_rank_pattern_and_layers_to_transform_reach_peft(base_dir):
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "rank_pattern": {"v_proj": 2}, "layers_to_transform": [1]}
    module = lora_module(base_dir, lora=lora)
    module.configure_model()
    ranks = {n.split("model.layers.")[1]: layer.r["default"] for n, layer in lora_modules(module.model).items()}
    assert ranks == {"1.self_attn.q_proj": 4, "1.self_attn.v_proj": 2, "1.mlp.down_proj": 4}  # layer 0 untouched
    assert dict(module.model.named_parameters())[
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"
    ].shape == (2, TINY_LLAMA["hidden_size"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"use_dorra": True}, r"model\.init_args\.lora\.use_dorra is not a field of peft\.LoraConfig .*did you mean use_dora"),
        ({"rank": 4}, r"model\.init_args\.lora\.rank is not a field of peft\.LoraConfig .*the fields are: .*\br, "),
        ({"alpha": 8, "lora_alpha": 16}, r"model\.init_args\.lora\.alpha and model\.init_args\.lora\.lora_alpha are the same option"),
        ({"lora_alpha": -1}, r"model\.init_args\.lora\.lora_alpha must be > 0"),
        ({"task_type": "SEQ_CLS"}, r"model\.init_args\.lora\.task_type is set by eaft-pl to CAUSAL_LM"),
        ({"bias": "lora_only"}, r"model\.init_args\.lora\.bias must be 'none'"),
        ({"init_lora_weights": "olora"}, r"model\.init_args\.lora\.init_lora_weights .*rewrite the base weights"),
        ({"rank_pattern": {"v_proj": 0}}, r"model\.init_args\.lora\.rank_pattern must map module names to integers >= 1"),
        ({"inference_mode": True}, r"model\.init_args\.lora\.inference_mode"),
        # peft's own refusals, quoted, with the package's defaults that led to them.
        ({"layers_to_transform": [0]}, r"model\.init_args\.lora: peft\.LoraConfig refused .*target_modules: all-linear.*layers_to_transform"),
    ],
)
def test_bad_peft_options_name_their_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAOptions(**kwargs)


QUICKSTART = ["--config", str(REPO / "configs/setup/quickstart.yaml"), "--config", str(REPO / "configs/method/eaft.yaml")]


def test_the_cli_takes_peft_fields_and_print_config_round_trips(tmp_path, capsys):
    config = tmp_path / "lora.yaml"
    config.write_text(
        "model:\n  init_args:\n    lora: {r: 8, lora_alpha: 16, use_dora: true, target_modules: [q_proj, v_proj],"
        " rank_pattern: {v_proj: 4}, layers_to_transform: [0]}\n"
    )
    expected = LoRAOptions(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4}, layers_to_transform=[0])
    cli = cli_main([*QUICKSTART, "--config", str(config), "--trainer.logger=false"], run=False)
    assert cli.model.lora == expected
    # Under the CLI, hparams hold the config as written (Lightning's), which rebuilds the same options.
    assert LoRAOptions.from_value(cli.model.hparams.lora) == expected
    with pytest.raises(SystemExit):
        cli_main(["fit", *QUICKSTART, "--config", str(config), "--print_config"])
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text("\n".join(l for l in capsys.readouterr().out.splitlines() if not l.startswith(("ckpt_path:", "weights_only:"))))
    assert cli_main(["--config", str(dumped), "--trainer.logger=false"], run=False).model.lora == expected
    # A dotted override reaches one field; a misspelt one is named.
    cli = cli_main([*QUICKSTART, "--config", str(config), "--model.init_args.lora.r=2", "--trainer.logger=false"], run=False)
    assert cli.model.lora.r == 2 and cli.model.lora.use_dora is True
    with pytest.raises(ValueError, match=r"model\.init_args\.lora\.use_dorra is not a field .*did you mean use_dora"):
        cli_main([*QUICKSTART, "--model.init_args.lora.use_dorra=true", "--trainer.logger=false"], run=False)
    # peft's class by name: the same options, kept as written in hparams.
    spec = "--model.init_args.lora={class_path: peft.LoraConfig, init_args: {r: 4, use_dora: true}}"
    cli = cli_main([*QUICKSTART, spec, "--trainer.logger=false"], run=False)
    assert cli.model.lora == LoRAOptions(r=4, use_dora=True) and cli.model.hparams.lora["class_path"] == "peft.LoraConfig"


def test_a_config_stored_by_the_seven_field_version_still_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the stored config names data files relative to the repository
    text = (REPO / "tests" / "data" / "legacy_configs" / "quickstart_lora.yaml").read_text()
    assert "    lora:\n      r: 8\n      alpha: 16.0\n      dropout: 0.1\n" in text  # the old keys
    config = tmp_path / "stored.yaml"
    config.write_text("\n".join(line for line in text.splitlines() if not line.startswith(("ckpt_path:", "weights_only:"))))
    cli = cli_main(["--config", str(config), "--trainer.logger=false"], run=False)
    assert cli.model.lora == LoRAOptions(**OLD_KEYS, init_lora_weights=True)
    assert cli.model.lora.to_peft_config().lora_alpha == 16.0
