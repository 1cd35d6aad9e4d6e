"""The general suites of the real-model experiment: skills a fine-tune can erode, built without a
download and sized so that one evaluation pass of a 135M model stays within about a minute on two
CPU cores (``docs/real-model-suites.md``).

- ``prose``: perplexity of English prose that ships with Python (``pydoc_data.topics``);
- ``facts``: world facts, multiple choice by log-likelihood among four same-category answers;
- ``instructions``: requests with one constraint checked by code (lowercase, word budget, keyword, JSON);
- ``agreement``: agreement with the base's own greedy answers to general prompts, and the KL to it.

:func:`general_suites` assembles them for a DataModule's ``evaluation_suites()``;
:func:`candidate_tasks` also builds the control of the instruction suite (the same requests without
their constraints), which the measuring script uses as that suite's chance level.
"""

from __future__ import annotations

import random
import re
from typing import Any, Dict, List, Optional, Sequence

from eaft_pl.evaluation.agreement import BaseAgreementTask
from eaft_pl.evaluation.instructions import Constraint, InstructionItem, InstructionTask
from eaft_pl.evaluation.tasks import MultipleChoiceTask, TextPerplexityTask
from eaft_pl.experiments.realmodel.general_data import CATEGORY_ANSWERS, CONSTRAINT_VALUES, FACTS, GENERAL_PROMPTS, REQUESTS, TOPICS

__all__ = [
    "CANDIDATES",
    "KEPT",
    "candidate_tasks",
    "fact_items",
    "general_suites",
    "instruction_items",
    "prose_paragraphs",
    "prose_passages",
]

#: Every suite this module can build, and the control that gives the instruction suite's chance level.
CANDIDATES = ("prose", "facts", "instructions", "agreement")
#: The suites :func:`general_suites` returns by default: those the base model clears by at least 25
#: points over chance (``facts``) or that are continuous (``prose``, ``agreement``), as measured by
#: ``scripts/measure_general_suites.py`` (``docs/results/real_base_suites.json``).
KEPT = ("prose", "facts", "agreement")


def fact_items(n: int, seed: int = 0, n_choices: int = 4) -> List[Dict[str, Any]]:
    """``n`` world-fact questions in :class:`~eaft_pl.evaluation.MultipleChoiceTask` form.

    Facts are drawn without replacement, round-robin over the categories so every category is
    represented; the distractors are the fact's lures first, then other answers of its category,
    and the choices are shuffled. The same ``seed`` gives the same items. Besides the task's keys,
    each item has ``category`` and ``lured`` (whether a lure is among its distractors), for reports.
    """
    if not 1 <= n <= len(FACTS):
        raise ValueError(f"n must be in [1, {len(FACTS)}] (the facts in the table), got {n}")
    if n_choices < 2:
        raise ValueError(f"n_choices must be >= 2, got {n_choices}")
    rng = random.Random(seed)
    by_category: Dict[str, List] = {}
    for fact in FACTS:
        by_category.setdefault(fact.category, []).append(fact)
    for facts in by_category.values():
        rng.shuffle(facts)
    order = [facts[i] for i in range(max(map(len, by_category.values()))) for facts in by_category.values() if i < len(facts)]
    items = []
    for fact in order[:n]:
        others = [a for a in CATEGORY_ANSWERS[fact.category] if a != fact.answer and a not in fact.lures]
        distractors = list(fact.lures[: n_choices - 1])
        distractors += rng.sample(others, n_choices - 1 - len(distractors))
        choices = [fact.answer, *distractors]
        rng.shuffle(choices)
        items.append({
            "prompt": f"{fact.question} Reply with the answer only.", "choices": choices, "label": choices.index(fact.answer),
            "category": fact.category, "lured": bool(fact.lures),
        })  # fmt: skip
    return items


def instruction_items(n: int, seed: int = 0, kinds: Optional[Sequence[str]] = None) -> List[InstructionItem]:
    """``n`` requests, each with one constraint; the kinds take turns so each appears about equally."""
    kinds = list(kinds if kinds is not None else CONSTRAINT_VALUES)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    unknown = sorted(set(kinds) - set(CONSTRAINT_VALUES))
    if unknown or not kinds:
        raise ValueError(f"unknown constraint kinds {unknown}; known: {sorted(CONSTRAINT_VALUES)}")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        request = rng.choice(REQUESTS).format(rng.choice(TOPICS))
        items.append(InstructionItem(request, (Constraint(kind, rng.choice(CONSTRAINT_VALUES[kind])),)))
    return items


def prose_paragraphs() -> List[str]:
    """The prose paragraphs of ``pydoc_data.topics``: no indented (code or grammar) line, no heading
    underline, at least 40 words, each joined onto one line."""
    from pydoc_data.topics import topics  # part of CPython's standard library

    paragraphs = []
    for topic in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[topic]):
            lines = block.splitlines()
            if any(line.startswith((" ", "\t")) for line in lines) or any(set(line) <= set("*=-~^") for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 40:
                paragraphs.append(text)
    return paragraphs


def prose_passages(n: int, seed: int = 0) -> List[str]:
    """``n`` distinct prose paragraphs of :func:`prose_paragraphs`, drawn by ``seed``."""
    paragraphs = prose_paragraphs()
    if not 1 <= n <= len(paragraphs):
        raise ValueError(f"n must be in [1, {len(paragraphs)}] (the prose paragraphs), got {n}")
    return random.Random(seed).sample(paragraphs, n)


def candidate_tasks(
    seed: int = 0,
    n_prose: int = 8,
    prose_tokens: int = 128,
    n_facts: int = 32,
    n_instructions: int = 18,
    instruction_tokens: int = 48,
    n_agreement: int = 8,
    agreement_tokens: int = 32,
    agreement_top_k: Optional[int] = None,
) -> Dict[str, Any]:
    """Every candidate task by suite name (:data:`CANDIDATES`), plus ``instructions_control``: the
    same requests without their constraints, scored by the same checks (the instruction suite's
    chance level). Item counts and token budgets set the cost of a pass."""
    if not 1 <= n_agreement <= len(GENERAL_PROMPTS):
        raise ValueError(f"n_agreement must be in [1, {len(GENERAL_PROMPTS)}] (the general prompts), got {n_agreement}")
    instructions = instruction_items(n_instructions, seed)
    prompts = random.Random(seed).sample(GENERAL_PROMPTS, n_agreement)
    return {
        "prose": TextPerplexityTask("prose", prose_passages(n_prose, seed), max_length=prose_tokens),
        "facts": MultipleChoiceTask("facts", fact_items(n_facts, seed)),
        "instructions": InstructionTask("instructions", instructions, max_new_tokens=instruction_tokens),
        "instructions_control": InstructionTask("instructions_control", instructions, instruction_tokens, with_constraints=False),
        "agreement": BaseAgreementTask("agreement", prompts, max_new_tokens=agreement_tokens, top_k=agreement_top_k),
    }


def general_suites(seed: int = 0, include: Sequence[str] = KEPT, suite: str = "general", **sizes: Any) -> Dict[str, List[Any]]:
    """``{suite: [task, ...]}`` with the tasks named in ``include`` (see :data:`CANDIDATES`), for a
    DataModule's ``evaluation_suites()`` to merge. ``sizes``: the item counts and budgets of
    :func:`candidate_tasks`. The same ``seed`` gives the same items; the agreement task takes its base
    at its first evaluation, so build fresh suites for every fit."""
    unknown = [name for name in include if name not in CANDIDATES]
    if unknown or not include:
        raise ValueError(f"include must name some of {list(CANDIDATES)}, got {list(include)}")
    tasks = candidate_tasks(seed, **sizes)
    return {suite: [tasks[name] for name in include]}
