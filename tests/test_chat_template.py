"""The module's own tokenizer (the one the forgetting callback's tasks render prompts with) gets the
chat template the training data was rendered with, for a tokenizer that ships none (Gemma 3 270M)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from conftest import TINY_LLAMA
from eaft_pl import EAFTModule
from eaft_pl.evaluation.forgetting import ForgettingCallback
from eaft_pl.evaluation.tasks import GenerationTask, chat_prompt_ids
from eaft_pl.models.char_tokenizer import CHATML_TEMPLATE, build_char_tokenizer
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
