"""The loss's token statistics of a Hugging Face causal LM on a batch: the plain path (the model's
full ``(B, T, V)`` logits) or the chunked path (the backbone's last hidden states and the LM head's
weight, :mod:`eaft_pl.loss.chunked`, so the full logits never exist). Both give the same values and
gradients for every gate."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from eaft_pl.loss.chunked import LogitTransform, chunked_token_statistics
from eaft_pl.loss.gates import Gate
from eaft_pl.loss.stats import TokenStats, token_statistics

__all__ = ["causal_lm_statistics"]


def causal_lm_statistics(
    model: torch.nn.Module,
    batch: Dict[str, Tensor],
    gate: Gate,
    *,
    top_k: int,
    chunk_size: Optional[int] = None,
    transform: Optional[LogitTransform] = None,
    full_entropy: bool = False,
    grad_norm: bool = False,
    reference: Optional[Dict[str, Tensor]] = None,
) -> Tuple[TokenStats, Tensor, Tensor, Optional[Tensor]]:
    """Run ``model`` on ``batch`` (``input_ids``, ``labels`` and optionally ``attention_mask`` and, in
    packed batches, ``position_ids``) and gate its supervised tokens.

    Returns:
        ``(stats, weights, weighted_sum, logits)``: the tokens' statistics, their gate weights,
        ``sum(weights * ce)`` (the only one with gradient; an attached 0 without tokens) and the
        ``(B, T, V)`` logits on the plain path (``chunk_size=None``), ``None`` on the chunked one.
    """
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))
    if chunk_size is None:
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        stats = token_statistics(
            logits, batch["labels"], top_k=top_k, compute_full_entropy=full_entropy, compute_grad_norm=grad_norm, reference=reference
        )
        weights = gate(stats)
        return stats, weights, (weights * stats.ce).sum(), logits
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H): the head never sees it whole
    head = model.get_output_embeddings()
    stats, weights, weighted_sum = chunked_token_statistics(
        hidden,
        head.weight,
        batch["labels"],
        gate,
        bias=head.bias,
        top_k=top_k,
        chunk_size=chunk_size,
        transform=transform if transform is not None else LogitTransform(),
        compute_full_entropy=full_entropy,
        compute_grad_norm=grad_norm,
        reference=reference,
    )
    return stats, weights, weighted_sum, None
