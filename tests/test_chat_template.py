"""The module's own tokenizer (the one the forgetting callback's tasks render prompts with) gets the
chat template the training data was rendered with, for a tokenizer that ships none (Gemma 3 270M)."""

from __future__ import annotations

from itertools import groupby

import lightning.pytorch as pl
import pytest
import torch

from conftest import TINY_LLAMA
from eaft_pl import EAFTModule
from eaft_pl.evaluation.forgetting import ForgettingCallback
from eaft_pl.evaluation.tasks import GenerationTask, chat_prompt_ids
from eaft_pl.models.char_tokenizer import CHATML_TEMPLATE, build_char_tokenizer
from eaft_pl.models.templates import GEMMA_TEMPLATE, NAMED_TEMPLATES, resolve_chat_template
from scale_fit import InOrderData, write_records

#: A template unlike ChatML, so a test can tell which one rendered a prompt.
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"


@pytest.fixture(scope="module")
def bare_tokenizer_dir(tmp_path_factory):
    """A tiny character tokenizer saved without any chat template, like Gemma 3 270M's."""
    path = tmp_path_factory.mktemp("bare_tokenizer")
    build_char_tokenizer(chat_template=None).save_pretrained(path)
    return str(path)


class Data(InOrderData):
    """The training chats, plus one generation task that renders its prompt by the chat template."""

    def evaluation_suites(self):
        return {"general": [GenerationTask("echo", [{"prompt": "hi", "references": ["x"], "answer": "x", "distractors": []}], max_new_tokens=2)]}


def _fit(tmp_path, tokenizer_dir: str, data_template, module_template=None) -> tuple:
    pl.seed_everything(0)
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=tokenizer_dir, chat_template=module_template)
    data = Data(train_file=str(write_records(tmp_path / "train.jsonl")), tokenizer_name_or_path=tokenizer_dir,
                batch_size=4, chat_template=data_template)  # fmt: skip
    forgetting = ForgettingCallback(every_n_steps=0, batch_size=2)
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", callbacks=[forgetting],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module, forgetting


def test_the_datamodule_template_reaches_the_module_tokenizer_and_the_forgetting_tasks(tmp_path, bare_tokenizer_dir):
    module, forgetting = _fit(tmp_path, bare_tokenizer_dir, data_template=PLAIN_TEMPLATE)
    assert module.tokenizer.chat_template == PLAIN_TEMPLATE
    # the task's prompt is rendered by the DataModule's template, as the training data was
    assert chat_prompt_ids(module.tokenizer, "hi") == module.tokenizer("user: hi\nassistant: ", add_special_tokens=False)["input_ids"]
    assert [h["step"] for h in forgetting.history] == [0, 1]
    assert set(forgetting.history[0]["scores"]["general"]["echo"]) == {"exact", "content"}


def test_the_datamodule_template_replaces_the_tokenizer_own(tmp_path, tokenizer_dir):
    module, _ = _fit(tmp_path, str(tokenizer_dir), data_template=PLAIN_TEMPLATE)  # the tokenizer ships ChatML
    assert module.tokenizer.chat_template == PLAIN_TEMPLATE


def test_without_any_template_the_tokenizer_keeps_its_own(tmp_path, tokenizer_dir):
    module, _ = _fit(tmp_path, str(tokenizer_dir), data_template=None)
    assert module.tokenizer.chat_template == CHATML_TEMPLATE


def test_the_module_option_serves_outside_a_trainer(bare_tokenizer_dir):
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=bare_tokenizer_dir, chat_template=PLAIN_TEMPLATE)
    module.configure_model()  # as eaft-pl export does: no trainer, no DataModule
    assert module.tokenizer.chat_template == PLAIN_TEMPLATE


def test_a_tokenizer_without_a_template_names_the_option_that_gives_one(bare_tokenizer_dir):
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=bare_tokenizer_dir)
    module.configure_model()
    with pytest.raises(ValueError, match=r"has no chat template.*data\.init_args\.chat_template"):
        chat_prompt_ids(module.tokenizer, "hi")


def test_different_module_and_datamodule_templates_are_refused(tmp_path, bare_tokenizer_dir):
    with pytest.raises(ValueError, match="model.init_args.chat_template and data.init_args.chat_template differ"):
        _fit(tmp_path, bare_tokenizer_dir, data_template=PLAIN_TEMPLATE, module_template=CHATML_TEMPLATE)


# ---- built-in templates by name ------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6"},
]


def _gemma_tokenizer():
    tok = build_char_tokenizer(chat_template=GEMMA_TEMPLATE)
    tok.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tok


def test_the_gemma_template_writes_gemma_turns_with_the_system_message_in_the_first_user_turn():
    text = _gemma_tokenizer().apply_chat_template(CHAT, tokenize=False)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nand 3+3?<end_of_turn>\n<start_of_turn>model\n6<end_of_turn>\n"
    )
    prompt = _gemma_tokenizer().apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"  # no system: no blank line
    # a tokenizer without a BOS token (the character tokenizer's own) gets none, not the text "None"
    assert build_char_tokenizer(GEMMA_TEMPLATE).apply_chat_template(CHAT[1:3], tokenize=False).startswith("<start_of_turn>user")


def test_the_gemma_template_supervises_each_answer_and_its_end_of_turn():
    from eaft_pl.data.chat import Conversation, encode_conversation

    tok = _gemma_tokenizer()
    example = encode_conversation(tok, Conversation(CHAT, "chat.jsonl:1"), max_length=512)
    supervised = [i for i, label in enumerate(example.labels) if label != -100]
    runs = [[i for _, i in run] for _, run in groupby(enumerate(supervised), lambda pair: pair[1] - pair[0])]  # contiguous
    # both assistant turns (prefix-stable: no DataError), each from its first token to the newline after <end_of_turn>
    assert [tok.decode([example.input_ids[i] for i in run]) for run in runs] == ["4<end_of_turn>\n", "6<end_of_turn>\n"]


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_a_template_name_stands_for_its_template_in_the_datamodule_and_the_module(tmp_path, bare_tokenizer_dir, name):
    module, _ = _fit(tmp_path, bare_tokenizer_dir, data_template=name, module_template=name)
    assert module.tokenizer.chat_template == NAMED_TEMPLATES[name]
    assert module.hparams.chat_template == name  # the config keeps the readable name


def test_an_unknown_template_name_is_refused_with_the_names_and_the_key(bare_tokenizer_dir):
    with pytest.raises(ValueError, match=r"model\.init_args\.chat_template: 'gema' is neither a template name \(chatml, gemma\)"):
        EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=bare_tokenizer_dir, chat_template="gema")
    with pytest.raises(ValueError, match=r"data\.init_args\.chat_template: 'gema'"):
        Data(train_file="unused.jsonl", tokenizer_name_or_path=bare_tokenizer_dir, chat_template="gema")
    assert resolve_chat_template(PLAIN_TEMPLATE, "k") == PLAIN_TEMPLATE and resolve_chat_template(None, "k") is None


class _Scripted(torch.nn.Module):
    """Stands in for a model whose greedy answer is fixed: what ``generate`` returns after the prompt."""

    def __init__(self, answer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answer, self.stops = answer, None

    def generate(self, input_ids, eos_token_id, **_):
        self.stops = eos_token_id
        return torch.cat([input_ids, torch.tensor([self.answer] * len(input_ids))], dim=1)


def test_generation_stops_at_the_templates_end_of_turn_not_only_at_eos():
    from eaft_pl.data.chat import end_of_turn_ids
    from eaft_pl.evaluation.tasks import decode_answer, greedy_answers

    tok = _gemma_tokenizer()
    end, eos = tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id
    assert end_of_turn_ids(tok) == sorted({eos, end})  # Gemma's turn ends with <end_of_turn>, not its eos
    assert end_of_turn_ids(build_char_tokenizer()) == [eos]  # ChatML's end of turn is this tokenizer's eos
    # a model that ends its turn, then runs on into a turn of its own, as a fine-tuned Gemma does
    ids = tok("42", add_special_tokens=False)["input_ids"]
    model = _Scripted(ids + [end] + tok("\nuser: more", add_special_tokens=False)["input_ids"])
    (answer,) = greedy_answers(model, tok, ["6*7?"], max_new_tokens=16)
    assert model.stops == sorted({eos, end}) and answer == ids + [end]
    assert decode_answer(tok, model.answer) == "42"
