"""Chat templates by name, for tokenizers that ship none.

A pretrained (not instruction-tuned) model's tokenizer usually has no chat template (Gemma 3 270M's
has none), yet fine-tuning it on conversations needs one: the data pipeline renders each conversation
with it and supervises the assistant turns it finds. ``data.init_args.chat_template`` (and
``model.init_args.chat_template``) take either a Jinja template or one of the names of
:data:`NAMED_TEMPLATES`:

- ``chatml``: ``<|im_start|>role`` ... ``<|im_end|>`` turns (SmolLM2, Qwen), no default system prompt.
- ``gemma``: Gemma's ``<start_of_turn>user`` / ``<start_of_turn>model`` ... ``<end_of_turn>`` turns, with
  the ``<bos>`` token first. Gemma has no system role: a system message becomes the opening paragraph of
  the first user turn, as the instruction-tuned Gemma models' own template does.

Both are prefix-stable (rendering the first turns of a conversation gives a prefix of the whole one),
which is how :func:`eaft_pl.data.chat.assistant_char_spans` locates the assistant's tokens; an assistant
turn's supervised text is its content and the end-of-turn marker, so the model learns to stop.
"""

from __future__ import annotations

from typing import Dict, Optional

__all__ = ["CHATML_TEMPLATE", "GEMMA_TEMPLATE", "NAMED_TEMPLATES", "resolve_chat_template"]

# The Jinja strings below hold real newlines ("\n" in Python), which the templates write between turns.

#: ChatML, minus the default system prompt some models' copies add.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Gemma's turn format. The assistant's role is written ``model``; a leading system message is folded
#: into the first user turn (followed by a blank line); ``bos_token`` is written when the tokenizer has one.
GEMMA_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if loop.first and system is not none %}{{ system + '\n\n' }}{% endif %}"
    "{{ message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

#: The names ``chat_template`` options accept in place of a Jinja template.
NAMED_TEMPLATES: Dict[str, str] = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE}


def resolve_chat_template(value: Optional[str], key: str) -> Optional[str]:
    """The Jinja template a ``chat_template`` option stands for: a name of :data:`NAMED_TEMPLATES`, a
    Jinja template (anything with ``{{`` or ``{%``) as given, or None (the tokenizer's own).

    Args:
        value: The option's value.
        key: The option's config key, named in the error (``data.init_args.chat_template``).

    Raises:
        ValueError: ``value`` is neither a known name nor a Jinja template (a misspelt name would
            otherwise be rendered literally, as the same text for every conversation).
    """
    if value is None:
        return None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(
        f"{key}: {value!r} is neither a template name ({', '.join(sorted(NAMED_TEMPLATES))}) nor a Jinja template; "
        "give one of the names or the template's text"
    )
