"""Gates: small classes that map :class:`~eaft_pl.loss.stats.TokenStats` to detached per-token weights.

Every method of the paper is a per-token weight on the same cross-entropy::

    loss = sum_t w_t * CE_t / N        (t over supervised, label-shifted tokens; w_t detached)

A gate is the ``w_t``; a new one is a few lines and is selected from YAML by ``class_path``.
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch
from torch import Tensor


from eaft_pl.loss.stats import TokenStats

Normalizer = Union[Literal["log_k"], float, None]

__all__ = [
    "Normalizer",
    "Gate",
    "SFTGate",
    "EAFTGate",
    "SigmoidGate",
    "EntropyMaskGate",
    "ConflictMaskGate",
    "DFTGate",
    "gate_option_error",
]


# --------------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------------


def _resolve_normalizer(normalizer: Normalizer, top_k: int) -> float:
    if normalizer is None:
        return 1.0
    if isinstance(normalizer, bool):
        raise ValueError(f"normalizer must be 'log_k', a positive number or None, got {normalizer!r}")
    if isinstance(normalizer, str):
        if normalizer != "log_k":
            raise ValueError(f"normalizer must be 'log_k', a positive number or None, got {normalizer!r}")
        return math.log(top_k)
    if not normalizer > 0:
        raise ValueError(f"normalizer must be positive, got {normalizer!r}")
    return float(normalizer)


def gate_option_error(gate: str, option: str, problem: str) -> ValueError:
    """The error of a bad gate option: names the gate, the option and where it sits in a config."""
    return ValueError(f"{gate}: {problem}; set model.init_args.gate.init_args.{option} (in Python: {gate}({option}=...))")


def _check_quantile(name: str, q: float, gate: str) -> None:
    if not 0.0 <= q <= 1.0:
        raise gate_option_error(gate, name, f"{name} must lie in [0, 1], got {q!r}")


def _check_power(alpha: float, gate: str) -> None:
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise gate_option_error(gate, "alpha", f"alpha must be >= 0 and finite, got {alpha!r}")


class Gate:
    """Maps per-token statistics to detached per-token loss weights.

    Subclass it and implement :meth:`weights` to add a method; select it in YAML with
    ``model.init_args.gate: {class_path: my_pkg.MyGate, init_args: {...}}``. The returned tensor
    must have shape ``(N,)``; it is detached by the caller, so a gate never carries gradient.
    """

    #: Short name used for run tags and tables.
    name: str = "gate"
    #: Set to True if :meth:`weights` reads ``stats.full_entropy``.
    needs_full_entropy: bool = False
    #: Set to True if :meth:`weights` reads ``stats.reference`` (the base model's statistics): the
    #: module then runs the reference pass before training.
    needs_reference: bool = False
    #: True if a token's weight depends on that token's statistics only (not on the batch's). The
    #: chunked loss then computes weights and gradients chunk by chunk in one pass; otherwise it
    #: gathers all statistics first and recomputes the logits for the gradient (always correct).
    token_local: bool = False

    def weights(self, stats: TokenStats) -> Tensor:
        raise NotImplementedError

    def __call__(self, stats: TokenStats) -> Tensor:
        with torch.no_grad():
            w = self.weights(stats)
        if w.shape != stats.ce.shape:
            raise ValueError(f"{type(self).__name__} returned weights {tuple(w.shape)}, expected {tuple(stats.ce.shape)}")
        return w.detach().to(torch.float32)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class SFTGate(Gate):
    """Plain supervised fine-tuning: every token has weight 1."""

    name = "sft"
    token_local = True

    def weights(self, stats: TokenStats) -> Tensor:
        return torch.ones_like(stats.ce)


class EAFTGate(Gate):
    """EAFT (Eq. 2-3): weight ``(H_topK / normalizer) ** alpha``.

    Args:
        alpha: Power of the weight. 1 is the paper's method; 2 and 3 are its EAFT^p ablations;
            0 reproduces SFT.
        normalizer: ``"log_k"`` divides by ln K as in the paper (weights in [0, 1]); a number divides
            by it (LLaMA-Factory uses 3.0); ``None`` does not normalise (axolotl). A constant divisor
            rescales the whole loss, which matters for gradient clipping and SGD, not for Adam.
    """

    name = "eaft"
    token_local = True

    def __init__(self, alpha: float = 1.0, normalizer: Normalizer = "log_k") -> None:
        _check_power(alpha, type(self).__name__)
        try:
            _resolve_normalizer(normalizer, 20)  # validate early, K is known later
        except ValueError as e:
            raise gate_option_error(type(self).__name__, "normalizer", str(e)) from None
        self.alpha = float(alpha)
        self.normalizer = normalizer

    def weights(self, stats: TokenStats) -> Tensor:
        scale = _resolve_normalizer(self.normalizer, stats.top_k)
        return (stats.topk_entropy / scale) ** self.alpha


class SigmoidGate(Gate):
    """EAFT_sig (Sec. 5.1): weight ``sigmoid(steepness * (H~ - midpoint))`` with H~ = H_topK / ln K.

    Args:
        steepness: The paper's alpha (30).
        midpoint: The paper's beta (0.17, the bottom-15% entropy percentile of its math data).
    """

    name = "eaft_sigmoid"
    token_local = True

    def __init__(self, steepness: float = 30.0, midpoint: float = 0.17) -> None:
        if not (steepness > 0 and math.isfinite(steepness)):
            # <= 0 would up-weight the confident tokens (or weigh all alike): the opposite of the method.
            raise gate_option_error(type(self).__name__, "steepness", f"steepness must be > 0 and finite, got {steepness!r}")
        _check_quantile("midpoint", midpoint, type(self).__name__)  # H~ lies in [0, 1]
        self.steepness = float(steepness)
        self.midpoint = float(midpoint)

    def weights(self, stats: TokenStats) -> Tensor:
        return torch.sigmoid(self.steepness * (stats.norm_entropy - self.midpoint))


def _batch_quantile(x: Tensor, q: float) -> Tensor:
    # torch.quantile refuses more than 16M elements; the k-th value is exact and has no limit.
    k = max(1, min(x.numel(), math.ceil(q * x.numel())))
    return torch.kthvalue(x.float(), k).values


class EntropyMaskGate(Gate):
    """Entropy-masked SFT (Eq. 4): weight 1 above the q-quantile of top-K entropy, else 0.

    The quantile is taken over the supervised tokens of the batch it is called on (the paper does not
    say over which population). Tokens tied at the threshold are masked, so with many tokens of
    entropy exactly 0 the masked share can exceed ``quantile``.

    Args:
        quantile: Share of lowest-entropy tokens to mask (0.15 in the paper).
    """

    name = "entropy_mask"

    def __init__(self, quantile: float = 0.15) -> None:
        _check_quantile("quantile", quantile, type(self).__name__)
        self.quantile = float(quantile)

    def weights(self, stats: TokenStats) -> Tensor:
        if stats.num_tokens == 0 or self.quantile == 0:
            return torch.ones_like(stats.ce)
        tau = _batch_quantile(stats.topk_entropy, self.quantile)
        return (stats.topk_entropy > tau).float()


class ConflictMaskGate(Gate):
    """The pilot study's joint mask (Sec. 3.2): weight 0 where both top-K entropy and label
    probability are at or below their batch q-quantiles (a confident conflict), else 1.

    Args:
        entropy_quantile: Quantile of top-K entropy below which a token is "confident" (0.15).
        prob_quantile: Quantile of label probability below which a token "conflicts" (0.15).
    """

    name = "conflict_mask"

    def __init__(self, entropy_quantile: float = 0.15, prob_quantile: float = 0.15) -> None:
        _check_quantile("entropy_quantile", entropy_quantile, type(self).__name__)
        _check_quantile("prob_quantile", prob_quantile, type(self).__name__)
        self.entropy_quantile = float(entropy_quantile)
        self.prob_quantile = float(prob_quantile)

    def weights(self, stats: TokenStats) -> Tensor:
        if stats.num_tokens == 0 or self.entropy_quantile == 0 or self.prob_quantile == 0:
            return torch.ones_like(stats.ce)
        h_tau = _batch_quantile(stats.topk_entropy, self.entropy_quantile)
        p_tau = _batch_quantile(stats.label_prob, self.prob_quantile)
        conflict = (stats.topk_entropy <= h_tau) & (stats.label_prob <= p_tau)
        return (~conflict).float()


class DFTGate(Gate):
    """Dynamic Fine-Tuning (Wu et al. 2025): weight = detached probability of the label."""

    name = "dft"
    token_local = True

    def weights(self, stats: TokenStats) -> Tensor:
        return stats.label_prob


