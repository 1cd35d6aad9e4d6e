"""Agreement with the base model and the KL to it, on the base's own greedy answers to general prompts.

The first evaluation (the forgetting callback's step-0 pass, before any update) records the model's
greedy answers and its next-token distributions along them; later evaluations compare the current
model with that record, so no second copy of the model is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from eaft_pl.evaluation.tasks import chat_prompt_ids, continuation_log_probs, greedy_answers

__all__ = ["BaseAgreementTask", "BaseRecord", "answer_log_probs", "forward_kl"]


@dataclass
class BaseRecord:
    """What the first evaluation keeps of the base model.

    Attributes:
        answers: The base's greedy answer ids per prompt (the end-of-sequence token included when
            the answer ended within the budget).
        log_probs: ``(N, V)`` base log-probabilities at every answer token (all prompts, in order),
            or ``(N, K)`` the top-K of them when ``indices`` is set.
        indices: ``(N, K)`` the token ids of the top-K columns, or ``None`` (full distributions).
    """

    answers: List[List[int]]
    log_probs: Tensor
    indices: Optional[Tensor] = None


@torch.no_grad()
def answer_log_probs(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[List[int]], batch_size: int) -> Tensor:
    """Next-token log-probabilities of ``model`` at each answer token, the answer teacher-forced after
    its chat-templated prompt.

    Returns:
        ``(N, V)`` float32, N the answers' total length: row n is the distribution that predicts the
        n-th answer token (answers concatenated in order).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    pairs = [(chat_prompt_ids(tokenizer, p), list(a)) for p, a in zip(prompts, answers)]
    rows = list(continuation_log_probs(model, tokenizer, pairs, batch_size))
    return torch.cat(rows) if rows else torch.empty(0, 0)


def forward_kl(base: Tensor, current: Tensor, indices: Optional[Tensor] = None) -> Tensor:
    """Per-position forward KL(base || current) from log-probabilities.

    Args:
        base: ``(N, V)`` base log-probabilities, or ``(N, K)`` its top-K when ``indices`` is given.
        current: ``(N, V)`` current log-probabilities.
        indices: ``(N, K)`` the token ids of ``base``'s columns. The KL is then that of the K + 1
            bins "each top-K token, everything else": a lower bound on the full KL (merging outcomes
            never increases a KL), equal to it when the rest has no mass under either model.

    Returns:
        ``(N,)`` KL in nats, clamped at 0 against rounding.
    """
    if indices is None:
        if base.shape != current.shape:
            raise ValueError(f"base {tuple(base.shape)} and current {tuple(current.shape)} log-probabilities differ in shape")
        return (base.exp() * (base - current)).sum(-1).clamp_min(0.0)
    current_top = current.gather(-1, indices)
    kl = (base.exp() * (base - current_top)).sum(-1)
    tiny = torch.finfo(base.dtype).tiny
    rest_base = (1.0 - base.exp().sum(-1)).clamp_min(0.0)
    rest_current = (1.0 - current_top.exp().sum(-1)).clamp_min(tiny)
    # 0 * log 0 = 0: a base with no mass outside its top-K adds nothing for the rest bin.
    rest = torch.where(rest_base > 0, rest_base * (rest_base.clamp_min(tiny).log() - rest_current.log()), torch.zeros_like(rest_base))
    return (kl + rest).clamp_min(0.0)


@dataclass
class BaseAgreementTask:
    """How far the model has drifted from the base on general prompts.

    The first :meth:`evaluate` takes the model as the base: it records its greedy answers and its
    next-token distributions along them (:class:`BaseRecord`). Every evaluation then reports:

    - ``agree``: the fraction of prompts whose greedy answer is token for token the base's;
    - ``token_agree``: the fraction of base answer tokens that are the model's top-1 prediction
      when the base answer is teacher-forced (a smoother signal than whole answers);
    - ``kl``: forward KL(base || model) in nats, averaged over the base answer tokens (lower is better).

    The KL is forward, base first, because it is an expectation under the base: it charges the model
    for taking probability away from what the base would say, which is what forgetting loses, and on
    the base's own answers it needs only the cached base distribution and one teacher-forced pass of
    the current model. At the first evaluation ``agree`` is 1 and ``kl`` 0 by construction;
    ``token_agree`` can fall a hair below 1 where padding changes the numerics of a near tie.

    Args:
        name: The task's name in the logged metrics.
        prompts: General user prompts.
        max_new_tokens: Length budget of the greedy answers.
        top_k: Keep the base's full distributions (``None``, exact KL; N x V floats, about 60 MB
            for 300 answer tokens over a 49k vocabulary) or only its top-K per token (a lower
            bound, see :func:`forward_kl`).
    """

    name: str
    prompts: List[str]
    max_new_tokens: int = 32
    top_k: Optional[int] = None
    base: Optional[BaseRecord] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(f"BaseAgreementTask {self.name!r}: no prompts")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"BaseAgreementTask {self.name!r}: top_k must be >= 1 or None, got {self.top_k}")

    def reset(self) -> None:
        """Forget the base: the next evaluation records the model it sees as the new base."""
        self.base = None

    def _record(self, answers: List[List[int]], log_probs: Tensor) -> BaseRecord:
        if self.top_k is None or self.top_k >= log_probs.shape[-1]:
            return BaseRecord(answers, log_probs)
        values, indices = log_probs.topk(self.top_k, dim=-1)
        return BaseRecord(answers, values, indices)

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, batch_size: int = 64) -> Dict[str, float]:
        current = greedy_answers(model, tokenizer, self.prompts, self.max_new_tokens, batch_size)
        answers = current if self.base is None else self.base.answers
        log_probs = answer_log_probs(model, tokenizer, self.prompts, answers, batch_size)
        if self.base is None:
            self.base = self._record(answers, log_probs)
        targets = torch.tensor([t for a in answers for t in a], dtype=torch.long)
        kl = forward_kl(self.base.log_probs, log_probs, self.base.indices)
        return {
            "agree": sum(c == b for c, b in zip(current, answers)) / len(answers),
            "token_agree": (log_probs.argmax(-1) == targets).double().mean().item(),
            "kl": kl.double().mean().item(),
        }
