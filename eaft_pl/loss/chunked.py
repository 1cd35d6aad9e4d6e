"""The gated cross-entropy computed from hidden states and the LM-head weight, a chunk of tokens at a
time, so that the ``(tokens, vocab)`` logits never exist in full.

With Qwen's vocabulary (151,936) one 16k-token sequence has 10 GB of fp32 logits; the plain path (and
LLaMA-Factory's ``eaft_loss_func``) keeps several tensors of that size alive for the backward pass.
Here the supervised tokens' hidden states are multiplied with the LM head ``chunk_size`` rows at a
time and each chunk's logits are reduced at once to the per-token statistics every gate needs.

The gradient needs no stored logits either. The gate weight is detached, so the gradient of
``sum_t w_t * CE_t`` with respect to the logits of token t is ``w_t * (softmax(z_t) - onehot(y_t))``,
which is known as soon as the chunk's logits are. For a gate whose weight depends only on the token's
own statistics (SFT, EAFT and EAFT^p, the sigmoid variant, DFT; ``Gate.token_local``) the chunk's
contribution to the gradients of the hidden states, the weight and the bias is computed in the same
pass, right after the statistics: one logits matmul and two gradient matmuls, as many as
differentiating the full logits costs. A gate that needs the statistics of the whole batch (the
quantile masks) sees all of them first; a second pass then recomputes each chunk's logits for its
gradient. Either way the backward pass only scales the stored gradients by the incoming one. This is
the scheme of Liger's fused linear cross-entropy, extended with the statistics and any gate; storing
the gradients costs nothing extra, since the LM-head weight's gradient has to exist anyway.

Models whose logits are not ``lm_head(last_hidden_state)`` are covered when the difference is a scale
or a soft-cap read from the config (:class:`LogitTransform`); :func:`check_chunked_support` compares
the two paths on a short input and refuses anything else with a clear message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from eaft_pl.loss.gates import Gate
from eaft_pl.loss.stats import IGNORE_INDEX, TokenStats, _validate_top_k, divide_weighted_sum, row_blocks, row_statistics_, softmax_minus_onehot_

__all__ = ["LogitTransform", "chunked_token_statistics", "chunked_gated_loss", "check_chunked_support"]


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``lm_head(h)`` before the softmax: ``z -> cap * tanh(scale * z / cap)``.

    Attributes:
        scale: Multiplier of the raw logits (Cohere's ``logit_scale``; ``1 / logits_scaling`` for
            Granite).
        softcap: Soft-capping value (Gemma 2/3's ``final_logit_softcapping``), or ``None``.
    """

    scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def from_config(cls, config: Any) -> "LogitTransform":
        """Read the known logit scaling and soft-capping fields of a ``transformers`` config."""
        text_config = getattr(config, "get_text_config", lambda: config)()
        scale = 1.0
        if getattr(text_config, "logit_scale", None) is not None:  # Cohere multiplies
            scale *= float(text_config.logit_scale)
        if getattr(text_config, "logits_scaling", None) is not None:  # Granite divides
            scale /= float(text_config.logits_scaling)
        softcap = getattr(text_config, "final_logit_softcapping", None)
        return cls(scale=scale, softcap=float(softcap) if softcap else None)

    def apply_(self, z: Tensor) -> Union[Tensor, float]:
        """Transform fp32 logits in place; return the derivative ``dz'/dz`` (a number if constant)."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is None:
            return self.scale
        z.div_(self.softcap).tanh_()
        derivative = (1.0 - z * z).mul_(self.scale)  # d/dz of cap * tanh(scale * z / cap)
        z.mul_(self.softcap)
        return derivative


def _chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], transform: LogitTransform) -> Tuple[Tensor, Union[Tensor, float]]:
    """fp32 logits of a chunk (the matmul runs in the inputs' or autocast's dtype) and the transform's
    derivative."""
    z = F.linear(h, weight, bias).float()  # (C, V); a no-op cast when the matmul is already fp32
    return z, transform.apply_(z)


def _softmax_(z: Tensor, lse: Tensor) -> Tensor:
    """Softmax of recomputed logits from the log-partition of the first pass, in place."""
    return z.sub_(lse.unsqueeze(1)).exp_()


def _accumulate_mm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b``, in place when the dtypes allow (no ``(V, H)`` temporary)."""
    if a.dtype == b.dtype == acc.dtype and not torch.is_autocast_enabled(acc.device.type):
        acc.addmm_(a, b)
    else:  # mixed precision: the product comes back in the autocast dtype
        acc.add_(a @ b)


@dataclass
class _Plan:
    """The non-tensor arguments of one call and the statistics it produces (returned out of band)."""

    gate: Gate
    top_k: int
    chunk_size: int
    transform: LogitTransform
    want_full: bool
    want_grad_norm: bool
    stats: Optional[TokenStats] = None
    weights: Optional[Tensor] = None
    #: The reference model's ``(N,)`` statistics of the supervised tokens, or None.
    reference: Optional[Dict[str, Tensor]] = None

    def chunks(self, n: int):
        return row_blocks(n, self.chunk_size)

    def token_stats(self, parts: Dict[str, Tensor], s: int = 0, e: Optional[int] = None) -> TokenStats:
        """The statistics of tokens ``s:e`` (``parts`` already sliced; the reference is sliced here)."""
        ref = None if self.reference is None else {k: v[s:e] for k, v in self.reference.items()}
        return TokenStats.from_parts(parts, self.top_k, reference=ref)


def _run(h: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, plan: _Plan, grads: Optional[Dict[str, Tensor]]) -> Tensor:
    """Statistics (and, when ``grads`` is given, gradients) of all N tokens; returns ``sum(w * CE)``."""
    n = h.shape[0]
    names = ["ce", "lse", "topk_entropy"] + (["full_entropy"] if plan.want_full else []) + (
        ["logit_grad_norm"] if plan.want_grad_norm else []
    )
    parts = {name: torch.empty(n, dtype=torch.float32, device=h.device) for name in names}
    weights = torch.empty(n, dtype=torch.float32, device=h.device)
    fused = grads is not None and plan.gate.token_local

    def grad_of_chunk(p: Tensor, derivative: Union[Tensor, float], s: int, e: int) -> None:
        g = softmax_minus_onehot_(p, y[s:e], weights[s:e])
        if not (isinstance(derivative, float) and derivative == 1.0):
            g.mul_(derivative)  # through the scaling / soft-capping
        if "hidden" in grads:
            grads["hidden"][s:e] = g.to(weight.dtype) @ weight  # (C, H)
        if "weight" in grads:
            _accumulate_mm_(grads["weight"], g.t().to(h.dtype), h[s:e])
        if "bias" in grads:
            grads["bias"].add_(g.sum(0).to(grads["bias"].dtype))

    for s, e in plan.chunks(n):
        z, derivative = _chunk_logits(h[s:e], weight, bias, plan.transform)
        for name, value in row_statistics_(z, y[s:e], plan.top_k, plan.want_full, plan.want_grad_norm).items():
            parts[name][s:e] = value
        if fused:
            weights[s:e] = plan.gate(plan.token_stats({k: v[s:e] for k, v in parts.items()}, s, e))
            grad_of_chunk(z, derivative, s, e)
        del z, derivative  # free the chunk before the next one is allocated

    plan.stats = plan.token_stats(parts)
    if not fused:
        weights = plan.gate(plan.stats)  # a batch-level gate (quantiles) sees every token at once
        if grads is not None:
            for s, e in plan.chunks(n):  # second pass: recompute each chunk's logits for its gradient
                z, derivative = _chunk_logits(h[s:e], weight, bias, plan.transform)
                grad_of_chunk(_softmax_(z, parts["lse"][s:e]), derivative, s, e)
                del z, derivative
    plan.weights = weights
    return (weights * parts["ce"]).sum()


class _ChunkedGatedCE(torch.autograd.Function):
    """``sum(w * CE)`` of the rows of ``h`` whose gradients are computed in the forward pass."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, plan: _Plan) -> Tensor:  # type: ignore[override]
        grads: Dict[str, Tensor] = {}
        if ctx.needs_input_grad[0]:
            grads["hidden"] = torch.empty_like(h)
        if ctx.needs_input_grad[1]:
            grads["weight"] = torch.zeros_like(weight)
        if bias is not None and ctx.needs_input_grad[2]:
            grads["bias"] = torch.zeros_like(bias)
        total = _run(h, weight, bias, y, plan, grads)
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None  # drop our reference so autograd can take the tensors over
        for g in grads.values():
            g.mul_(grad_total.to(g.dtype))
        return grads.get("hidden"), grads.get("weight"), grads.get("bias"), None, None


def chunked_token_statistics(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    gate: Gate,
    *,
    bias: Optional[Tensor] = None,
    top_k: int = 20,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    transform: LogitTransform = LogitTransform(),
    compute_full_entropy: bool = False,
    compute_grad_norm: bool = False,
    reference: Optional[Dict[str, Tensor]] = None,
) -> Tuple[TokenStats, Tensor, Tensor]:
    """Statistics, gate weights and the weighted CE sum from hidden states, without full logits.

    Equivalent to :func:`eaft_pl.loss.stats.token_statistics` on ``transform(hidden @ weight.T + bias)``
    followed by ``gate`` and ``sum(weights * ce)``, in values and in gradients (with respect to
    ``hidden``, ``weight`` and ``bias``), for every gate.

    Args:
        hidden: ``(B, T, H)`` or ``(T, H)`` final hidden states (after the model's last norm).
        weight: ``(V, H)`` LM-head weight (the input embedding when they are tied).
        labels: ``(B, T)`` or ``(T,)`` labels aligned with the inputs; shifted by one inside.
        gate: Any :class:`~eaft_pl.loss.gates.Gate`.
        bias: ``(V,)`` LM-head bias, if the model has one.
        top_k: K of the top-K entropy; clamped to the vocabulary size.
        chunk_size: Tokens per chunk; peak extra memory is a few ``(chunk_size, V)`` fp32 buffers.
        ignore_index: Label of unsupervised positions.
        transform: Scaling / soft-capping the model applies to its logits.
        compute_full_entropy: Also compute the full-vocabulary entropy.
        compute_grad_norm: Also compute ``||softmax - onehot||`` per token.
        reference: Reference-model statistics ``name -> (B, T)`` aligned with ``labels``, as in
            :func:`eaft_pl.loss.stats.token_statistics`; carried into ``stats.reference`` and sliced per chunk.

    Returns:
        ``(stats, weights, weighted_sum)``: detached per-token statistics (``stats.ce`` carries no
        gradient here), detached weights, and ``sum(weights * ce)`` which carries the gradient.
    """
    _validate_top_k(top_k)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree: hidden must be labels.shape + (hidden,)")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"the LM-head weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    vocab = weight.shape[0]
    if vocab < 2:
        raise ValueError(f"the vocabulary must hold at least 2 tokens, got an LM head with {vocab} rows")
    shift_labels = labels[..., 1:]  # (B, T-1)
    mask = shift_labels != ignore_index
    h = hidden[..., :-1, :][mask]  # (N, H): the only rows that reach the LM head
    y = shift_labels[mask]  # (N,)
    plan = _Plan(gate, min(top_k, vocab), chunk_size, transform, compute_full_entropy or gate.needs_full_entropy, compute_grad_norm)
    if reference is not None:
        for name, value in reference.items():
            if value.shape != labels.shape:
                raise ValueError(f"reference[{name!r}] has shape {tuple(value.shape)}, expected the labels' {tuple(labels.shape)}")
        plan.reference = {name: value[..., 1:][mask] for name, value in reference.items()}
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    if needs_grad:
        total = _ChunkedGatedCE.apply(h, weight, bias, y, plan)
    else:
        with torch.no_grad():
            total = _run(h, weight, bias, y, plan, None)
    assert plan.stats is not None and plan.weights is not None
    return plan.stats, plan.weights, total


def chunked_gated_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    gate: Gate,
    *,
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    **options: Any,
) -> Tensor:
    """The chunked counterpart of :func:`eaft_pl.loss.functional.gated_loss`: ``sum(w * CE)`` divided by
    ``num_items_in_batch`` when given, else by the number of supervised tokens. ``options`` are those of
    :func:`chunked_token_statistics` (``bias``, ``top_k``, ``chunk_size``, ``transform``, ...)."""
    stats, _, total = chunked_token_statistics(hidden, weight, labels, gate, **options)
    return divide_weighted_sum(total, stats.num_tokens, num_items_in_batch)


def check_chunked_support(model: torch.nn.Module, transform: LogitTransform, *, length: int = 8) -> None:
    """Refuse a model whose logits are not ``transform(lm_head(backbone(x)))``.

    Runs the full model and the backbone + LM head on ``length`` tokens (in eval mode, restored
    afterwards) and compares the logits. Raises ``ValueError`` naming the model class when they differ
    or when the model has no separable backbone/LM head.
    """
    name = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        backbone = model.get_decoder()
    except Exception:  # transformers raises for models without a known decoder attribute
        backbone = None
    if not isinstance(head, torch.nn.Linear) or backbone is None:
        raise ValueError(
            f"model.init_args.chunk_size: {name} has no separable backbone and linear LM head "
            "(get_decoder() / get_output_embeddings()); unset chunk_size to use the plain loss"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = head.weight.device
            ids = torch.arange(length, device=device).remainder(head.weight.shape[0]).unsqueeze(0)
            expected = model(input_ids=ids, use_cache=False).logits.float()
            hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
            got, _ = _chunk_logits(hidden[0], head.weight, head.bias, transform)
    finally:
        model.train(was_training)
    tol = 1e-2 if head.weight.dtype in (torch.bfloat16, torch.float16) else 1e-4
    err = (got - expected[0]).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if not math.isfinite(err) or err > tol * scale:
        raise ValueError(
            f"model.init_args.chunk_size: the logits of {name} are not lm_head(last hidden state) up to the "
            f"known scaling/soft-capping (max difference {err:.3g}); this architecture is not supported by "
            "the chunked loss, unset chunk_size to use the plain loss"
        )
