"""Evaluation tasks scored the way benchmarks score: greedy generation with exact match, multiple
choice by log-likelihood, and perplexity on held-out conversations or plain text. Each task is
batched and works on any Hugging Face causal LM with a chat template; higher is better for every
metric except those in :data:`LOWER_IS_BETTER`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from eaft_pl.data.chat import Conversation, EncodedExample, batch_to, collate, encode_conversation, end_of_turn_ids, pad_token_id
from eaft_pl.evaluation.scorers import Scorer
from eaft_pl.loss.stats import token_statistics

__all__ = [
    "GenerationTask",
    "MultipleChoiceTask",
    "PerplexityTask",
    "TextPerplexityTask",
    "LOWER_IS_BETTER",
    "chat_prompt_ids",
    "continuation_log_probs",
    "content_match",
    "decode_answer",
    "exact_and_content",
    "greedy_answers",
    "normalise",
]

#: Metrics where a smaller value is better (forgetting flips their sign): this module's ``ce`` and
#: ``ppl``, the KL to the base of :class:`~eaft_pl.evaluation.agreement.BaseAgreementTask`, and
#: lm-evaluation-harness's perplexity-style metrics (wikitext, lambada).
LOWER_IS_BETTER = frozenset({"ce", "ppl", "kl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})


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


def chat_prompt_ids(tokenizer: Any, prompt: str, system: Optional[str] = None) -> List[int]:
    """The token ids of one user turn (after ``system``, if given) and the assistant's generation
    prompt, by the tokenizer's chat template. Without a system prompt of the item's own the template
    adds its default one, if it has one, as it does for the training conversations.

    Raises:
        ValueError: the tokenizer has no chat template (a pretrained model's, such as Gemma 3 270M's).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no chat template, so the "
            "evaluation prompts cannot be rendered; set data.init_args.chat_template (EAFTModule copies it onto its "
            "tokenizer) or model.init_args.chat_template, or outside eaft-pl set tokenizer.chat_template"
        )
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

    def __post_init__(self) -> None:
        # An empty task would report no metric, and the forgetting callback averages each metric of a suite.
        if not self.items:
            raise ValueError(f"GenerationTask {self.name!r}: no items")

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, batch_size: int = 64) -> Dict[str, float]:
        return self.score(self.generate(model, tokenizer, batch_size))

    def score(self, outputs: Sequence[str]) -> Dict[str, float]:
        """The mean of each of the scorer's metrics over the items, given their ``outputs`` in order."""
        if len(outputs) != len(self.items):
            raise ValueError(f"task {self.name!r}: {len(outputs)} outputs for {len(self.items)} items")
        scorer = self.scorer or exact_and_content
        totals: Dict[str, float] = {}
        for index, (item, out) in enumerate(zip(self.items, outputs)):
            scores = scorer(out, item)
            if index and scores.keys() != totals.keys():
                # A mean over the items that report a metric would silently change what it measures.
                raise ValueError(
                    f"task {self.name!r}: the scorer gave metrics {sorted(scores)} for item {index} but "
                    f"{sorted(totals)} for the items before it; a scorer reports the same metrics for every item"
                )
            for metric, value in scores.items():
                totals[metric] = totals.get(metric, 0.0) + value
        return {metric: total / len(self.items) for metric, total in totals.items()}

    @torch.no_grad()
    def generate(self, model: Any, tokenizer: Any, batch_size: int = 64) -> List[str]:
        prompts = [item["prompt"] for item in self.items]
        systems = [item.get("system") for item in self.items]
        answers = greedy_answers(model, tokenizer, prompts, self.max_new_tokens, batch_size, systems=systems)
        # Each answer already ends at its first stop token, a special token that decoding skips.
        return [normalise(tokenizer.decode(row, skip_special_tokens=True)) for row in answers]


def _until_stop(ids: List[int], stops: Sequence[int]) -> List[int]:
    """``ids`` up to (not including) the first stop token (:func:`eaft_pl.data.chat.end_of_turn_ids`)."""
    ends = [i for i, token in enumerate(ids) if token in stops]
    return ids[: ends[0]] if ends else ids


def decode_answer(tokenizer: Any, ids: List[int]) -> str:
    """The text of a greedy answer from :func:`greedy_answers`, its end-of-turn token dropped and
    its whitespace kept (line breaks matter to format checks)."""
    return tokenizer.decode(_until_stop(ids, end_of_turn_ids(tokenizer)), skip_special_tokens=True).strip()


@torch.no_grad()
def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
    systems: Optional[Sequence[Optional[str]]] = None,
) -> List[List[int]]:
    """Greedy answers to user prompts (chat template applied, after each prompt's system prompt in
    ``systems`` where one is given), batched with left padding.

    Returns:
        Each prompt's generated token ids, up to and including the first end-of-turn or end-of-sequence
        token (:func:`eaft_pl.data.chat.end_of_turn_ids`; an answer cut by ``max_new_tokens`` has none).
        Padding after the end is dropped.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if systems is not None and len(systems) != len(prompts):
        raise ValueError(f"greedy_answers: {len(systems)} system prompts for {len(prompts)} prompts")
    turns = list(zip(prompts, systems if systems is not None else [None] * len(prompts)))
    device = next(model.parameters()).device
    pad, stops = pad_token_id(tokenizer), end_of_turn_ids(tokenizer)
    answers: List[List[int]] = []
    for chunk in _batches(turns, batch_size):
        encoded = [chat_prompt_ids(tokenizer, prompt, system) for prompt, system in chunk]
        length = max(map(len, encoded))
        # Left padding, so every prompt ends where generation starts.
        ids = torch.tensor([[pad] * (length - len(p)) + p for p in encoded], device=device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in encoded], device=device)
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stops or None,
        )
        for row in generated[:, length:].tolist():
            answers.append(row[: len(_until_stop(row, stops)) + 1])  # with its stop token (if any), not the padding after
    return answers


@torch.no_grad()
def continuation_log_probs(
    model: Any, tokenizer: Any, pairs: Sequence[Tuple[List[int], List[int]]], batch_size: int = 64
) -> Iterator[Tensor]:
    """Teacher-forced log-probabilities of continuations after their prompts.

    Args:
        pairs: ``(prompt ids, continuation ids)``; batched with right padding.

    Yields:
        Per pair, in order, the ``(len(continuation), V)`` float32 log-probabilities (on CPU) whose
        row k predicts continuation token k.
    """
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    for chunk in _batches(list(pairs), batch_size):
        length = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, (p, c) in enumerate(chunk):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            mask[row, : len(p) + len(c)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, (p, c) in enumerate(chunk):
            # Continuation token k sits at len(p) + k and is predicted by the logits at len(p) + k - 1.
            yield torch.log_softmax(logits[row, len(p) - 1 : len(p) + len(c) - 1].float(), dim=-1).cpu()


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
        picks = self.choose(model, tokenizer, batch_size)
        correct = sum(pick == item["label"] for pick, item in zip(picks, self.items))
        return {"acc": correct / max(len(self.items), 1)}

    @torch.no_grad()
    def choose(self, model: Any, tokenizer: Any, batch_size: int = 64) -> List[int]:
        """The index of the choice the model finds likeliest, per item."""
        pairs, owners = [], []  # (prompt ids, choice ids), (item index, choice index)
        for i, item in enumerate(self.items):
            prompt = chat_prompt_ids(tokenizer, item["prompt"], item.get("system"))
            for j, choice in enumerate(item["choices"]):
                pairs.append((prompt, tokenizer(choice, add_special_tokens=False)["input_ids"]))
                owners.append((i, j))
        scores = torch.full((len(self.items), max((len(it["choices"]) for it in self.items), default=0)), -math.inf)
        for (i, j), (_, choice), logp in zip(owners, pairs, continuation_log_probs(model, tokenizer, pairs, batch_size)):
            scores[i, j] = logp[torch.arange(len(choice)), torch.tensor(choice)].sum().item()
        return [int(row.argmax()) for row in scores]


@dataclass
class PerplexityTask:
    """Cross-entropy and perplexity of the assistant tokens of held-out conversations."""

    name: str
    conversations: List[Conversation]
    max_length: int = 2048
    _encoded: List[Any] = field(default_factory=list, repr=False)

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, batch_size: int = 64) -> Dict[str, float]:
        if not self._encoded:
            self._encoded = [encode_conversation(tokenizer, c, self.max_length) for c in self.conversations]
        return _perplexity(model, tokenizer, self._encoded, batch_size)


def _perplexity(model: Any, tokenizer: Any, encoded: Sequence[EncodedExample], batch_size: int) -> Dict[str, float]:
    """Mean cross-entropy over the supervised tokens of ``encoded``, and its exponential."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    total, count = 0.0, 0
    for chunk in _batches(encoded, batch_size):
        batch = batch_to(collate(chunk, pad), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        stats = token_statistics(logits, batch["labels"])
        total += stats.ce.double().sum().item()
        count += stats.num_tokens
    ce = total / max(count, 1)
    return {"ce": ce, "ppl": math.exp(ce)}


@dataclass
class TextPerplexityTask:
    """Cross-entropy and perplexity of plain text (no chat template): every token after the first
    of each text, each text cut to ``max_length`` tokens. For prose the model was not fine-tuned on,
    this is the language-modelling skill a fine-tune can erode."""

    name: str
    texts: List[str]
    max_length: int = 256
    _encoded: List[EncodedExample] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.texts:
            raise ValueError(f"TextPerplexityTask {self.name!r}: no texts")
        if self.max_length < 2:
            raise ValueError(f"TextPerplexityTask {self.name!r}: max_length must be >= 2, got {self.max_length}")

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, batch_size: int = 64) -> Dict[str, float]:
        if not self._encoded:
            for i, text in enumerate(self.texts):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length]
                if len(ids) < 2:
                    raise ValueError(f"TextPerplexityTask {self.name!r}: text {i} has fewer than 2 tokens")
                self._encoded.append(EncodedExample(ids, list(ids), f"{self.name}:{i}"))
        return _perplexity(model, tokenizer, self._encoded, batch_size)
