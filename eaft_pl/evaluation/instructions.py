"""Instruction following checked by code: prompts carry verifiable format constraints (all lowercase,
a word budget, a keyword, a JSON object with given keys, ...), the model answers greedily, and each
constraint is checked on the answer by a small pure function, in the manner of IFEval's strict score.

A constraint is a :class:`Constraint` (``kind`` and ``value``); :data:`CHECKS` maps each kind to its
checker and :func:`describe` to the sentence appended to the prompt, so the same item can also be
asked without its constraints (the control that tells how often an answer passes by accident).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

import torch

from eaft_pl.evaluation.tasks import decode_answer, greedy_answers

__all__ = ["CHECKS", "Constraint", "InstructionItem", "InstructionTask", "check", "describe", "prompt_with_constraints"]


@dataclass(frozen=True)
class Constraint:
    """One verifiable constraint: ``kind`` is a key of :data:`CHECKS`, ``value`` its parameter (a
    word count, a keyword, a list of JSON keys, ...; ``None`` for kinds without one)."""

    kind: str
    value: Any = None

    def __post_init__(self) -> None:
        if self.kind not in CHECKS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; known: {sorted(CHECKS)}")
        if not _VALUE_OK[self.kind](self.value):
            raise ValueError(f"constraint {self.kind!r} needs {_VALUE_NEEDS[self.kind]}, got {self.value!r}")


@dataclass(frozen=True)
class InstructionItem:
    """A request (``prompt``, e.g. "Describe the sea.") and the constraints its answer must meet."""

    prompt: str
    constraints: Sequence[Constraint]

    def __post_init__(self) -> None:
        if not self.constraints:
            raise ValueError(f"instruction item {self.prompt!r} has no constraints")


def _words(text: str) -> List[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def is_lowercase(text: str, _: Any = None) -> bool:
    """Has a letter and no capital letter."""
    return any(c.isalpha() for c in text) and text == text.lower()


def at_most_words(text: str, n: int) -> bool:
    """Between 1 and ``n`` words (an empty answer follows no instruction)."""
    return 1 <= len(_words(text)) <= n


def at_least_words(text: str, n: int) -> bool:
    """At least ``n`` words."""
    return len(_words(text)) >= n


def has_keyword(text: str, keyword: str) -> bool:
    """``keyword`` occurs as a whole word (any case): "cats" does not contain "cat"."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(keyword)}(?![A-Za-z0-9])", text, re.IGNORECASE) is not None


def _strip_fence(text: str) -> str:
    """The content of a Markdown code fence around the whole answer, if there is one."""
    match = re.fullmatch(r"\s*```[A-Za-z]*\s*\n?(.*?)\n?\s*```\s*", text, re.DOTALL)
    return match.group(1) if match else text


def json_with_keys(text: str, keys: Sequence[str]) -> bool:
    """The whole answer (a surrounding code fence allowed) is a JSON object with every key of ``keys``."""
    try:
        parsed = json.loads(_strip_fence(text))
    except ValueError:
        return False
    return isinstance(parsed, dict) and all(key in parsed for key in keys)


def ends_with(text: str, phrase: str) -> bool:
    """The answer's last characters, trailing whitespace aside, are ``phrase`` (case-sensitive)."""
    return text.rstrip().endswith(phrase)


def starts_with(text: str, word: str) -> bool:
    """The answer's first word is ``word`` (any case)."""
    words = _words(text)
    return bool(words) and words[0].lower() == word.lower()


def bullet_points(text: str, n: int) -> bool:
    """Exactly ``n`` lines that start with a Markdown bullet ("- " or "* ")."""
    return sum(bool(re.match(r"\s*[-*] \S", line)) for line in text.splitlines()) == n


def no_commas(text: str, _: Any = None) -> bool:
    """A non-empty answer without a comma."""
    return bool(text.strip()) and "," not in text


#: Constraint kind -> its checker, ``checker(text, value) -> bool``.
CHECKS: Dict[str, Callable[[str, Any], bool]] = {
    "lowercase": is_lowercase,
    "max_words": at_most_words,
    "min_words": at_least_words,
    "keyword": has_keyword,
    "json_keys": json_with_keys,
    "ends_with": ends_with,
    "starts_with": starts_with,
    "bullets": bullet_points,
    "no_commas": no_commas,
}

_SENTENCES: Dict[str, Callable[[Any], str]] = {
    "lowercase": lambda _: "Write your whole answer in lowercase letters, with no capital letters at all.",
    "max_words": lambda n: f"Answer in at most {n} words.",
    "min_words": lambda n: f"Answer in at least {n} words.",
    "keyword": lambda k: f"Use the word '{k}' in your answer.",
    "json_keys": lambda keys: "Answer only with a JSON object that has the keys " + ", ".join(f'"{k}"' for k in keys) + ".",
    "ends_with": lambda p: f"End your answer with the exact phrase '{p}'.",
    "starts_with": lambda w: f"Start your answer with the word '{w}'.",
    "bullets": lambda n: f"Answer with exactly {n} bullet points, each on its own line starting with '- '.",
    "no_commas": lambda _: "Do not use any commas.",
}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _phrase(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


_VALUE_OK: Dict[str, Callable[[Any], bool]] = {
    "lowercase": lambda v: v is None,
    "max_words": _positive_int,
    "min_words": _positive_int,
    "keyword": _phrase,
    "json_keys": lambda v: isinstance(v, (list, tuple)) and bool(v) and all(_phrase(k) for k in v),
    "ends_with": _phrase,
    "starts_with": _phrase,
    "bullets": _positive_int,
    "no_commas": lambda v: v is None,
}
_VALUE_NEEDS = {
    "lowercase": "no value",
    "max_words": "a positive int",
    "min_words": "a positive int",
    "keyword": "a non-empty string",
    "json_keys": "a non-empty list of key strings",
    "ends_with": "a non-empty string",
    "starts_with": "a non-empty string",
    "bullets": "a positive int",
    "no_commas": "no value",
}


def check(constraint: Constraint, text: str) -> bool:
    """Whether ``text`` meets ``constraint``."""
    return bool(CHECKS[constraint.kind](text, constraint.value))


def describe(constraint: Constraint) -> str:
    """The sentence that asks for ``constraint``."""
    return _SENTENCES[constraint.kind](constraint.value)


def prompt_with_constraints(item: InstructionItem) -> str:
    """The request followed by one sentence per constraint."""
    return " ".join([item.prompt, *(describe(c) for c in item.constraints)])


@dataclass
class InstructionTask:
    """Greedy answers to requests with verifiable constraints, checked by code.

    Metrics (higher is better):

    - ``prompt_acc``: the fraction of items whose answer meets all its constraints (IFEval's strict
      prompt-level accuracy);
    - ``constraint_acc``: the fraction of all constraints met (instruction-level accuracy).

    Args:
        name: The task's name in the logged metrics.
        items: The requests and their constraints.
        max_new_tokens: Generation budget; an answer cut short is checked as it is.
        with_constraints: ``False`` asks the bare requests and checks the same constraints: the
            rate at which answers pass by accident, the chance level of this task.
    """

    name: str
    items: List[InstructionItem]
    max_new_tokens: int = 48
    with_constraints: bool = True

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError(f"InstructionTask {self.name!r}: no items")

    def prompts(self) -> List[str]:
        """The prompts sent to the model."""
        return [prompt_with_constraints(item) if self.with_constraints else item.prompt for item in self.items]

    @torch.no_grad()
    def answers(self, model: Any, tokenizer: Any, batch_size: int = 64) -> List[str]:
        """The model's greedy answers, one per item."""
        ids = greedy_answers(model, tokenizer, self.prompts(), self.max_new_tokens, batch_size)
        return [decode_answer(tokenizer, row) for row in ids]

    def score(self, answers: Sequence[str]) -> Dict[str, float]:
        """``prompt_acc`` and ``constraint_acc`` of ``answers`` (one per item)."""
        if len(answers) != len(self.items):
            raise ValueError(f"InstructionTask {self.name!r}: {len(answers)} answers for {len(self.items)} items")
        results = [[check(c, answer) for c in item.constraints] for item, answer in zip(self.items, answers)]
        met = [r for row in results for r in row]
        return {"prompt_acc": sum(all(row) for row in results) / len(results), "constraint_acc": sum(met) / len(met)}

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, batch_size: int = 64) -> Dict[str, float]:
        return self.score(self.answers(model, tokenizer, batch_size))
