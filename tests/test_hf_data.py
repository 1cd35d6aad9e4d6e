"""Hugging Face datasets as chat data: every layout gives the tokens of the same conversations in
`messages` form through the JSONL DataModule, splits and subsets, the tokenisation cache, errors."""

import json

import pytest
import yaml

from conftest import REPO
from eaft_pl.data import ChatJsonlDataModule, DataError, HFChatDataModule, RecordLayout
from eaft_pl.data import hf as hf_module

SYSTEM = {"role": "system", "content": "Be brief."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# Conversations in `messages` form (the reference) and the same in each layout.
MULTI = [
    [SYSTEM, user("2+2?"), assistant("4."), user("and 3+3?"), assistant("6.")],
    [user("hi"), assistant("hello!")],
    [user("name a colour"), assistant("red")],
]
SINGLE = [
    [SYSTEM, user("2+2?"), assistant("4.")],
    [user("hi"), assistant("hello!")],
    [user("name a colour\nwarm ones only"), assistant("red")],
]
SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(conv):
    return {"conversations": [{"from": SPEAKER[m["role"]], "value": m["content"]} for m in conv]}


def alpaca(conv):
    # The third reference conversation's prompt is an instruction and an input joined by a newline.
    record = {"system": conv[0]["content"]} if conv[0]["role"] == "system" else {}
    instruction, _, extra = conv[-2]["content"].partition("\n")
    return {**record, "instruction": instruction, "input": extra, "output": conv[-1]["content"]}


def prompt_response(conv):
    record = {"system": conv[0]["content"]} if conv[0]["role"] == "system" else {}
    return {**record, "prompt": conv[-2]["content"], "response": conv[-1]["content"]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write(tmp_path, records, fmt, name="train"):
    """Write records as JSONL or parquet; return the path/data_files options that load them."""
    import datasets

    if fmt == "jsonl":
        return {"path": "json", "data_files": write_jsonl(tmp_path / f"{name}.jsonl", records)}
    ds = datasets.Dataset.from_list(records)
    if fmt == "parquet":
        out = tmp_path / f"{name}.parquet"
        ds.to_parquet(str(out))
        return {"path": "parquet", "data_files": str(out)}
    if fmt == "folder":  # load_dataset on a folder of data files
        (tmp_path / "folder").mkdir(exist_ok=True)
        ds.to_parquet(str(tmp_path / "folder" / f"{name}.parquet"))
        return {"path": str(tmp_path / "folder")}
    out = tmp_path / "saved"
    datasets.DatasetDict({name: ds}).save_to_disk(str(out))
    return {"path": str(out)}


def hf_module_for(tmp_path, tokenizer_dir, **kwargs):
    kwargs.setdefault("cache_dir", str(tmp_path / "hf_cache"))
    kwargs.setdefault("max_length", 128)
    return HFChatDataModule(tokenizer_name_or_path=str(tokenizer_dir), **kwargs)


def tokens(examples):
    return [(e.input_ids, e.labels) for e in examples]


def reference_tokens(tmp_path, tokenizer_dir, conversations, **kwargs):
    """What the JSONL DataModule makes of the conversations in `messages` form."""
    path = write_jsonl(tmp_path / "reference.jsonl", [{"messages": c} for c in conversations])
    dm = ChatJsonlDataModule(train_file=path, tokenizer_name_or_path=str(tokenizer_dir), max_length=128, **kwargs)
    dm.setup("fit")
    return tokens(dm.datasets["train"])


LAYOUT_CASES = [
    ("messages", "jsonl", MULTI, lambda c: {"messages": c, "id": 1}),
    ("sharegpt", "parquet", MULTI, sharegpt),
    ("alpaca", "jsonl", SINGLE, alpaca),
    ("prompt_response", "parquet", SINGLE, prompt_response),
    ("sharegpt", "saved", MULTI, sharegpt),
    ("alpaca", "folder", SINGLE, alpaca),
]


@pytest.mark.parametrize("layout, fmt, conversations, convert", LAYOUT_CASES)
@pytest.mark.parametrize("explicit", [False, True])
def test_every_layout_gives_the_tokens_of_the_messages_form(tmp_path, tokenizer_dir, layout, fmt, conversations, convert, explicit):
    source = write(tmp_path, [convert(c) for c in conversations], fmt)
    dm = hf_module_for(tmp_path, tokenizer_dir, layout=layout if explicit else "auto", **source)
    dm.setup("fit")
    assert tokens(dm.datasets["train"]) == reference_tokens(tmp_path, tokenizer_dir, conversations)
    assert [e.source.rsplit(":", 1)[1] for e in dm.datasets["train"]] == ["0", "1", "2"]
    assert dm.summary["train"]["examples"] == 3


def test_alpaca_with_and_without_input(tmp_path):
    layout = RecordLayout("alpaca")
    base = {"instruction": "Translate.", "output": "Bonjour"}
    assert layout.to_messages({**base, "input": "Hello"}, "s") == [user("Translate.\nHello"), assistant("Bonjour")]
    for no_input in ({**base, "input": ""}, {**base, "input": None}, base):
        assert layout.to_messages(no_input, "s") == [user("Translate."), assistant("Bonjour")]
    with pytest.raises(DataError, match="s: 'input' must be a string, got int"):
        layout.to_messages({**base, "input": 3}, "s")


def test_sharegpt_speakers_map_to_roles():
    turns = [("system", "sys"), ("human", "q"), ("function_call", "{\"name\": \"f\"}"), ("observation", "42"),
             ("gpt", "it is 42"), ("user", "thanks"), ("assistant", "bye"), ("tool", "log")]  # fmt: skip
    record = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    roles = [m["role"] for m in RecordLayout().to_messages(record, "s")]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user", "assistant", "tool"]
    with pytest.raises(DataError, match="s: conversations\\[1\\]: unknown speaker 'bot'"):
        RecordLayout().to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "s")
    with pytest.raises(DataError, match="unknown speaker 'humna'.*did you mean 'human'"):
        RecordLayout().to_messages({"conversations": [{"from": "humna", "value": "q"}]}, "s")
    with pytest.raises(DataError, match="unknown speaker \['gpt'\]"):  # not a string: a DataError, not a TypeError
        RecordLayout().to_messages({"conversations": [{"from": ["gpt"], "value": "q"}]}, "s")
    # role/content turns under `conversations`: the error says which options read them.
    with pytest.raises(DataError, match="conversations\\[0\\] needs 'from' and 'value'.*layout: messages.*'messages': 'conversations'"):
        RecordLayout("sharegpt").to_messages({"conversations": [user("q"), assistant("a")]}, "s")


def test_system_prompt_is_added_only_where_there_is_none(tmp_path, tokenizer_dir):
    records = [
        sharegpt(MULTI[0]),  # has a system turn: kept as it is
        sharegpt(MULTI[1]),
        {"system": "  ", **sharegpt(MULTI[2])},  # a blank system field counts as none
    ]
    source = write(tmp_path, records, "parquet")
    dm = hf_module_for(tmp_path, tokenizer_dir, system_prompt="Be brief.", **source)
    dm.setup("fit")
    expected = [MULTI[0], [SYSTEM, *MULTI[1]], [SYSTEM, *MULTI[2]]]
    assert tokens(dm.datasets["train"]) == reference_tokens(tmp_path, tokenizer_dir, expected)
    # The JSONL DataModule has the same option (the same code).
    assert reference_tokens(tmp_path, tokenizer_dir, MULTI, system_prompt="Be brief.") == tokens(dm.datasets["train"])


def test_columns_rename_fields(tmp_path, tokenizer_dir):
    records = [{"question": c[-2]["content"], "answer": c[-1]["content"]} for c in SINGLE[1:]]
    source = write(tmp_path, records, "parquet")
    dm = hf_module_for(tmp_path, tokenizer_dir, columns={"prompt": "question", "response": "answer"}, **source)
    dm.setup("fit")
    assert tokens(dm.datasets["train"]) == reference_tokens(tmp_path, tokenizer_dir, SINGLE[1:])

    dialog = write(tmp_path, [{"dialog": c} for c in MULTI], "jsonl", name="dialog")
    dm = hf_module_for(tmp_path, tokenizer_dir, layout="messages", columns={"messages": "dialog"}, **dialog)
    dm.setup("fit")
    assert tokens(dm.datasets["train"]) == reference_tokens(tmp_path, tokenizer_dir, MULTI)

    # The mapping goes field -> your key; the other way round is refused with the fields listed.
    with pytest.raises(ValueError, match="data.init_args.columns: 'question' is not a field of layout 'prompt_response'"):
        hf_module_for(tmp_path, tokenizer_dir, layout="prompt_response", columns={"question": "prompt"}, **source)


def test_auto_detection_error_lists_the_keys_and_the_layouts(tmp_path, tokenizer_dir):
    records = [prompt_response(SINGLE[1]), {"text": "no chat here", "id": 3}]
    source = write(tmp_path, records, "jsonl")
    dm = hf_module_for(tmp_path, tokenizer_dir, **source)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert f"{source['data_files']}[train]:1: found keys ['id', 'prompt', 'response', 'text']" in message
    for expected in ("'messages'", "'conversations'", "'instruction' and 'output'", "'prompt' and 'response'", "data.init_args.columns"):
        assert expected in message


def test_a_missing_column_names_the_key_and_the_row(tmp_path, tokenizer_dir):
    records = [alpaca(SINGLE[1]), alpaca(SINGLE[2]), {"instruction": "no answer"}]
    source = write(tmp_path, records, "jsonl")
    dm = hf_module_for(tmp_path, tokenizer_dir, layout="alpaca", **source)
    with pytest.raises(DataError, match=r"train\.jsonl\[train\]:2: no 'output' \(the 'output' field of layout 'alpaca'\).*data.init_args.columns"):
        dm.setup("fit")
    # A renamed column that is not in the data at all fails on the first row.
    dm = hf_module_for(tmp_path, tokenizer_dir, layout="alpaca", columns={"output": "answer"}, **source)
    with pytest.raises(DataError, match=r"\[train\]:0: no 'answer' \(the 'output' field"):
        dm.setup("fit")


def test_bad_options_are_refused(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="data.init_args.layout: unknown layout 'chatml'; use one of \\['auto', 'messages'"):
        hf_module_for(tmp_path, tokenizer_dir, path="json", layout="chatml")
    with pytest.raises(ValueError, match="data.init_args.streaming: true is not supported.*train\\[:20000\\]"):
        hf_module_for(tmp_path, tokenizer_dir, path="json", streaming=True)
    with pytest.raises(ValueError, match="data.init_args.max_train_examples must be >= 1"):
        hf_module_for(tmp_path, tokenizer_dir, path="json", max_train_examples=0)
    source = write(tmp_path, [sharegpt(c) for c in MULTI], "saved")
    with pytest.raises(ValueError, match="is a save_to_disk folder, which has no \\['name'\\]"):
        hf_module_for(tmp_path, tokenizer_dir, name="default", **source)
    # An unknown split is the library's error, prefixed with the option that named it.
    dm = hf_module_for(tmp_path, tokenizer_dir, val_split="validation", **write(tmp_path, [sharegpt(c) for c in MULTI], "jsonl"))
    with pytest.raises(DataError, match="data.init_args.val_split='validation' of data.init_args.path='json': Unknown split"):
        dm.setup("fit")


def numbered(n):
    return [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(n)]


@pytest.mark.parametrize("fmt", ["jsonl", "saved"])
def test_split_expressions(tmp_path, tokenizer_dir, fmt):
    source = write(tmp_path, numbered(8), fmt)
    dm = hf_module_for(tmp_path, tokenizer_dir, train_split="train[:75%]", val_split="train[75%:]", test_split="train[2:4]", **source)
    dm.setup()
    label = source.get("data_files", source["path"])
    assert [e.source for e in dm.datasets["val"]] == [f"{label}[train[75%:]]:{i}" for i in range(2)]
    assert (len(dm.datasets["train"]), len(dm.datasets["test"])) == (6, 2)
    full = reference_tokens(tmp_path, tokenizer_dir, [[user(r["prompt"]), assistant(r["response"])] for r in numbered(8)])
    assert tokens(dm.datasets["train"]) + tokens(dm.datasets["val"]) == full
    assert tokens(dm.datasets["test"]) == full[2:4]
    assert dm.files["train"] == f"{label}[train[:75%]]"  # the MLflow `data` tag


def test_separate_files_per_split(tmp_path, tokenizer_dir):
    train = write_jsonl(tmp_path / "a.jsonl", numbered(5))
    val = write_jsonl(tmp_path / "b.jsonl", numbered(2))
    dm = hf_module_for(tmp_path, tokenizer_dir, path="json", data_files={"train": train, "validation": val}, val_split="validation")
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (5, 2)
    # Sources and the MLflow tag name each split's own file.
    assert dm.files == {"train": f"{train}[train]", "val": f"{val}[validation]"}
    assert dm.datasets["val"][1].source == f"{val}[validation]:1"
    # Several files, or several splits in one expression: the builder's name.
    dm = hf_module_for(tmp_path, tokenizer_dir, path="json", data_files={"train": [train, val]}, val_split="train[:1]+train[-1:]")
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (7, 2)
    assert dm.files == {"train": "json[train]", "val": "json[train[:1]+train[-1:]]"}


def test_the_layout_option_lists_every_layout():
    from eaft_pl.data.layouts import LAYOUT_FIELDS, LAYOUTS

    assert LAYOUTS == ("auto", *LAYOUT_FIELDS)


def test_max_train_examples_draws_the_same_subset_every_time(tmp_path, tokenizer_dir):
    source = write(tmp_path, numbered(30), "jsonl")

    def draw(seed, cache):
        dm = hf_module_for(tmp_path, tokenizer_dir, max_train_examples=5, shuffle_seed=seed, cache_dir=str(tmp_path / cache), **source)
        dm.setup("fit")
        return dm.datasets["train"]

    first, again, other = draw(0, "c1"), draw(0, "c2"), draw(1, "c1")
    assert [e.source for e in first] == [e.source for e in again] and tokens(first) == tokens(again)
    assert [e.source for e in first] != [e.source for e in other]
    # Sources name the rows of the whole split; each sampled row has that row's tokens.
    rows = [int(e.source.rsplit(":", 1)[1]) for e in first]
    assert rows == sorted(rows) and len(set(rows)) == 5 and max(rows) < 30
    full = reference_tokens(tmp_path, tokenizer_dir, [[user(r["prompt"]), assistant(r["response"])] for r in numbered(30)])
    assert tokens(first) == [full[i] for i in rows]
    # More than the split holds: every row.
    dm = hf_module_for(tmp_path, tokenizer_dir, max_train_examples=100, **source)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 30


def test_a_second_setup_reads_the_tokens_from_the_cache(tmp_path, tokenizer_dir, monkeypatch):
    calls = []
    encode = hf_module.encode_conversation
    monkeypatch.setattr(hf_module, "encode_conversation", lambda *a, **k: calls.append(1) or encode(*a, **k))
    source = write(tmp_path, [sharegpt(c) for c in MULTI], "parquet")

    def setup(**options):
        calls.clear()
        dm = hf_module_for(tmp_path, tokenizer_dir, **source, **options)
        dm.prepare_data()  # what the Trainer calls first: tokenises into the cache
        after_prepare = len(calls)
        dm.setup("fit")
        assert len(calls) == after_prepare  # setup itself reads the cache
        return after_prepare, dm.datasets["train"]

    n, first = setup()
    assert n == len(MULTI)
    n, second = setup()
    assert n == 0 and tokens(second) == tokens(first)
    (cache,) = second.dataset.cache_files
    assert cache["filename"].startswith(str(tmp_path / "hf_cache")) and "/cache-" in cache["filename"]
    # Anything that changes the tokens changes the fingerprint: tokenised again.
    assert setup(max_length=60)[0] == len(MULTI)
    assert setup(system_prompt="Be kind.")[0] == len(MULTI)
    assert setup(chat_template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")[0] == len(MULTI)  # fmt: skip
    assert setup()[0] == 0  # the first settings are still cached


def test_prepare_data_tokenises_what_the_stage_uses(tmp_path, tokenizer_dir, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    source = write(tmp_path, numbered(6), "jsonl")
    dm = hf_module_for(tmp_path, tokenizer_dir, train_split="train[:4]", val_split="train[4:5]", test_split="train[5:]", **source)
    loaded = []
    monkeypatch.setattr(dm, "_load_raw", lambda split, expr: loaded.append(split) or HFChatDataModule._load_raw(dm, split, expr))
    for fn, splits in ((TrainerFn.TESTING, ["test"]), (TrainerFn.FITTING, ["train", "val"]), (None, ["train", "val", "test"])):
        loaded.clear()
        dm.trainer = SimpleNamespace(state=SimpleNamespace(fn=fn))
        dm.prepare_data()
        assert loaded == splits, fn


def test_tokenising_in_two_processes_gives_the_same_rows(tmp_path, tokenizer_dir):
    source = write(tmp_path, numbered(12), "jsonl")
    one = hf_module_for(tmp_path, tokenizer_dir, **source)
    two = hf_module_for(tmp_path, tokenizer_dir, num_proc=2, cache_dir=str(tmp_path / "two"), **source)
    one.setup("fit")
    two.setup("fit")
    rows = lambda dm: [(e.input_ids, e.labels, e.source) for e in dm.datasets["train"]]  # noqa: E731
    assert rows(two) == rows(one) and len(rows(one)) == 12


def test_the_drop_policy_is_the_jsonl_one(tmp_path, tokenizer_dir):
    records = numbered(3) + [{"prompt": "z" * 200, "response": "lost"}]
    source = write(tmp_path, records, "jsonl")
    dm = hf_module_for(tmp_path, tokenizer_dir, **source)
    dm.max_length = 64
    with pytest.warns(UserWarning, match="dropped 1 of 4 examples"):
        dm.setup("fit")
    reference = ChatJsonlDataModule(train_file=source["data_files"], tokenizer_name_or_path=str(tokenizer_dir), max_length=64)
    with pytest.warns(UserWarning):
        reference.setup("fit")
    assert tokens(dm.datasets["train"]) == tokens(reference.datasets["train"])
    assert dm.summary["train"] == {**reference.summary["train"], "dropped_sources": [f"{source['data_files']}[train]:3"]}
    assert [e.source for e in dm.datasets["train"][-2:]] == [f"{source['data_files']}[train]:{i}" for i in (1, 2)]

    nothing = hf_module_for(tmp_path, tokenizer_dir, **write(tmp_path, records[3:], "jsonl", name="long"))
    nothing.max_length = 32
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no example is left"):
        nothing.setup("fit")


def test_fit_two_steps_through_the_cli(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from eaft_pl.cli import cli_main

    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((REPO / "configs" / "setup" / "quickstart.yaml").read_text())
    quickstart = REPO / "data" / "quickstart"
    config["data"] = {
        "class_path": "eaft_pl.data.HFChatDataModule",
        "init_args": {
            "path": "json",
            "data_files": str(quickstart / "train.jsonl"),
            "train_split": "train[:40]",
            "val_split": "train[40:50]",
            "cache_dir": str(tmp_path / "hf_cache"),
            "tokenizer_name_or_path": str(quickstart / "tokenizer"),
            "max_length": 192,
            "batch_size": 10,
        },
    }
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump(config))
    cli_main(["fit", "--config", str(tmp_path / "hf.yaml"), "--trainer.max_steps=2", "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=1",
              "--diagnostics.enabled=false",
              f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db"])  # fmt: skip
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["data"] == f"{quickstart / 'train.jsonl'}[train[:40]]"
    assert {"train/ce", "val/domain/ce"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/ce")] == [0, 1]
    summary = json.loads(open(client.download_artifacts(run.info.run_id, "data_summary.json", str(tmp_path))).read())
    assert (summary["train"]["examples"], summary["val"]["examples"]) == (40, 10)


def test_help_documents_every_option(capsys):
    from eaft_pl.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["fit", "--data.help", "eaft_pl.data.HFChatDataModule"])
    out = capsys.readouterr().out
    for option in ("--data.path", "--data.max_train_examples", "--data.columns", "--data.num_proc", "--data.tokenizer_name_or_path"):
        assert option in out, option
    assert "Split expression of the training data" in out and "prompt_response" in out
