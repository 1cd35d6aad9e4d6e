"""The public losses: statistics pass, gate, reduction in one call.

``sft_loss``, ``eaft_loss`` and ``dft_loss`` have the signature of the reference implementation
(LLaMA-Factory's ``eaft_loss_func`` / ``dft_loss_func``), whose values and gradients they match when
``normalizer=3.0``.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor


from eaft_pl.loss.gates import DFTGate, EAFTGate, Gate, Normalizer, SFTGate
from eaft_pl.loss.stats import IGNORE_INDEX, reduce_weighted, token_statistics

__all__ = ["gated_loss", "sft_loss", "eaft_loss", "dft_loss"]


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
