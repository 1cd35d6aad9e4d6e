"""Chat JSONL -> tokens and labels: which tokens are supervised, truncation, and every input error."""

import json

import pytest
import torch

from eaft_pl.data import ChatJsonlDataModule, Conversation, DataError, collate, encode_conversation, read_chat_jsonl
from eaft_pl.models.char_tokenizer import build_char_tokenizer

# ChatML with {% generation %} markers around what the assistant writes: HF can then return the
# assistant mask itself, an independent reference for the prefix-rendering method.
CHATML_WITH_GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A Llama-3-like layout: a BOS-like header, role headers and an end-of-turn token, no markers.
LLAMA3_LIKE = (
    "BOS|"
    "{% for message in messages %}"
    "{{ '[' + message['role'] + ']\n\n' + message['content'] | trim + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant]\n\n' }}{% endif %}"
)

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


def supervised_segments(tok, example):
    """The supervised tokens decoded as contiguous text segments."""
    segments, current = [], []
    for token_id, label in zip(example.input_ids, example.labels):
        if label != -100:
            assert label == token_id
            current.append(token_id)
        elif current:
            segments.append(tok.decode(current))
            current = []
    if current:
        segments.append(tok.decode(current))
    return segments


def test_single_turn_supervises_the_answer_and_end_of_turn_only(char_tokenizer):
    conv = Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}])
    ex = encode_conversation(char_tokenizer, conv, max_length=512)
    assert supervised_segments(char_tokenizer, ex) == ["hello!<|im_end|>\n"]
    assert char_tokenizer.decode(ex.input_ids).startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ex.num_supervised == len("hello!") + 2


def test_multi_turn_supervises_every_assistant_turn(char_tokenizer):
    ex = encode_conversation(char_tokenizer, Conversation(MULTI_TURN), max_length=512)
    assert supervised_segments(char_tokenizer, ex) == ["4.<|im_end|>\n", "6, of course.<|im_end|>\n"]


def test_llama3_like_template_without_markers(char_tokenizer):
    ex = encode_conversation(char_tokenizer, Conversation(MULTI_TURN), max_length=512, chat_template=LLAMA3_LIKE)
    assert char_tokenizer.decode(ex.input_ids).startswith("BOS|[system]")
    assert supervised_segments(char_tokenizer, ex) == ["4.<|im_end|>", "6, of course.<|im_end|>"]


@pytest.mark.parametrize("messages", [MULTI_TURN, MULTI_TURN[1:3]])
def test_prefix_rendering_agrees_with_generation_markers(messages):
    tok = build_char_tokenizer(chat_template=CHATML_WITH_GENERATION)
    ex = encode_conversation(tok, Conversation(messages), max_length=512)
    hf = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ex.input_ids == list(hf["input_ids"])
    ours = [int(label != -100) for label in ex.labels]
    assert ours == list(hf["assistant_masks"])
    assert sum(ours) > 0


def test_truncation_keeps_a_partial_answer_and_drops_answerless_examples(char_tokenizer):
    conv = Conversation([{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 30}])
    full = encode_conversation(char_tokenizer, conv, max_length=1000)
    prompt_len = full.labels.index(next(label for label in full.labels if label != -100))
    partial = encode_conversation(char_tokenizer, conv, max_length=prompt_len + 5)
    assert partial.truncated and len(partial.input_ids) == prompt_len + 5
    assert partial.num_supervised == 5
    none_left = encode_conversation(char_tokenizer, conv, max_length=prompt_len)
    assert none_left.num_supervised == 0


def test_collate_pads_right_and_masks_padding():
    from eaft_pl.data.chat import EncodedExample

    batch = collate([EncodedExample([5, 6, 7], [-100, 6, 7]), EncodedExample([8], [8])], pad_token_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]


# ---- the JSONL reader and the DataModule ----------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_both_layouts_are_read(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": MULTI_TURN, "id": 7},
            {"prompt": "p", "response": "r", "system": "s"},
            "",  # blank lines are skipped
        ],
    )
    convs = read_chat_jsonl(path)
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:2"]
    assert convs[1].messages == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"},
    ]


def test_datamodule_counts_and_reports_examples_truncated_to_nothing(tmp_path, tokenizer_dir):
    records = [{"prompt": "short", "response": "ok"}] * 3 + [{"prompt": "z" * 200, "response": "lost"}]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    dm = ChatJsonlDataModule(train_file=train, val_file=train, tokenizer_name_or_path=str(tokenizer_dir), max_length=64, batch_size=2)
    with pytest.warns(UserWarning, match="dropped 1 of 4 examples"):
        dm.setup("fit")
    s = dm.summary["train"]
    assert (s["examples"], s["kept"], s["truncated"], s["dropped_no_supervised_tokens"]) == (4, 3, 1, 1)
    assert s["dropped_sources"] == [f"{train}:4"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].dtype == torch.long


# Malformed lines, bad files and a missing chat template: tests/test_bad_input.py.


def test_a_template_that_rewrites_earlier_turns_is_refused(char_tokenizer):
    # Like Qwen3's thinking template, this one renders earlier assistant turns differently.
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[earlier answer]"
        "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-stable at message 2"):
        encode_conversation(char_tokenizer, Conversation(MULTI_TURN, "f.jsonl:9"), 512, chat_template=template)


def test_a_template_that_raises_names_the_source(char_tokenizer):
    strict = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    conv = Conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}], "f.jsonl:3")
    with pytest.raises(DataError, match="f.jsonl:3: the chat template refused this conversation: Conversation roles must alternate"):
        encode_conversation(char_tokenizer, conv, 512, chat_template=strict)


def test_jsonl_layout_columns_and_system_prompt(tmp_path, tokenizer_dir):
    records = [
        {"question": "Translate.", "context": "Hello", "answer": "Bonjour"},
        {"question": "Greet.", "answer": "Hi", "persona": "Be warm."},
    ]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    dm = ChatJsonlDataModule(
        train_file=path,
        tokenizer_name_or_path=str(tokenizer_dir),
        layout="alpaca",
        columns={"instruction": "question", "input": "context", "output": "answer", "system": "persona"},
        system_prompt="Be brief.",
    )
    convs = [c.messages for c in dm.load_conversations("train")]
    assert convs == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Translate.\nHello"}, {"role": "assistant", "content": "Bonjour"}],
        [{"role": "system", "content": "Be warm."}, {"role": "user", "content": "Greet."}, {"role": "assistant", "content": "Hi"}],
    ]
    dm.setup("fit")
    assert dm.summary["train"]["kept"] == 2
    # A line without the renamed field: the error names the file, the line, the key and the option.
    bad = write_jsonl(tmp_path / "b.jsonl", [records[0], {"question": "q", "output": "a"}])
    with pytest.raises(DataError, match=f"{bad}:2: no 'answer' \\(the 'output' field of layout 'alpaca'\\).*data.init_args.columns"):
        read_chat_jsonl(bad, dm.layout)


def test_an_empty_system_field_adds_no_system_turn(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "r", "system": ""}])
    assert read_chat_jsonl(path)[0].messages == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]
