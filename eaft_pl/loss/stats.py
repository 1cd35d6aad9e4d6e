"""Per-token statistics of the supervised tokens, computed once for every gate and metric.

:func:`token_statistics` shifts the labels, keeps the supervised tokens and computes the per-token
cross-entropy (with gradient) and the detached statistics that the gates read: label probability,
top-K entropy and, on request, the full-vocabulary entropy and the logit-gradient norm.
:func:`reduce_weighted` sums ``w * CE`` and divides by the supervised tokens of the batch, or by
``num_items_in_batch`` when the caller counts a whole optimizer step.

No Lightning here on purpose: other trainers and plain loops use this module on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor


IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "TokenStats",
    "token_statistics",
    "topk_entropy",
    "topk_mass",
    "full_entropy",
    "supervised_index",
    "logit_grad_norm",
    "reduce_weighted",
    "divide_weighted_sum",
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


def topk_mass(logits: Tensor, k: int) -> Tensor:
    """Probability mass of the ``k`` largest logits of each row: how much of the distribution the
    top-K entropy sees (1 when the row's mass lies in those ``k`` tokens).

    Args:
        logits: ``(..., V)`` logits in any float dtype.
        k: Number of logits kept; clamped to ``V``.

    Returns:
        ``(...)`` fp32 masses in ``[0, 1]``.
    """
    k = min(k, logits.shape[-1])
    top = torch.topk(logits, k, dim=-1, sorted=False).values.float()  # (..., k)
    # A ratio of partition functions, in log space: exp(lse(top) - lse(all)) never overflows.
    return (torch.logsumexp(top, dim=-1) - torch.logsumexp(logits.float(), dim=-1)).exp().clamp(max=1.0)


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


def supervised_index(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tuple[Tensor, Tensor]:
    """The rows of the flattened ``(B*T, V)`` logits that predict a supervised token, and those tokens.

    ``labels`` are aligned with ``input_ids`` (the Hugging Face convention): the logits at t predict
    ``labels[t + 1]``, so the labels are shifted by one and the last position (no next token) is
    dropped, like every position whose shifted label is ``ignore_index``.

    Returns:
        ``(index, y)``: the ``(N,)`` flat row indices, ascending, and the ``(N,)`` labels they predict.
    """
    # Shift the labels, not the logits: slicing or masking the (B, T, V) logits would copy them, and
    # their backward would fill two more tensors of that size. The last position gets ignore_index.
    shift_labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index).reshape(-1)  # (B*T,)
    index = torch.nonzero(shift_labels != ignore_index).squeeze(1)  # (N,)
    return index, shift_labels[index]


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
    flat = logits.reshape(-1, vocab)  # (B*T, V), a view of contiguous logits
    index, y = supervised_index(labels, ignore_index)  # (N,), (N,)
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


