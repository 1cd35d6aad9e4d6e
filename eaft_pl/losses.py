"""The EAFT loss family as pure tensor functions.

Every method of the paper is a per-token weight on the same cross-entropy::

    loss = sum_t w_t * CE_t / N        (t over supervised, label-shifted tokens; w_t detached)

so the computation is split in three small steps that anyone can reuse:

1. :func:`token_statistics` shifts the labels, keeps the supervised tokens and computes, once, the
   per-token cross-entropy (with gradient) and the detached statistics every gate needs: label
   probability, top-K entropy and, on request, full-vocabulary entropy.
2. A :class:`Gate` maps those statistics to detached per-token weights. Gates are tiny classes so a
   new one is a few lines and is selected from YAML by ``class_path``.
3. :func:`reduce_weighted` sums ``w * CE`` and divides by the number of supervised tokens (of the
   batch, or ``num_items_in_batch`` when the caller counts a whole optimizer step).

``sft_loss``, ``eaft_loss`` and ``dft_loss`` wrap the three steps with the signature of the
reference implementation (LLaMA-Factory's ``eaft_loss_func`` / ``dft_loss_func``), whose values and
gradients they match when ``normalizer=3.0``.

This module imports nothing from Lightning on purpose: it is the part of the package that other
trainers (HF ``Trainer(compute_loss_func=...)``, plain loops) can use on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100

Normalizer = Union[Literal["log_k"], float, None]

__all__ = [
    "IGNORE_INDEX",
    "TokenStats",
    "token_statistics",
    "topk_entropy",
    "full_entropy",
    "logit_grad_norm",
    "reduce_weighted",
    "divide_weighted_sum",
    "Gate",
    "SFTGate",
    "EAFTGate",
    "SigmoidGate",
    "EntropyMaskGate",
    "ConflictMaskGate",
    "DFTGate",
    "gated_loss",
    "sft_loss",
    "eaft_loss",
    "dft_loss",
]


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenStats:
    """Per-token statistics of the supervised, label-shifted tokens of a batch.

    All tensors have shape ``(N,)`` where N is the number of supervised tokens, in the order of the
    flattened ``(batch, time)`` positions. Only ``ce`` carries gradient.

    Attributes:
        ce: Cross-entropy ``-log p(label)`` in nats (fp32; differentiable from :func:`token_statistics`,
            detached from the chunked path, which returns the differentiable weighted sum instead).
        label_prob: Probability of the label, ``exp(-ce)`` (detached).
        topk_entropy: Entropy in nats of the softmax renormalised over the K largest logits (detached).
        top_k: The K actually used (the requested K clamped to the vocabulary size).
        full_entropy: Full-vocabulary entropy in nats (detached), or ``None`` when not requested.
        logit_grad_norm: ``||softmax(z) - onehot(label)||_2``, the norm of the unweighted CE gradient
            with respect to the logits (detached; a gate scales it by its weight), or ``None`` when not
            requested.
        reference: Per-token statistics of a reference model (the base, before fine-tuning) on the same
            tokens, ``name -> (N,)`` (e.g. ``topk_entropy``, ``label_prob``, ``sample_ce``; see
            :mod:`eaft_pl.reference`), or ``None``. Read by the base-model gates.
    """

    ce: Tensor
    label_prob: Tensor
    topk_entropy: Tensor
    top_k: int
    full_entropy: Optional[Tensor] = None
    logit_grad_norm: Optional[Tensor] = None
    reference: Optional[Dict[str, Tensor]] = None

    @classmethod
    def from_parts(
        cls, parts: Dict[str, Tensor], top_k: int, ce: Optional[Tensor] = None, reference: Optional[Dict[str, Tensor]] = None
    ) -> "TokenStats":
        """Build from the ``(N,)`` vectors of :func:`row_statistics_` (``ce`` overrides ``parts["ce"]``,
        e.g. with a differentiable copy; ``reference`` holds the reference model's ``(N,)`` vectors)."""
        ce = parts["ce"] if ce is None else ce
        return cls(
            ce=ce,
            label_prob=torch.exp(-ce.detach()),
            topk_entropy=parts["topk_entropy"],
            top_k=top_k,
            full_entropy=parts.get("full_entropy"),
            logit_grad_norm=parts.get("logit_grad_norm"),
            reference=reference,
        )

    def require_reference(self, name: str, who: str) -> Tensor:
        """The reference vector ``name``; a clear error when the batch carries none."""
        if self.reference is None or name not in self.reference:
            raise ValueError(
                f"{who} needs the reference (base) model's per-token {name!r}, but the batch carries none; "
                "train it with EAFTModule, which runs the reference pass (model.init_args.reference_source), "
                "or pass reference= to token_statistics"
            )
        return self.reference[name]

    @property
    def num_tokens(self) -> int:
        return int(self.ce.numel())

    @property
    def norm_entropy(self) -> Tensor:
        """Top-K entropy divided by ln K, in [0, 1]: the paper's gate H~ (Eq. 3)."""
        return self.topk_entropy / math.log(self.top_k)


def topk_entropy(logits: Tensor, k: int) -> Tensor:
    """Entropy (nats) of the softmax over the ``k`` largest logits of each row.

    Args:
        logits: ``(..., V)`` logits in any float dtype.
        k: Number of logits kept; clamped to ``V``.

    Returns:
        ``(...)`` fp32 entropies in ``[0, ln k]``.
    """
    k = min(k, logits.shape[-1])
    # topk on the original dtype and upcast only the K survivors: no fp32 copy of the whole row.
    top = torch.topk(logits, k, dim=-1, sorted=False).values.float()  # (..., k)
    logp = torch.log_softmax(top, dim=-1)  # (..., k)
    # p * logp with p = 0 (logit = -inf) is nan; such terms contribute 0 to the entropy.
    return -torch.nan_to_num(logp.exp() * logp, nan=0.0).sum(-1)  # (...)


def full_entropy(logits: Tensor) -> Tensor:
    """Exact full-vocabulary entropy (nats) of each row, ``-sum p log p``.

    Costs about three times a cross-entropy forward; an opt-in diagnostic. Computed from
    ``log_softmax`` rather than as ``logsumexp(z) - sum p z``: that difference of two large numbers
    loses the small entropies of confident rows in fp32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    return -torch.nan_to_num(logp.exp() * logp, nan=0.0).sum(-1)  # (...)


def logit_grad_norm(logits: Tensor, labels: Tensor) -> Tensor:
    """``||softmax(z) - onehot(y)||_2`` per row: the size of the CE gradient on the logits.

    Uses ``||p - e_y||^2 = sum_i p_i^2 - 2 p_y + 1`` with ``sum p^2 = exp(logsumexp(2 log p))``, so no
    ``(N, V)`` difference tensor is built. Lies in ``[0, sqrt(2)]``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    sum_p2 = torch.logsumexp(2.0 * logp, dim=-1).exp()  # (...)
    p_y = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).exp()  # (...)
    return (sum_p2 - 2.0 * p_y + 1.0).clamp(min=0.0).sqrt()


#: Rows processed together by the statistics and the gradient of the plain path: bounds their fp32
#: temporaries to ``(ROW_BLOCK, V)`` whatever the batch size and sequence length.
ROW_BLOCK = 1024


def row_blocks(n: int, size: int) -> Iterator[Tuple[int, int]]:
    """``(start, end)`` of consecutive blocks of at most ``size`` rows out of ``n``."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def supervised_runs(index: Tensor, size: int) -> List[Tuple[int, int, int]]:
    """Split the sorted supervised row indices into runs of consecutive rows of at most ``size``.

    Returns ``(row, pos, length)`` triples: rows ``row .. row+length`` of the flat logits are the
    supervised tokens ``pos .. pos+length``. An assistant turn is one run, so a batch has few of them,
    and each run is a view of the logits: no copy, no work on prompt rows. (One host sync.)
    """
    n = index.numel()
    if n == 0:
        return []
    breaks = (torch.nonzero(index[1:] != index[:-1] + 1).squeeze(1) + 1).tolist()
    starts = [0] + breaks
    rows = index[starts].tolist()
    runs = []
    for start, end, row in zip(starts, breaks + [n], rows):
        for s, e in row_blocks(end - start, size):
            runs.append((row + s, start + s, e - s))
    return runs


def _extra_statistics(z: Tensor, y: Tensor, k: int, want_full: bool, want_grad_norm: bool) -> Dict[str, Tensor]:
    """Top-K entropy and the opt-in diagnostics of a block of logits ``(C, V)``; ``z`` is not modified."""
    out = {"topk_entropy": topk_entropy(z, k)}
    if want_full:
        out["full_entropy"] = full_entropy(z)
    if want_grad_norm:
        out["logit_grad_norm"] = logit_grad_norm(z, y)
    return out


def row_statistics_(z: Tensor, y: Tensor, k: int, want_full: bool, want_grad_norm: bool) -> Dict[str, Tensor]:
    """Per-token statistics of a block of fp32 logits ``(C, V)`` with labels ``y``, and its log-partition.

    Returns ``ce``, ``lse``, ``topk_entropy`` and, on request, ``full_entropy`` and
    ``logit_grad_norm``, all ``(C,)``. Turns ``z`` into its softmax in place: the gradient needs
    exactly that, and ``torch.logsumexp`` would allocate a second ``(C, V)`` buffer. Pass a buffer
    that may be overwritten.
    """
    out = _extra_statistics(z, y, k, want_full, want_grad_norm)
    z_label = z.gather(1, y.unsqueeze(1)).squeeze(1)  # (C,)
    top = z.amax(dim=-1, keepdim=True)  # (C, 1)
    total = z.sub_(top).exp_().sum(dim=-1, keepdim=True)  # z is now exp(z - max)
    z.div_(total)  # softmax
    lse = (top + total.log()).squeeze(1)  # (C,)
    out["lse"] = lse
    out["ce"] = lse - z_label
    return out


def softmax_minus_onehot_(p: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    """``scale * (p - onehot(y))`` per row, in place on the softmax ``p``: the gradient of
    ``sum(scale * CE)`` with respect to the logits."""
    p[torch.arange(y.numel(), device=y.device), y] -= 1.0
    return p.mul_(scale.unsqueeze(1))


class _RowsCrossEntropy(torch.autograd.Function):
    """CE of the supervised rows of ``(M, V)`` logits, plus their statistics (written to ``out``).

    ``F.cross_entropy`` keeps an ``(M, V)`` log-softmax for backward and its backward makes two more
    tensors of that size; this keeps the logits and an ``(N,)`` log-partition, and computes the
    gradient straight into its ``(M, V)`` result, a run of supervised rows at a time (the prompt rows
    are only zeroed).
    """

    @staticmethod
    def forward(ctx, flat: Tensor, index: Tensor, y: Tensor, out: Dict[str, Any], k: int, want_full: bool, want_grad_norm: bool) -> Tensor:  # type: ignore[override]
        n = index.numel()
        names = ["ce", "lse", "topk_entropy"] + ["full_entropy"] * want_full + ["logit_grad_norm"] * want_grad_norm
        parts = {name: torch.empty(n, dtype=torch.float32, device=flat.device) for name in names}
        runs = supervised_runs(index, ROW_BLOCK)
        for row, pos, length in runs:
            z = flat[row : row + length].float()  # a view for fp32 logits, never modified
            yb = y[pos : pos + length]
            for name, value in _extra_statistics(z, yb, k, want_full, want_grad_norm).items():
                parts[name][pos : pos + length] = value
            lse = torch.logsumexp(z, dim=-1)
            parts["lse"][pos : pos + length] = lse
            parts["ce"][pos : pos + length] = lse - z.gather(1, yb.unsqueeze(1)).squeeze(1)
        ctx.runs = runs
        ctx.save_for_backward(flat, y, parts["lse"])
        out.update(parts)
        return parts["ce"]

    @staticmethod
    def backward(ctx, grad_ce: Tensor):  # type: ignore[override]
        flat, y, lse = ctx.saved_tensors
        grad = torch.empty_like(flat)
        done = 0  # rows below this are written
        for row, pos, length in ctx.runs:
            grad[done:row].zero_()  # the prompt rows before this run
            block = grad[row : row + length]
            # Write the softmax into the result directly when it is fp32; round once otherwise.
            p = block if block.dtype == torch.float32 else torch.empty_like(block, dtype=torch.float32)
            torch.sub(flat[row : row + length], lse[pos : pos + length].unsqueeze(1), out=p).exp_()
            softmax_minus_onehot_(p, y[pos : pos + length], grad_ce[pos : pos + length].float())
            if p is not block:
                block.copy_(p)
            done = row + length
        grad[done:].zero_()
        return grad, None, None, None, None, None, None


def shifted_reference(reference: Optional[Dict[str, Tensor]], labels_shape: torch.Size) -> Optional[Dict[str, Tensor]]:
    """Reference tensors aligned with ``labels`` (value at t belongs to ``labels[t]``), shifted like the
    labels and flattened to ``(B*T,)``: position t then holds the value of the token the logits at t
    predict, so the supervised rows' index selects them."""
    if reference is None:
        return None
    out = {}
    for name, value in reference.items():
        if value.shape != labels_shape:
            raise ValueError(f"reference[{name!r}] has shape {tuple(value.shape)}, expected the labels' {tuple(labels_shape)}")
        out[name] = F.pad(value[..., 1:], (0, 1), value=float("nan")).reshape(-1)
    return out


def _validate_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 2:
        raise ValueError(
            f"top_k must be an integer >= 2 (the entropy of a single logit is always 0), got {top_k!r}"
        )


def token_statistics(
    logits: Tensor,
    labels: Tensor,
    *,
    top_k: int = 20,
    ignore_index: int = IGNORE_INDEX,
    compute_full_entropy: bool = False,
    compute_grad_norm: bool = False,
    reference: Optional[Dict[str, Tensor]] = None,
) -> TokenStats:
    """Shift labels by one and compute the statistics of every supervised token.

    ``labels`` are aligned with ``input_ids`` (the Hugging Face convention): the logits at position
    t predict ``labels[t + 1]``. Positions whose shifted label is ``ignore_index`` are dropped, and so
    is the last position (it has no next token).

    Args:
        logits: ``(B, T, V)`` or ``(T, V)`` logits.
        labels: ``(B, T)`` or ``(T,)`` label ids, ``ignore_index`` where not supervised.
        top_k: K of the top-K entropy; clamped to the vocabulary size.
        ignore_index: Label value of unsupervised positions.
        compute_full_entropy: Also compute the exact full-vocabulary entropy (about 3x CE cost).
        compute_grad_norm: Also compute :func:`logit_grad_norm` (a diagnostic, about 2x CE cost).
        reference: Optional reference-model statistics, ``name -> (B, T)`` aligned with ``labels``
            (the value at t belongs to the token ``labels[t]``); selected like the labels into
            ``TokenStats.reference``. No pass over the logits.

    Returns:
        The :class:`TokenStats` of the supervised tokens.
    """
    _validate_top_k(top_k)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: logits must be "
            "labels.shape + (vocab,)"
        )
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"the vocabulary must hold at least 2 tokens, got logits with {vocab}")
    # Shift the labels, not the logits: slicing or masking the (B, T, V) logits would copy them, and
    # their backward would fill two more tensors of that size. The last position gets ignore_index.
    shift_labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index).reshape(-1)  # (B*T,)
    flat = logits.reshape(-1, vocab)  # (B*T, V), a view of contiguous logits
    index = torch.nonzero(shift_labels != ignore_index).squeeze(1)  # (N,)
    y = shift_labels[index]  # (N,)
    k = min(top_k, vocab)
    parts: Dict[str, Tensor] = {}
    ce = _RowsCrossEntropy.apply(flat, index, y, parts, k, compute_full_entropy, compute_grad_norm)  # (N,)
    shifted = shifted_reference(reference, labels.shape)
    ref = None if shifted is None else {name: value[index] for name, value in shifted.items()}
    return TokenStats.from_parts(parts, k, ce=ce, reference=ref)


def reduce_weighted(weights: Tensor, ce: Tensor, num_items_in_batch: Optional[Union[int, Tensor]] = None) -> Tensor:
    """``sum(w * CE) / num_items_in_batch`` if given, else the mean over the N tokens.

    With no supervised token the result is a zero that stays attached to the graph (so a DDP rank
    with an empty micro-batch still produces gradients and does not hang the others).
    """
    return divide_weighted_sum((weights.detach() * ce).sum(), ce.numel(), num_items_in_batch)


def divide_weighted_sum(total: Tensor, num_tokens: int, num_items_in_batch: Optional[Union[int, Tensor]] = None) -> Tensor:
    """``total / num_items_in_batch`` if given, else ``total / num_tokens``; a count of 0 returns the
    (attached, zero) sum itself rather than 0/0."""
    if num_items_in_batch is not None:
        # A count of 0 means the whole step has no supervised token, so the sum is 0 too. Clamping a
        # tensor avoids a host sync.
        if isinstance(num_items_in_batch, Tensor):
            return total / num_items_in_batch.to(total.device).clamp(min=1)
        if num_items_in_batch < 0:
            raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")
        return total / max(num_items_in_batch, 1)
    return total / max(num_tokens, 1)  # an attached 0 when there is no token: mean() of nothing is nan


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


# --------------------------------------------------------------------------------------------------
# The public losses
# --------------------------------------------------------------------------------------------------


def gated_loss(
    logits: Tensor,
    labels: Tensor,
    gate: Gate,
    *,
    top_k: int = 20,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
) -> Tensor:
    """Weighted cross-entropy with any :class:`Gate`: statistics pass, gate, reduction."""
    stats = token_statistics(
        logits, labels, top_k=top_k, ignore_index=ignore_index, compute_full_entropy=gate.needs_full_entropy
    )
    return reduce_weighted(gate(stats), stats.ce, num_items_in_batch)


def sft_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
) -> Tensor:
    """Token-mean cross-entropy of the supervised, label-shifted tokens (plain SFT)."""
    # top_k=2 keeps the (unused) entropy pass as cheap as possible.
    return gated_loss(
        logits, labels, SFTGate(), top_k=2, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch
    )


def eaft_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    top_k: int = 20,
    alpha: float = 1.0,
    normalizer: Normalizer = "log_k",
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
) -> Tensor:
    """Entropy-Adaptive Fine-Tuning loss: CE weighted by ``(H_topK / normalizer) ** alpha``, detached.

    Args:
        logits: ``(B, T, V)`` logits.
        labels: ``(B, T)`` labels aligned with ``input_ids``; shifted by one inside.
        top_k: K of the top-K entropy (20 in the paper); clamped to the vocabulary size.
        alpha: Power of the weight (1 in the paper).
        normalizer: ``"log_k"`` (paper), a float (LLaMA-Factory: 3.0) or ``None`` (axolotl).
        ignore_index: Label of unsupervised positions.
        num_items_in_batch: Divide the weighted sum by this count (e.g. the supervised tokens of a
            whole optimizer step) instead of taking the mean over this batch's tokens.
    """
    return gated_loss(
        logits,
        labels,
        EAFTGate(alpha=alpha, normalizer=normalizer),
        top_k=top_k,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
    )


def dft_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
) -> Tensor:
    """Dynamic Fine-Tuning loss: CE weighted by the detached label probability."""
    return gated_loss(
        logits, labels, DFTGate(), top_k=2, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch
    )
