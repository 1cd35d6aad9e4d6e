"""Every kind of bad input, one row each, through the real entry points: a data file through
``DataModule.setup``, an option through the ``eaft-pl`` parser (``cli_main(..., run=False)``). Each
row gets an error naming the file and line or the config key and what to do, or a counted skip. The
bad-input tables of docs/reliability.md list the same rows, with the test of each."""

import contextlib
import io
import json
import re

import pytest
from mlflow import MlflowClient

from test_cli import quick_args, runs
from eaft_pl.cli import cli_main
from eaft_pl.data import ChatJsonlDataModule, DataError
from eaft_pl.models.char_tokenizer import build_char_tokenizer

GOOD = json.dumps({"prompt": "p", "response": "r"})
USER = {"role": "user", "content": "x"}

# (case, the bad line 2 of a three-line file, what the error says besides "file:2")
BAD_LINES = [
    ("malformed JSON", '{"messages": [', "invalid JSON"),
    ("not an object", '["a list"]', "expected a JSON object"),
    ("misspelled 'messages'", '{"mesages": []}', "found keys \\['mesages'\\].*did you mean 'messages'"),
    ("misspelled 'response'", '{"prompt": "p", "respone": "r"}', "did you mean 'response'"),
    ("misspelled 'system'", '{"prompt": "p", "response": "r", "sytem": "s"}', "key 'sytem' is not read by layout 'prompt_response'; did you mean 'system'"),
    ("only a prompt", '{"prompt": "only a prompt"}', "expected 'messages'"),
    ("non-string field", '{"prompt": 3, "response": "r"}', "'prompt' must be a string"),
    ("empty messages", '{"messages": []}', "non-empty list"),
    ("message without content", '{"messages": [{"role": "user"}]}', "lacks \\['content'\\]"),
    ("misspelled 'content'", '{"messages": [{"role": "user", "contnet": "x"}]}', "lacks \\['content'\\].*did you mean 'content'"),
    ("unknown role", '{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
    ("misspelled role", '{"messages": [{"role": "assistent", "content": "x"}]}', "unknown role 'assistent'.*did you mean 'assistant'"),
    ("non-string content", '{"messages": [{"role": "user", "content": ["x"]}]}', "'content' must be a string"),
    ("no assistant turn", json.dumps({"messages": [USER]}), "no assistant turn"),
    ("empty assistant turn", json.dumps({"messages": [USER, {"role": "assistant", "content": ""}]}), "empty assistant turn"),
    ("whitespace-only assistant turn", json.dumps({"messages": [USER, {"role": "assistant", "content": " \n\t"}]}), "empty assistant turn"),
    ("assistant before any prompt", '{"messages": [{"role": "assistant", "content": "x"}]}', "a prompt must come first"),
]


@pytest.mark.parametrize("line, match", [row[1:] for row in BAD_LINES], ids=[row[0] for row in BAD_LINES])
def test_a_bad_line_names_file_and_line(tmp_path, tokenizer_dir, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n{line}\n{GOOD}\n")
    dm = ChatJsonlDataModule(train_file=str(path), tokenizer_name_or_path=str(tokenizer_dir))
    with pytest.raises(DataError, match=match) as err:
        dm.setup("fit")
    assert f"{path}:2: " in str(err.value)


def test_undecodable_bytes_name_file_line_and_byte(tmp_path, tokenizer_dir):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"prompt": "caf\xe9", "response": "r"}\n')
    dm = ChatJsonlDataModule(train_file=str(path), tokenizer_name_or_path=str(tokenizer_dir))
    with pytest.raises(DataError, match=f"{path}:2: not valid UTF-8 .* at byte 15.*re-encode the file as UTF-8"):
        dm.setup("fit")


@pytest.mark.parametrize("content, match", [(None, "no such file"), ("\n \n", "the file holds no conversation")], ids=["missing", "blank"])
def test_a_missing_or_blank_file_is_named(tmp_path, tokenizer_dir, content, match):
    path = tmp_path / "train.jsonl"
    if content is not None:
        path.write_text(content)
    dm = ChatJsonlDataModule(train_file=str(path), tokenizer_name_or_path=str(tokenizer_dir))
    with pytest.raises(DataError, match=f"{path}: {match}"):
        dm.setup("fit")


def test_prompts_longer_than_max_length_are_a_counted_skip(tmp_path, tokenizer_dir):
    path = tmp_path / "train.jsonl"
    path.write_text(f"{GOOD}\n{json.dumps({'prompt': 'z' * 200, 'response': 'lost'})}\n{GOOD}\n")
    dm = ChatJsonlDataModule(train_file=str(path), tokenizer_name_or_path=str(tokenizer_dir), max_length=64)
    with pytest.warns(UserWarning, match=f"dropped 1 of 3 examples .*first: {path}:2.*raise data.init_args.max_length"):
        dm.setup("fit")
    summary = dm.summary["train"]
    assert (summary["kept"], summary["dropped_no_supervised_tokens"], summary["dropped_sources"]) == (2, 1, [f"{path}:2"])


def test_nothing_left_after_filtering_is_an_error_naming_the_examples(tmp_path, tokenizer_dir):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "z" * 200, "response": "lost"}) + "\n")
    dm = ChatJsonlDataModule(train_file=str(path), tokenizer_name_or_path=str(tokenizer_dir), max_length=32)
    with pytest.warns(UserWarning), pytest.raises(DataError, match=f"train: no example is left .*first: {path}:1.*data.init_args.max_length"):
        dm.setup("fit")


def test_a_tokenizer_without_chat_template_needs_one(tmp_path):
    tok = build_char_tokenizer(chat_template=None)
    tok.save_pretrained(tmp_path / "tok")
    path = tmp_path / "t.jsonl"
    path.write_text(GOOD + "\n")
    dm = ChatJsonlDataModule(train_file=str(path), tokenizer_name_or_path=str(tmp_path / "tok"))
    with pytest.raises(DataError, match=f"{tmp_path / 'tok'}' has no chat template.*set data.init_args.chat_template"):
        dm.setup("fit")
    # Supplying one in the config fixes it.
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    dm = ChatJsonlDataModule(train_file=str(path), tokenizer_name_or_path=str(tmp_path / "tok"), chat_template=template)
    dm.setup("fit")
    assert dm.summary["train"]["kept"] == 1


# ---- options, through the eaft-pl parser -----------------------------------------------------------

EAFT = "--model.init_args.gate=eaft_pl.loss.gates.EAFTGate"
STATIC = "--model.init_args.gate=eaft_pl.loss.reference_gates.StaticConflictMaskGate"

# (case, command-line arguments, text the error must hold: the key, and the rule)
BAD_OPTIONS = [
    ("K < 2", ["--model.init_args.top_k=1"], "model.init_args.top_k must be >= 2"),
    ("zero learning rate", ["--model.init_args.learning_rate=0"], "model.init_args.learning_rate must be > 0"),
    ("negative learning rate", ["--model.init_args.learning_rate=-1e-5"], "model.init_args.learning_rate must be > 0"),
    # jsonargparse's own type check: it names the key and the value.
    ("infinite learning rate", ["--model.init_args.learning_rate=inf"], "Parser key \"learning_rate\".*Got value: inf"),
    ("negative warmup", ["--model.init_args.warmup_ratio=-0.1"], "model.init_args.warmup_ratio must lie in"),
    ("negative weight decay", ["--model.init_args.weight_decay=-0.1"], "model.init_args.weight_decay must be >= 0"),
    ("Adam beta of 1", ["--model.init_args.adam_betas=[0.9, 1.0]"], "model.init_args.adam_betas must be"),
    ("Adam eps 0", ["--model.init_args.adam_eps=0"], "model.init_args.adam_eps must be > 0"),
    ("chunk size 0", ["--model.init_args.chunk_size=0"], "model.init_args.chunk_size must be a positive integer"),
    ("negative skip limit", ["--model.init_args.max_skipped_steps=-1"], "model.init_args.max_skipped_steps must be an integer >= 0"),
    ("unknown dtype", ["--model.init_args.torch_dtype=float33"], "model.init_args.torch_dtype: 'float33' is not a torch dtype"),
    ("conflict threshold > 1", ["--model.init_args.conflict_max_label_prob=2"], "model.init_args.conflict_max_label_prob must lie in"),
    ("negative alpha", [EAFT, "--model.init_args.gate.init_args.alpha=-1"], "EAFTGate: alpha must be >= 0.*model.init_args.gate.init_args.alpha"),
    ("normalizer 0", [EAFT, "--model.init_args.gate.init_args.normalizer=0"], "EAFTGate: normalizer must be positive.*gate.init_args.normalizer"),
    ("normalizer of no type", [EAFT, "--model.init_args.gate.init_args.normalizer=ln"], "Expected a typing.Literal\\['log_k'\\].*key='gate.init_args.normalizer', val='ln'"),
    ("sigmoid steepness 0", ["--model.init_args.gate=eaft_pl.loss.gates.SigmoidGate", "--model.init_args.gate.init_args.steepness=0"], "SigmoidGate: steepness must be > 0.*gate.init_args.steepness"),
    ("sigmoid midpoint > 1", ["--model.init_args.gate=eaft_pl.loss.gates.SigmoidGate", "--model.init_args.gate.init_args.midpoint=3"], "SigmoidGate: midpoint must lie in \\[0, 1\\].*gate.init_args.midpoint"),
    ("mask quantile > 1", ["--model.init_args.gate=eaft_pl.loss.gates.EntropyMaskGate", "--model.init_args.gate.init_args.quantile=1.5"], "EntropyMaskGate: quantile must lie in \\[0, 1\\].*gate.init_args.quantile"),
    ("conflict quantile < 0", ["--model.init_args.gate=eaft_pl.loss.gates.ConflictMaskGate", "--model.init_args.gate.init_args.prob_quantile=-0.1"], "ConflictMaskGate: prob_quantile must lie in.*gate.init_args.prob_quantile"),
    ("static alpha < 0", ["--model.init_args.gate=eaft_pl.loss.reference_gates.StaticEAFTGate", "--model.init_args.gate.init_args.alpha=-2"], "StaticEAFTGate: alpha must be >= 0.*gate.init_args.alpha"),
    ("static threshold > 1", [STATIC, "--model.init_args.gate.init_args.max_label_prob=2"], "StaticConflictMaskGate: max_label_prob must lie in.*gate.init_args.max_label_prob"),
    ("FLOW tau 0", ["--model.init_args.gate=eaft_pl.loss.reference_gates.FLOWGate", "--model.init_args.gate.init_args.tau=0"], "FLOWGate: tau must be > 0.*gate.init_args.tau"),
    ("max_length 0", ["--data.init_args.max_length=0"], "data.init_args.max_length must be >= 1"),
    ("batch_size 0", ["--data.init_args.batch_size=0"], "data.init_args.batch_size must be >= 1"),
    ("eval_batch_size 0", ["--data.init_args.eval_batch_size=0"], "data.init_args.eval_batch_size must be >= 1"),
    ("negative workers", ["--data.init_args.num_workers=-1"], "data.init_args.num_workers must be >= 0"),
    ("pad multiple 0", ["--data.init_args.pad_to_multiple_of=0"], "data.init_args.pad_to_multiple_of must be >= 1"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the parser tests: creating a sqlite store takes seconds."""
    return tmp_path_factory.mktemp("store")


def parse(store, extra):
    """Run the parser and instantiation of ``eaft-pl fit`` (no training); returns what it raised and
    stderr, after checking that no MLflow run was started (the logger creates its run on first use)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises((ValueError, SystemExit)) as raised:
        cli_main(quick_args(store, extra=extra), run=False)
    client = MlflowClient(f"sqlite:///{store}/mlruns/mlflow.db")
    assert not [e for e in client.search_experiments() if client.search_runs([e.experiment_id])]
    return raised.value, err.getvalue()


@pytest.mark.parametrize("extra, match", [row[1:] for row in BAD_OPTIONS], ids=[row[0] for row in BAD_OPTIONS])
def test_an_out_of_range_option_names_its_key(store, extra, match):
    error, stderr = parse(store, extra)
    # Our checks raise ValueError at instantiation; jsonargparse's own type checks exit with status 2.
    message = str(error) if isinstance(error, ValueError) else stderr
    assert isinstance(error, ValueError) or error.code == 2
    assert re.search(match, message, re.S), message[-600:]


UNKNOWN_KEYS = [
    ("misspelled model option", ["--model.init_args.learnig_rate=1e-3"], "Option 'learnig_rate' is not accepted"),
    ("misspelled data option", ["--data.init_args.max_lenght=3"], "Option 'max_lenght' is not accepted"),
    ("misspelled trainer option", ["--trainer.max_stesp=3"], "unrecognized arguments: --trainer.max_stesp=3"),
]


@pytest.mark.parametrize("extra, match", [row[1:] for row in UNKNOWN_KEYS], ids=[row[0] for row in UNKNOWN_KEYS])
def test_an_unknown_key_is_named(store, extra, match):
    error, stderr = parse(store, extra)
    assert isinstance(error, SystemExit) and error.code == 2
    assert match in stderr


def test_an_unknown_key_in_a_config_file_is_named(tmp_path, store):
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  init_args:\n    warmup_ration: 0.1\n")
    error, stderr = parse(store, ["--config", str(config)])
    assert isinstance(error, SystemExit) and "Option 'warmup_ration' is not accepted" in stderr


def test_bad_data_during_fit_leaves_the_mlflow_run_failed_not_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{GOOD}\n{{\"mesages\": []}}\n")
    with pytest.raises(DataError, match=f"{bad}:2"):
        cli_main(["fit", *quick_args(tmp_path, extra=[f"--data.init_args.train_file={bad}"])])
    _, found = runs(tmp_path)
    assert [r.info.status for r in found] == ["FAILED"]
