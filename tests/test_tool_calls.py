"""Conversations with tools, tool calls and reasoning: the template renders them, the assistant's
calls and reasoning are supervised, tool outputs and the tool list are not, and malformed ones are
refused with the message's location."""

import pytest

from eaft_pl.data import Conversation, DataError, encode_conversation
from test_data import supervised_segments

# A Qwen-like template reduced to what matters here: tools listed in the system turn, reasoning in
# <think> tags, calls as JSON in <tool_call> tags, tool outputs in a user-side turn.
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nTools:' }}"
    "{% for t in tools %}{{ ' ' + t['function']['name'] }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% if m.get('reasoning_content') %}{{ '<think>' + m['reasoning_content'] + '</think>' }}{% endif %}"
    "{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}"
    "{{ '<tool_call>' + c['function']['name'] + '(' + (c['function']['arguments'] | tojson) + ')</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|im_start|>tool\n' + m['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]

AGENTIC = [
    {"role": "user", "content": "2+3?"},
    {
        "role": "assistant",
        "content": None,  # a turn that only calls a tool
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
    },
    {"role": "tool", "content": "5", "tool_call_id": "call_0"},
    {"role": "assistant", "content": "5", "reasoning_content": "the tool said 5"},
]


def test_tool_calls_and_reasoning_are_supervised_tool_outputs_are_not(char_tokenizer):
    conv = Conversation(AGENTIC, "agent.jsonl:1", tools=TOOLS)
    ex = encode_conversation(char_tokenizer, conv, max_length=1024, chat_template=TOOL_TEMPLATE)
    text = char_tokenizer.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\nTools: add<|im_end|>\n")  # the tools reached the template
    assert supervised_segments(char_tokenizer, ex) == [
        '<tool_call>add({"a": 2, "b": 3})</tool_call><|im_end|>\n',
        "<think>the tool said 5</think>5<|im_end|>\n",
    ]


def test_without_tools_the_template_gets_none(char_tokenizer):
    conv = Conversation(AGENTIC, "agent.jsonl:1")
    ex = encode_conversation(char_tokenizer, conv, max_length=1024, chat_template=TOOL_TEMPLATE)
    assert not char_tokenizer.decode(ex.input_ids).startswith("<|im_start|>system")


@pytest.mark.parametrize(
    "message, expected",
    [
        ({"role": "assistant", "content": "x", "weight": 0}, r"messages\[1\]: unknown key\(s\) \['weight'\]"),
        ({"role": "user", "content": "x", "tool_calls": []}, r"messages\[1\]: unknown key\(s\) \['tool_calls'\]"),
        ({"role": "assistant", "content": None}, r"messages\[1\]: 'content' must be a string"),
        ({"role": "assistant", "content": "", "tool_calls": []}, r"messages\[1\]: 'tool_calls' must be a non-empty list"),
        ({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}, r"tool_calls\[0\] needs"),
        ({"role": "assistant", "content": "x", "reasoning_content": 3}, r"'reasoning_content' must be a string"),
    ],
)
def test_malformed_tool_messages_name_the_message(char_tokenizer, message, expected):
    conv = Conversation([{"role": "user", "content": "q"}, message], "agent.jsonl:7")
    with pytest.raises(DataError, match="agent.jsonl:7: " + expected if expected.startswith("messages") else expected):
        encode_conversation(char_tokenizer, conv, max_length=256, chat_template=TOOL_TEMPLATE)


def test_template_dropping_earlier_reasoning_is_refused_with_advice(char_tokenizer):
    # Qwen3's templates keep only the last turn's reasoning: rendering the conversation up to the first
    # answer then differs from the start of the whole conversation.
    drops = TOOL_TEMPLATE.replace("{% if m.get('reasoning_content') %}", "{% if m.get('reasoning_content') and loop.last %}")
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "r1"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "reasoning_content": "r2"},
    ]
    with pytest.raises(DataError, match="not prefix-stable at message 1.*reasoning"):
        encode_conversation(char_tokenizer, Conversation(messages, "m.jsonl:2"), 512, chat_template=drops)


def test_keys_a_columnar_dataset_fills_with_none_are_absent(char_tokenizer):
    # Arrow gives every message of a column every key, None where a message lacks it.
    messages = [
        {"role": "user", "content": "2+3?", "tool_calls": None, "reasoning_content": None, "tool_call_id": None},
        {"role": "assistant", "content": "5", "tool_calls": None, "reasoning_content": None, "tool_call_id": None},
    ]
    plain = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]
    got = encode_conversation(char_tokenizer, Conversation(messages), 256, chat_template=TOOL_TEMPLATE)
    want = encode_conversation(char_tokenizer, Conversation(plain), 256, chat_template=TOOL_TEMPLATE)
    assert (got.input_ids, got.labels) == (want.input_ids, want.labels)


def test_records_carry_tools_and_reasoning_through_the_layouts(tmp_path, char_tokenizer):
    import json

    from eaft_pl.data import ChatJsonlDataModule
    from eaft_pl.data.layouts import RecordLayout

    # tools and messages as JSON strings (how datasets with irregular nesting store them)
    record = {"messages": json.dumps(AGENTIC), "tools": json.dumps(TOOLS)}
    conv = RecordLayout().to_conversation(record, "r:1")
    assert conv.tools == TOOLS and conv.messages == AGENTIC
    ex = encode_conversation(char_tokenizer, conv, 1024, chat_template=TOOL_TEMPLATE)
    direct = encode_conversation(char_tokenizer, Conversation(AGENTIC, tools=TOOLS), 1024, chat_template=TOOL_TEMPLATE)
    assert ex.input_ids == direct.input_ids and ex.labels == direct.labels

    # a reasoning column becomes the answer's reasoning_content (supervised, inside the template's tags)
    layout = RecordLayout("prompt_response", columns={"prompt": "Question", "reasoning": "Complex_CoT", "response": "Response"})
    conv = layout.to_conversation({"Question": "q", "Complex_CoT": "think", "Response": "a"}, "r:2")
    assert conv.messages[-1] == {"role": "assistant", "content": "a", "reasoning_content": "think"}
    ex = encode_conversation(char_tokenizer, conv, 256, chat_template=TOOL_TEMPLATE)
    assert supervised_segments(char_tokenizer, ex) == ["<think>think</think>a<|im_end|>\n"]

    with pytest.raises(DataError, match=r"r:3: 'tools' must be a list"):
        RecordLayout().to_conversation({"messages": AGENTIC, "tools": {"name": "add"}}, "r:3")
    with pytest.raises(DataError, match=r"r:4: 'messages' is a string but not valid JSON"):
        RecordLayout().to_conversation({"messages": "[{"}, "r:4")

    # and through a DataModule, end to end
    path = tmp_path / "agent.jsonl"
    path.write_text(json.dumps({"messages": AGENTIC, "tools": TOOLS}) + "\n")
    tok_dir = tmp_path / "tok"
    char_tokenizer.save_pretrained(tok_dir)
    dm = ChatJsonlDataModule(train_file=str(path), tokenizer_name_or_path=str(tok_dir), chat_template=TOOL_TEMPLATE, max_length=1024)
    dm.setup("fit")
    assert dm.datasets["train"][0].input_ids == direct.input_ids
