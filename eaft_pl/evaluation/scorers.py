"""Scorers for :class:`~eaft_pl.evaluation.tasks.GenerationTask`: how one generated answer is judged.

A scorer is any callable ``scorer(output, item) -> {metric: value}`` (values in [0, 1]); the task
averages each metric over its items. Two are style-agnostic checks of the *content* of an answer, so
that a model is scored on what it answered whatever its house style:

- :class:`FinalNumberScorer`: the final number of a math answer (``#### 42``, ``The answer is 42.``,
  ``\\boxed{42}``, ``42 dollars`` all answer 42), against ``item["answer"]``;
- :class:`ToolCallScorer`: a function call parsed from the output (a ``<tool_call>`` block or a bare
  JSON object), against ``item["call"]``: the name and the arguments, order-insensitive, numbers by
  value.

Both can also report ``style``: whether the output matches a regular expression of a given answer
style (a teacher's final-answer line, say), which shows *how* the model answers apart from *whether*.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Dict, Mapping, Optional

__all__ = [
    "Scorer",
    "FinalNumberScorer",
    "ToolCallScorer",
    "final_number",
    "parse_number",
    "parse_tool_call",
    "same_arguments",
]

#: ``scorer(output, item) -> {metric: value}``: the output is the generated text (whitespace collapsed),
#: the item the task's dict for that prompt.
Scorer = Callable[[str, Mapping[str, Any]], Dict[str, float]]

# A number as people write it: an optional sign and currency sign, thousands grouped by commas
# ("1,250") or not, an optional decimal part. A trailing full stop is the end of a sentence, not a
# decimal point, because the fraction needs a digit after the point.
_NUMBER = re.compile(r"(?<![\w.])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# Phrases after which a model states its answer. The number after the *last* of them is the answer,
# so that numbers the model writes after its answer (units, a check, a follow-up) are not taken.
_ANSWER_MARKER = re.compile(r"####|\\boxed\s*\{|\banswer\s*(?:is\b|:|=)|\bresult\s*(?:is\b|:|=)", re.IGNORECASE)


def parse_number(text: str) -> Optional[Decimal]:
    """The value of a number written as :func:`final_number` finds it (``"$1,250.50"`` -> 1250.50),
    or None if ``text`` is not one."""
    cleaned = text.replace(",", "").replace("$", "")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def final_number(output: str) -> Optional[Decimal]:
    """The final answer of a worked math answer, as a number, or None when it states none.

    The answer is the first number after the last answer marker (``####``, ``\\boxed{``, ``answer
    is``, ``answer:``, ``result is``, ...; case-insensitive) that is followed by a number; without
    such a marker, the last number of the output. Thousands separators and a currency sign are
    ignored (``$1,250`` is 1250); decimals are kept (``42.5`` is not 42, ``42.0`` is).
    """
    numbers = list(_NUMBER.finditer(output))
    if not numbers:
        return None
    for marker in reversed(list(_ANSWER_MARKER.finditer(output))):
        after = next((m for m in numbers if m.start() >= marker.end()), None)
        if after is not None:
            return parse_number(after.group())
    return parse_number(numbers[-1].group())


def _style(pattern: Optional["re.Pattern[str]"], output: str) -> Dict[str, float]:
    return {} if pattern is None else {"style": float(pattern.search(output) is not None)}


def _compile(pattern: Optional[str], owner: str) -> Optional["re.Pattern[str]"]:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{owner}(style_pattern=...): not a regular expression ({e}): {pattern!r}") from None


@dataclass
class FinalNumberScorer:
    """Scores a math answer by its final number (:func:`final_number`) against ``item["answer"]``.

    Metrics: ``accuracy`` (the final number equals the answer by value), ``answered`` (the output
    states a number at all) and, with ``style_pattern``, ``style`` (the output matches it).

    Args:
        style_pattern: A regular expression of an answer style to report as ``style`` (searched, not
            matched at the start); None reports no ``style``.
    """

    style_pattern: Optional[str] = None

    def __post_init__(self) -> None:
        self._pattern = _compile(self.style_pattern, type(self).__name__)

    def __call__(self, output: str, item: Mapping[str, Any]) -> Dict[str, float]:
        if "answer" not in item:
            raise KeyError(f"FinalNumberScorer needs an 'answer' (a number) in every item, got keys {sorted(item)}")
        expected = parse_number(str(item["answer"]))
        if expected is None:
            raise ValueError(f"FinalNumberScorer: item['answer'] must be a number, got {item['answer']!r}")
        found = final_number(output)
        return {"accuracy": float(found == expected), "answered": float(found is not None), **_style(self._pattern, output)}


_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def _json_objects(text: str):
    """Every JSON object that starts somewhere in ``text``, in order of its start."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield value


def _as_call(value: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """``{"name", "arguments"}`` from the layouts models write calls in, or None if it is not a call."""
    if isinstance(value.get("function"), Mapping):  # OpenAI's {"type": "function", "function": {...}}
        value = value["function"]
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # OpenAI sends the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not isinstance(arguments, Mapping):
        return None
    return {"name": name, "arguments": dict(arguments)}


def parse_tool_call(output: str) -> Optional[Dict[str, Any]]:
    """The first function call in a generated answer, as ``{"name", "arguments"}``, or None.

    Looks inside ``<tool_call>`` blocks first (an unclosed last block counts), then anywhere in the
    output; a call is a JSON object with a string ``name`` and an object ``arguments`` (or
    ``parameters``, or a JSON string of one), possibly wrapped as ``{"function": {...}}``. Text around
    it is ignored.
    """
    blocks = [m.group(1) for m in _TOOL_CALL_BLOCK.finditer(output)]
    for text in (*blocks, output):
        for value in _json_objects(text):
            call = _as_call(value)
            if call is not None:
                return call
    return None


def _same_value(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return Decimal(str(got)) == Decimal(str(want))  # 3 == 3.0, without float surprises
    if isinstance(want, str) and isinstance(got, str):
        return got.strip().casefold() == want.strip().casefold()
    if isinstance(want, Mapping) and isinstance(got, Mapping):
        return same_arguments(got, want)
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(_same_value(g, w) for g, w in zip(got, want))
    return got == want


def same_arguments(got: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """Whether two argument objects are the same call: the same keys (in any order) with the same
    values; numbers compare by value (``3`` is ``3.0``), strings ignoring case and surrounding spaces,
    lists in order, objects recursively."""
    return set(got) == set(want) and all(_same_value(got[k], want[k]) for k in want)


@dataclass
class ToolCallScorer:
    """Scores a function call (:func:`parse_tool_call`) against ``item["call"]`` (``{"name",
    "arguments"}``).

    Metrics: ``accuracy`` (the right function with the same arguments, :func:`same_arguments`),
    ``name`` (the right function), ``parsed`` (the output holds a call at all) and, with
    ``style_pattern``, ``style``.

    Args:
        style_pattern: A regular expression of an answer style to report as ``style``; None reports
            no ``style``.
    """

    style_pattern: Optional[str] = None

    def __post_init__(self) -> None:
        self._pattern = _compile(self.style_pattern, type(self).__name__)

    def __call__(self, output: str, item: Mapping[str, Any]) -> Dict[str, float]:
        want = item.get("call")
        if not isinstance(want, Mapping) or "name" not in want or "arguments" not in want:
            raise KeyError(f"ToolCallScorer needs a 'call' ({{'name', 'arguments'}}) in every item, got {want!r}")
        got = parse_tool_call(output)
        name = got is not None and got["name"] == want["name"]
        correct = name and same_arguments(got["arguments"], want["arguments"])
        return {"accuracy": float(correct), "name": float(name), "parsed": float(got is not None), **_style(self._pattern, output)}
