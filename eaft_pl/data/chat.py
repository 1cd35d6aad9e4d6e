"""Chat conversations -> token ids and labels that supervise only the assistant's tokens.

The assistant spans are found by rendering growing prefixes of the conversation with the chat
template, not from ``{% generation %}`` markers, because many real templates (Qwen's among them)
have none: for the assistant turn ``i``, the text of ``messages[:i]`` with the generation prompt is
where the answer starts and the text of ``messages[:i+1]`` is where it ends (end-of-turn token
included, as the reference trainers do). Character spans are mapped to tokens with the fast
tokenizer's offsets; a token is supervised when it starts inside a span.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from eaft_pl.loss.stats import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")

__all__ = [
    "DataError",
    "Conversation",
    "EncodedExample",
    "ExampleStats",
    "validate_messages",
    "did_you_mean",
    "assistant_char_spans",
    "encode_conversation",
    "batch_to",
    "collate",
    "padded_batch",
    "pad_token_id",
    "special_token_ids",
    "end_of_turn_ids",
]


class DataError(ValueError):
    """Bad input data; the message names the source (file and line) and what to do."""


@dataclass
class Conversation:
    """One training example.

    Attributes:
        messages: ``[{"role": ..., "content": ...}, ...]`` with roles among system/user/assistant/tool.
        source: Where it came from (``file:line``), used in every error message.
    """

    messages: List[Dict[str, Any]]
    source: str = "<memory>"
    #: Tool (function) definitions in the OpenAI layout, given to the chat template as ``tools`` (it
    #: renders them, usually into the system turn); None for a conversation without tools.
    tools: Optional[List[Dict[str, Any]]] = None


class ExampleStats(NamedTuple):
    """What the split summary counts of one encoded example."""

    source: str
    tokens: int
    supervised: int
    truncated: bool


@dataclass
class EncodedExample:
    """A tokenised conversation: ``labels`` equal ``input_ids`` on assistant tokens, else -100."""

    input_ids: List[int]
    labels: List[int]
    source: str = "<memory>"
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        """Tokens the loss uses: labels are shifted by one, so position 0 never counts."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)

    @property
    def stats(self) -> ExampleStats:
        return ExampleStats(self.source, len(self.input_ids), self.num_supervised, self.truncated)


def did_you_mean(given: str, known: Sequence[str], cutoff: float = 0.75) -> str:
    """``"; did you mean 'x'?"`` when ``given`` is a near miss of one of ``known`` (a misspelled key or
    role), else ``""``: a hint for an error message, from :func:`difflib.get_close_matches`."""
    match = difflib.get_close_matches(str(given), list(known), n=1, cutoff=cutoff)
    return f"; did you mean {match[0]!r}?" if match else ""


#: Keys a message may carry besides ``role`` and ``content``, by role: what chat templates of tool-using
#: and reasoning models read (Qwen3, Llama 3.1+, Mistral, GLM-4). Anything else is refused, not dropped.
OPTIONAL_KEYS = {
    "assistant": ("reasoning_content", "tool_calls", "name"),
    "tool": ("tool_call_id", "name"),
    "user": ("name",),
    "system": ("name",),
}


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: 'tool_calls' must be a non-empty list of {{'function': {{'name', 'arguments'}}}} objects")
    for k, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
            raise DataError(
                f"{where}: tool_calls[{k}] needs a function 'name' (a string) and 'arguments' (an object or a JSON "
                "string), in the OpenAI layout {'type': 'function', 'function': {'name', 'arguments'}}"
            )


def validate_messages(messages: Any, source: str) -> List[Dict[str, Any]]:
    """Check the structure of a conversation and return it as a list of message dicts.

    A message has ``role`` and ``content``; an assistant turn may also carry ``reasoning_content``
    and ``tool_calls`` (then its content may be empty or null), a tool turn ``tool_call_id`` and
    ``name`` (see :data:`OPTIONAL_KEYS`). They are passed to the chat template, which decides how to
    render them.

    Raises:
        DataError: not a non-empty list of ``{"role", "content"}`` objects, an unknown role or key, an
            assistant turn before any prompt, an empty assistant turn, or no assistant turn.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for j, m in enumerate(messages):
        where = f"{source}: messages[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{where} must be an object with 'role' and 'content', got {type(m).__name__}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            hints = "".join(did_you_mean(k, missing) for k in m if k not in ("role", "content"))
            raise DataError(f"{where} lacks {missing} (has {sorted(m)}); every message needs 'role' and 'content'{hints}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}: unknown role {role!r}; use one of {list(ROLES)}{did_you_mean(role, ROLES)}")
        allowed = OPTIONAL_KEYS[role]
        # Columnar datasets give every message every key seen in the column, None where absent.
        unknown = sorted(k for k in set(m) - {"role", "content", *allowed} if m[k] is not None)
        if unknown:
            raise DataError(
                f"{where}: unknown key(s) {unknown} on a {role} message; it may carry 'role', 'content'"
                + (f" and {list(allowed)}" if allowed else "")
                + " (rename or remove the others: eaft-pl does not drop data silently)"
                + "".join(did_you_mean(k, ("role", "content", *allowed)) for k in unknown)
            )
        calls = m.get("tool_calls")
        if calls is not None:
            _check_tool_calls(calls, where)
        if content is None and calls is not None:
            content = ""  # an assistant turn that only calls tools
        if not isinstance(content, str):
            raise DataError(f"{where}: 'content' must be a string, got {type(content).__name__}")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f"{where}: 'reasoning_content' must be a string, got {type(reasoning).__name__}")
        if role == "assistant" and not content.strip() and not calls:
            raise DataError(f"{where}: empty assistant turn; remove the example or fill in the answer")
        message = {"role": role, "content": content}
        message.update({k: m[k] for k in allowed if m.get(k) is not None})
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{source}: no assistant turn, so nothing to train on; add one or remove the example")
    first = next(m["role"] for m in out if m["role"] != "system")
    if first == "assistant":
        raise DataError(f"{source}: the first non-system message is an assistant turn; a prompt must come first")
    return out


def _render(
    tokenizer: Any,
    messages: Sequence[Dict[str, Any]],
    generation_prompt: bool,
    template: Optional[str],
    source: str,
    tools: Optional[List[Dict[str, Any]]] = None,
) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            list(messages), tools=tools, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )
    except TemplateError as e:  # e.g. "roles must alternate user/assistant"
        raise DataError(f"{source}: the chat template refused this conversation: {e}") from None


def assistant_char_spans(
    tokenizer: Any,
    messages: Sequence[Dict[str, Any]],
    chat_template: Optional[str] = None,
    source: str = "<memory>",
    tools: Optional[List[Dict[str, Any]]] = None,
) -> Tuple[str, List[Tuple[int, int]]]:
    """Render a conversation (with its ``tools``, if any) and return its text and the ``[start, end)``
    character span of every assistant turn: its reasoning and tool calls are supervised too, as the
    template renders them.

    Raises:
        DataError: the template is not prefix-stable (rendering a prefix of the conversation does
            not give a prefix of the full text), so assistant spans cannot be located.
    """
    text = _render(tokenizer, messages, False, chat_template, source, tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], True, chat_template, source, tools)
        end_text = _render(tokenizer, messages[: i + 1], False, chat_template, source, tools)
        if not (end_text.startswith(start_text) and text.startswith(end_text)):
            raise DataError(
                f"{source}: the chat template is not prefix-stable at message {i} (rendering the "
                "conversation up to a turn does not give a prefix of the whole conversation), so the "
                "assistant tokens cannot be located; pass a template that renders earlier turns "
                "unchanged as data.init_args.chat_template"
                + (
                    " (templates that keep only the last turn's reasoning, as Qwen3's do, change earlier "
                    "turns: split multi-turn conversations with reasoning_content into one example per "
                    "assistant turn, or drop the earlier turns' reasoning)"
                    if any("reasoning_content" in m for m in messages[: i + 1])
                    else ""
                )
            )
        spans.append((len(start_text), len(end_text)))
    return text, spans


def encode_conversation(
    tokenizer: Any,
    conversation: Conversation,
    max_length: int,
    chat_template: Optional[str] = None,
) -> EncodedExample:
    """Render, tokenise and mask a conversation; truncate it on the right to ``max_length`` tokens."""
    messages = validate_messages(conversation.messages, conversation.source)
    text, spans = assistant_char_spans(tokenizer, messages, chat_template, conversation.source, conversation.tools)
    # The template writes BOS and other special tokens itself; adding them again would duplicate them.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: List[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for j, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(s <= start < e for s, e in spans):
            labels[j] = input_ids[j]
    truncated = len(input_ids) > max_length
    return EncodedExample(input_ids[:max_length], labels[:max_length], conversation.source, truncated)


def pad_token_id(tokenizer: Any) -> int:
    """The id that fills padding: the tokenizer's pad token, else its end of sequence, else 0. It only
    fills positions that attention and the loss ignore, so any valid id works."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def special_token_ids(tokenizer: Any) -> Set[int]:
    """The tokenizer's special tokens: those with a named role (eos, pad, ...) and the added tokens
    flagged special, as chat markers (``<|im_end|>``, ``<end_of_turn>``) often are without a role."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return special | {i for i, token in added.items() if getattr(token, "special", False)}


def end_of_turn_ids(tokenizer: Any) -> List[int]:
    """The tokens that end a generated answer: eos, and the special tokens the chat template writes
    right after an assistant turn's content (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``).

    The turn's end is not always eos: Gemma's is ``<end_of_turn>`` while its eos is ``<eos>``, so a model
    stopped at eos alone would run on into a new turn it invents. The template is asked by rendering a
    one-exchange conversation with and without the answer."""
    ids = {tokenizer.eos_token_id} - {None}
    if getattr(tokenizer, "chat_template", None):
        question = [{"role": "user", "content": "?"}]
        prompt = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(question + [{"role": "assistant", "content": "!"}], tokenize=False)
        if full.startswith(prompt + "!"):  # prefix-stable, as the training data's templates must be
            after = tokenizer(full[len(prompt) + 1 :], add_special_tokens=False)["input_ids"]
            ids |= set(after) & special_token_ids(tokenizer)
    return sorted(ids)


def padded_batch(lengths: Sequence[int], pad_token_id: int, pad_to_multiple_of: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Empty ``(B, T)`` input ids (all ``pad_token_id``) and labels (all -100) for rows of ``lengths``
    tokens: T is the longest, rounded up to a multiple of ``pad_to_multiple_of``."""
    length = max(lengths)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(lengths), length)
    return torch.full(shape, pad_token_id, dtype=torch.long), torch.full(shape, IGNORE_INDEX, dtype=torch.long)


def batch_to(batch: Dict[str, Any], device: Any) -> Dict[str, Any]:
    """A collated batch on ``device``: its tensors moved, its other entries (``sources``) as they are."""
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def collate(
    examples: Sequence[EncodedExample], pad_token_id: int, pad_to_multiple_of: Optional[int] = None
) -> Dict[str, Any]:
    """Right-pad a list of examples to the longest one (dynamic padding).

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, T)`` long tensors, and
    ``sources``, each row's ``file:line`` (errors about a batch name its examples).
    """
    input_ids, labels = padded_batch([len(e.input_ids) for e in examples], pad_token_id, pad_to_multiple_of)
    attention_mask = torch.zeros_like(input_ids)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "sources": [e.source for e in examples]}


@dataclass
class SplitSummary:
    """What encoding a split did: counts a user should see before trusting a run."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_supervised_tokens: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    dropped_sources: List[str] = field(default_factory=list)

    def add(self, example: ExampleStats) -> bool:
        """Count one example; return whether it is kept (it has a supervised token)."""
        self.examples += 1
        self.truncated += example.truncated
        self.tokens += example.tokens
        if example.supervised == 0:
            self.dropped_no_supervised_tokens += 1
            self.dropped_sources.append(example.source)
            return False
        self.supervised_tokens += example.supervised
        self.kept += 1
        return True

    def as_dict(self) -> Dict[str, Any]:
        d = dict(vars(self))
        d["dropped_sources"] = self.dropped_sources[:20]  # enough to find them, not a dump
        return d
