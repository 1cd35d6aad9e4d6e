"""Evaluation tasks scored the way benchmarks score: greedy generation with exact match, multiple
choice by log-likelihood, and perplexity on held-out conversations. Each task is batched and works
on any Hugging Face causal LM with a chat template; higher is better for every metric except ``ce``
and ``ppl``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from eaft_pl.data.chat import Conversation, batch_to, collate, encode_conversation, pad_token_id
from eaft_pl.evaluation.scorers import Scorer
from eaft_pl.loss.stats import token_statistics

__all__ = [
    "GenerationTask",
    "MultipleChoiceTask",
    "PerplexityTask",
    "LOWER_IS_BETTER",
    "content_match",
    "exact_and_content",
    "normalise",
]

#: Metrics where a smaller value is better (forgetting flips their sign): this module's ``ce`` and
#: ``ppl``, and lm-evaluation-harness's perplexity-style metrics (wikitext, lambada).
LOWER_IS_BETTER = frozenset({"ce", "ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})


def normalise(text: str) -> str:
    """Collapse whitespace: exact match compares words, not spacing."""
    return " ".join(text.split())


def content_match(output: str, answer: str, distractors: Sequence[str]) -> bool:
    """Style-agnostic answer check (see :class:`GenerationTask`)."""
    if distractors:
        category = set(distractors) | {answer}
        found = [w for w in output.split() if w in category]
        return bool(found) and found[-1] == answer
    words, target = output.split(), answer.split()
    vocab, n = set(target), len(target)
    for i in range(len(words) - n + 1):
        if words[i : i + n] == target:
            before_ok = i == 0 or words[i - 1] not in vocab
            after_ok = i + n == len(words) or words[i + n] not in vocab
            if before_ok and after_ok:
                return True
    return False


def exact_and_content(output: str, item: Mapping[str, Any]) -> Dict[str, float]:
    """The default scorer of :class:`GenerationTask`: ``exact`` and ``content`` (see there)."""
    exact = output in {normalise(r) for r in item["references"]}
    return {"exact": float(exact), "content": float(content_match(output, item["answer"], item["distractors"]))}


def _prompt_ids(tokenizer: Any, prompt: str, system: Optional[str] = None) -> List[int]:
    # Without a system prompt of the item's own, the template adds its default one (if it has one),
    # as it does for the training conversations.
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _batches(items: Sequence[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class GenerationTask:
    """Greedy generation from a user prompt, scored per item by ``scorer``.

    Each item: ``{"prompt": str, ...}`` plus what the scorer reads, and optionally ``"system"``, a
    system prompt put before the user turn (the tools a model may call, say). The default scorer
    (:func:`exact_and_content`) reads ``{"references": [str, ...], "answer": str, "distractors":
    [str, ...]}`` and gives two metrics:

    - ``exact``: the answer (whitespace-normalised) equals one of ``references``, format included,
      like IFEval-style strict scoring.
    - ``content``: style-agnostic, like GSM8K's answer extraction. With ``distractors`` (the other
      values of the answer's category), the *last* word of the output that belongs to the category
      must be ``answer`` ("3 plus 4 is 7" answers 7, not 3). Without them, ``answer`` must occur in
      the output as a run of words that no other word of the answer extends on either side ("red
      red red" does not answer "red red").

    Another scorer (:mod:`eaft_pl.evaluation.scorers`: the final number of a math answer, a parsed
    tool call) gives its own metrics; each metric is the mean over the items.

    Args:
        name: The task's name in metric names.
        items: The prompts and what the scorer compares with.
        max_new_tokens: Generation stops after this many tokens (or at the end-of-turn token).
        scorer: ``scorer(output, item) -> {metric: value}``; ``None`` is :func:`exact_and_content`.
    """

    name: str
    items: List[Dict[str, Any]]
    max_new_tokens: int = 12
    scorer: Optional[Scorer] = None

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, batch_size: int = 64) -> Dict[str, float]:
        return self.score(self.generate(model, tokenizer, batch_size))

    def score(self, outputs: Sequence[str]) -> Dict[str, float]:
        """The mean of each of the scorer's metrics over the items, given their ``outputs`` in order."""
        if len(outputs) != len(self.items):
            raise ValueError(f"task {self.name!r}: {len(outputs)} outputs for {len(self.items)} items")
        scorer = self.scorer or exact_and_content
        totals: Dict[str, float] = {}
        for item, out in zip(self.items, outputs):
            for metric, value in scorer(out, item).items():
                totals[metric] = totals.get(metric, 0.0) + value
        n = max(len(self.items), 1)
        return {metric: total / n for metric, total in totals.items()}

    @torch.no_grad()
    def generate(self, model: Any, tokenizer: Any, batch_size: int = 64) -> List[str]:
        device = next(model.parameters()).device
        pad = pad_token_id(tokenizer)
        outputs: List[str] = []
        for chunk in _batches(self.items, batch_size):
            prompts = [_prompt_ids(tokenizer, item["prompt"], item.get("system")) for item in chunk]
            length = max(map(len, prompts))
            # Left padding, so every prompt ends where generation starts.
            ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in generated[:, length:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                outputs.append(normalise(tokenizer.decode(row, skip_special_tokens=True)))
        return outputs


@dataclass
class MultipleChoiceTask:
    """Multiple choice by the summed log-likelihood of each choice after the prompt (MMLU style).

    Each item: ``{"prompt": str, "choices": [str, ...], "label": int}`` and optionally ``"system"``
    (as in :class:`GenerationTask`). Metric: ``acc``.
    """

    name: str
    items: List[Dict[str, Any]]

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, batch_size: int = 64) -> Dict[str, float]:
        device = next(model.parameters()).device
        pad = pad_token_id(tokenizer)
        pairs = []  # (item index, choice index, prompt ids, choice ids)
        for i, item in enumerate(self.items):
            prompt = _prompt_ids(tokenizer, item["prompt"], item.get("system"))
            for j, choice in enumerate(item["choices"]):
                pairs.append((i, j, prompt, tokenizer(choice, add_special_tokens=False)["input_ids"]))
        scores = torch.full((len(self.items), max((len(it["choices"]) for it in self.items), default=0)), -math.inf)
        for chunk in _batches(pairs, batch_size):
            length = max(len(p) + len(c) for _, _, p, c in chunk)
            ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for row, (_, _, p, c) in enumerate(chunk):
                ids[row, : len(p) + len(c)] = torch.tensor(p + c)
                mask[row, : len(p) + len(c)] = 1
            logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
            for row, (i, j, p, c) in enumerate(chunk):
                # Token k of the choice (at position len(p)+k) is predicted by the logits at len(p)+k-1.
                positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=logp.device)
                targets = torch.tensor(c, device=logp.device)
                scores[i, j] = logp[row, positions, targets].sum().item()
        correct = sum(int(scores[i].argmax()) == item["label"] for i, item in enumerate(self.items))
        return {"acc": correct / max(len(self.items), 1)}


@dataclass
class PerplexityTask:
    """Cross-entropy and perplexity of the assistant tokens of held-out conversations."""

    name: str
    conversations: List[Conversation]
    max_length: int = 2048
    _encoded: List[Any] = field(default_factory=list, repr=False)

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, batch_size: int = 64) -> Dict[str, float]:
        device = next(model.parameters()).device
        if not self._encoded:
            self._encoded = [encode_conversation(tokenizer, c, self.max_length) for c in self.conversations]
        pad = pad_token_id(tokenizer)
        total, count = 0.0, 0
        for chunk in _batches(self._encoded, batch_size):
            batch = batch_to(collate(chunk, pad), device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            stats = token_statistics(logits, batch["labels"])
            total += stats.ce.double().sum().item()
            count += stats.num_tokens
        ce = total / max(count, 1)
        return {"ce": ce, "ppl": math.exp(ce)}
