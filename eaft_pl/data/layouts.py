"""Raw records (a JSON line, a dataset row) -> chat messages, for the common SFT layouts.

This is the one place that knows record layouts; the JSONL and the Hugging Face DataModules both go
through :class:`RecordLayout`. The messages it returns are checked (roles, empty turns) later by
:func:`eaft_pl.data.chat.validate_messages`, with the same ``source`` in every error.

Layouts and the fields each reads (rename them with ``columns``):

- ``messages``: ``messages``, a list of ``{"role", "content"}`` (OpenAI style, with assistant
  ``tool_calls``/``reasoning_content`` and ``tool`` turns when present); optional ``tools``.
- ``sharegpt``: ``conversations``, a list of ``{"from", "value"}``; optional ``system`` and ``tools``.
- ``alpaca``: ``instruction`` and ``output``; optional ``input`` (appended to the instruction after
  a newline, as LLaMA-Factory does), ``system`` and ``reasoning``.
- ``prompt_response``: ``prompt`` and ``response``; optional ``system`` and ``reasoning``.

``tools`` (the functions a conversation may call, OpenAI layout) goes to the chat template;
``reasoning`` (a reasoning chain, e.g. distilled from a thinking model) becomes the answer's
``reasoning_content``, which thinking models' templates render in ``<think>`` tags. ``messages``
and ``tools`` may also be JSON strings, as datasets with irregular nesting often store them.

A missing or ``null`` field counts as absent, and so does an empty ``system`` string (no system turn).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple, get_args

from eaft_pl.data.chat import Conversation, DataError, did_you_mean

__all__ = ["LAYOUTS", "LAYOUT_FIELDS", "LayoutName", "SHAREGPT_ROLES", "RecordLayout"]

#: Per layout: (required fields, optional fields). Auto-detection tries the layouts in this order.
LAYOUT_FIELDS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "messages": (("messages",), ("tools",)),
    "sharegpt": (("conversations",), ("system", "tools")),
    "alpaca": (("instruction", "output"), ("input", "system", "reasoning")),
    "prompt_response": (("prompt", "response"), ("system", "reasoning")),
}
#: The ``layout`` option's values (a Literal, so ``--help`` lists them).
LayoutName = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_response"]
LAYOUTS: Tuple[str, ...] = get_args(LayoutName)

#: ShareGPT speaker -> chat role. ``function_call`` is the model's own tool call, so it is an
#: assistant turn (supervised); ``observation`` is what the tool returned, so it is a tool turn.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}

_WHAT = {
    "messages": "'messages' (a list of role/content objects)",
    "sharegpt": "'conversations' (ShareGPT from/value turns)",
    "alpaca": "'instruction' and 'output' (Alpaca)",
    "prompt_response": "'prompt' and 'response'",
}


def _present(record: Mapping[str, Any], key: str) -> bool:
    # Columnar datasets fill the fields a row lacks with None: treat those as absent.
    return record.get(key) is not None


def _string(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _json_list(value: Any, key: str, source: str) -> Any:
    """A list field that may arrive as a JSON string; anything else is left for the later checks."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: '{key}' is a string but not valid JSON ({e.msg} at column {e.colno})") from None


class RecordLayout:
    """How to read a record: its layout, renamed fields and a default system prompt.

    Args:
        layout: ``auto`` (detect per record from the fields present), ``messages``, ``sharegpt``,
            ``alpaca`` or ``prompt_response``.
        columns: Field -> the record's key for it, e.g. ``{"prompt": "question", "response":
            "answer"}``; fields not named keep their own name.
        system_prompt: Prepended as a system turn to every conversation that has none.
        option_prefix: Prefix of the config keys named in errors.
    """

    def __init__(
        self,
        layout: str = "auto",
        columns: Optional[Mapping[str, str]] = None,
        system_prompt: Optional[str] = None,
        option_prefix: str = "data.init_args.",
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"{option_prefix}layout: unknown layout {layout!r}; use one of {list(LAYOUTS)}")
        columns = dict(columns or {})
        known = self._fields(layout)
        for field, key in columns.items():
            if field not in known:
                raise ValueError(
                    f"{option_prefix}columns: {field!r} is not a field of layout {layout!r} (its fields: "
                    f"{sorted(known)}); map a field to your key, e.g. {{'prompt': 'question'}}"
                )
            if not isinstance(key, str) or not key:
                raise ValueError(f"{option_prefix}columns.{field}: expected the name of a key, got {key!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"{option_prefix}system_prompt must be a string, got {type(system_prompt).__name__}")
        self.layout = layout
        self.columns = columns
        self.system_prompt = system_prompt
        self.option_prefix = option_prefix

    @staticmethod
    def _fields(layout: str) -> set:
        names = LAYOUT_FIELDS if layout == "auto" else [layout]
        return {f for name in names for group in LAYOUT_FIELDS[name] for f in group}

    def key(self, field: str) -> str:
        """The record's key for ``field``."""
        return self.columns.get(field, field)

    def describe(self) -> str:
        """A stable text of the options, for cache fingerprints."""
        return json.dumps([self.layout, sorted(self.columns.items()), self.system_prompt])

    def detect(self, record: Mapping[str, Any], source: str) -> str:
        """The first layout whose required fields the record has."""
        for name, (required, _) in LAYOUT_FIELDS.items():
            if all(_present(record, self.key(f)) for f in required):
                return name
        renamed = f" (after renaming with columns {self.columns})" if self.columns else ""
        fields = sorted({self.key(f) for name in LAYOUT_FIELDS for group in LAYOUT_FIELDS[name] for f in group})
        hints = "".join(did_you_mean(k, [f for f in fields if f not in record]) for k in record)
        raise DataError(
            f"{source}: found keys {sorted(record)}, expected "
            + ", ".join(_WHAT[n] for n in LAYOUT_FIELDS)
            + f"{renamed}; map your keys with {self.option_prefix}columns, or set {self.option_prefix}layout{hints}"
        )

    def _check_near_misses(self, record: Mapping[str, Any], layout: str, source: str) -> None:
        """Refuse a key the layout does not read that is a near miss of one it reads but did not find
        (``sytem``): ignoring it would silently drop that field. Other extra keys (ids, tags) are fine."""
        read = [self.key(f) for group in LAYOUT_FIELDS[layout] for f in group]
        absent = [k for k in read if not _present(record, k)]
        for key in record:
            hint = did_you_mean(key, absent, cutoff=0.85) if key not in read else ""
            if hint:
                raise DataError(
                    f"{source}: key {key!r} is not read by layout '{layout}'{hint} Rename it (or map it with "
                    f"{self.option_prefix}columns), or remove it if it is data of yours"
                )

    def to_conversation(self, record: Any, source: str) -> Conversation:
        """Turn one record into a :class:`Conversation`: its messages and, if the record has them,
        its ``tools`` (checked later by ``validate_messages`` and the chat template).

        Raises:
            DataError: as :meth:`to_messages`, or ``tools`` is not a list of objects.
        """
        messages, values = self._convert(record, source)
        tools = _json_list(values.get("tools"), self.key("tools"), source)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
            raise DataError(f"{source}: '{self.key('tools')}' must be a list of tool (function) definitions")
        return Conversation(messages, source, tools or None)

    def to_messages(self, record: Any, source: str) -> Any:
        """Turn one record into ``[{"role", "content"}, ...]`` (checked later by ``validate_messages``).

        Raises:
            DataError: not a mapping, no layout matches (``auto``), a required field is missing, or
                a field has the wrong type; the message starts with ``source``.
        """
        return self._convert(record, source)[0]

    def _convert(self, record: Any, source: str) -> Tuple[Any, Dict[str, Any]]:
        if not isinstance(record, Mapping):
            raise DataError(f"{source}: expected an object of named fields, got {type(record).__name__}")
        layout = self.layout if self.layout != "auto" else self.detect(record, source)
        required, optional = LAYOUT_FIELDS[layout]
        for field in required:
            if not _present(record, self.key(field)):
                raise DataError(
                    f"{source}: no '{self.key(field)}' (the '{field}' field of layout '{layout}'); found keys "
                    f"{sorted(record)}. Name the right key with {self.option_prefix}columns, e.g. "
                    f"{{'{field}': '<your key>'}}, or choose another {self.option_prefix}layout"
                )
        self._check_near_misses(record, layout, source)
        values = {f: record.get(self.key(f)) for f in (*required, *optional)}
        messages = _CONVERTERS[layout](self, values, source)
        if self.system_prompt is not None and isinstance(messages, list) and not _has_system(messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages, values

    def _system(self, values: Mapping[str, Any], source: str) -> List[Dict[str, str]]:
        system = values.get("system")
        if system is None:
            return []
        system = _string(system, self.key("system"), source)
        return [{"role": "system", "content": system}] if system.strip() else []

    def _messages(self, values: Mapping[str, Any], source: str) -> Any:
        return _json_list(values["messages"], self.key("messages"), source)  # checked in validate_messages

    def _sharegpt(self, values: Mapping[str, Any], source: str) -> List[Dict[str, Any]]:
        turns = values["conversations"]
        key = self.key("conversations")
        if not isinstance(turns, list):
            raise DataError(f"{source}: '{key}' must be a list of {{'from', 'value'}} turns, got {type(turns).__name__}")
        messages = self._system(values, source)
        for j, turn in enumerate(turns):
            where = f"{source}: {key}[{j}]"
            if not isinstance(turn, Mapping) or not _present(turn, "from") or "value" not in turn:
                found = sorted(turn) if isinstance(turn, Mapping) else type(turn).__name__
                raise DataError(
                    f"{where} needs 'from' and 'value' (found {found}); for role/content turns use "
                    f"{self.option_prefix}layout: messages with {self.option_prefix}columns: {{'messages': '{key}'}}"
                )
            speaker = turn["from"]
            if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
                raise DataError(
                    f"{where}: unknown speaker {speaker!r}; ShareGPT speakers map as {SHAREGPT_ROLES}"
                    + did_you_mean(str(speaker), list(SHAREGPT_ROLES))
                )
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
        return messages

    def _alpaca(self, values: Mapping[str, Any], source: str) -> List[Dict[str, str]]:
        prompt = _string(values["instruction"], self.key("instruction"), source)
        extra = values.get("input")
        if extra is not None and _string(extra, self.key("input"), source):
            prompt = f"{prompt}\n{extra}"
        return self._single_turn(values, prompt, _string(values["output"], self.key("output"), source), source)

    def _prompt_response(self, values: Mapping[str, Any], source: str) -> List[Dict[str, str]]:
        prompt = _string(values["prompt"], self.key("prompt"), source)
        return self._single_turn(values, prompt, _string(values["response"], self.key("response"), source), source)

    def _single_turn(self, values: Mapping[str, Any], prompt: str, answer: str, source: str) -> List[Dict[str, str]]:
        reply = {"role": "assistant", "content": answer}
        if values.get("reasoning") is not None:
            reply["reasoning_content"] = _string(values["reasoning"], self.key("reasoning"), source)
        return self._system(values, source) + [{"role": "user", "content": prompt}, reply]


def _has_system(messages: List[Any]) -> bool:
    return any(isinstance(m, Mapping) and m.get("role") == "system" for m in messages)


_CONVERTERS = {
    "messages": RecordLayout._messages,
    "sharegpt": RecordLayout._sharegpt,
    "alpaca": RecordLayout._alpaca,
    "prompt_response": RecordLayout._prompt_response,
}
