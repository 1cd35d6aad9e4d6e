"""The EAFT loss family as a loss object for ``transformers.Trainer``: :class:`EAFTLoss`.

One object holds the gate and every option of :mod:`eaft_pl.loss`, and computes the loss two ways:

- from the full logits (:meth:`EAFTLoss.full_loss`); calling the object does this, with the
  signature of ``Trainer(compute_loss_func=...)``;
- from the final hidden states and the LM head, a chunk of tokens at a time (:meth:`EAFTLoss.lean_loss`,
  :mod:`eaft_pl.loss.chunked`), which the trainer mixin of :mod:`.trainer` uses.

Both divide the weighted sum by ``num_items_in_batch`` when the Trainer passes it: the supervised
(label-shifted) tokens of the whole optimizer step, summed over its micro-batches (and over the
ranks with ``average_tokens_across_devices``). The Trainer then leaves the loss undivided by the
accumulation steps, so the accumulated gradient is the one of a single batch holding the same tokens,
however unequally the micro-batches share them.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Literal, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from eaft_pl.loss.chunked import LogitTransform, chunked_gated_loss
from eaft_pl.loss.gates import EAFTGate, Gate
from eaft_pl.loss.reference_gates import FLOWGate
from eaft_pl.loss.stats import IGNORE_INDEX, _validate_top_k, divide_weighted_sum, token_statistics

__all__ = ["EAFTLoss", "KLDirection", "logits_of"]

KLDirection = Literal["policy_ref", "ref_policy"]
#: What the Trainer passes as ``num_items_in_batch``: a count, a 0-d tensor, or nothing.
ItemCount = Optional[Union[int, Tensor]]

# Inputs of the model that the reference model needs too (the rest, e.g. use_cache, is the caller's).
_REFERENCE_INPUTS = ("input_ids", "attention_mask", "position_ids")


def logits_of(outputs: Any) -> Tensor:
    """The logits of a model's outputs: a ``ModelOutput`` or dict with ``logits``, or a tuple whose
    first element they are (``return_dict=False`` without labels)."""
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    elif isinstance(outputs, (tuple, list)):
        logits = outputs[0] if outputs else None
    else:
        logits = getattr(outputs, "logits", None)
    if not isinstance(logits, Tensor):
        raise ValueError(
            f"EAFTLoss needs the model's logits, but its outputs ({type(outputs).__name__}) hold none; a forward that "
            "skips the logits (a fused LM head) needs the lean path instead: EAFTTrainer with EAFTLoss(chunk_size=...)"
        )
    return logits


def _option_error(option: str, problem: str) -> ValueError:
    return ValueError(f"EAFTLoss({option}=...): {problem}")


class EAFTLoss:
    """The gated cross-entropy of the supervised tokens, ``sum_t w_t * CE_t / N``, for Hugging Face trainers.

    ``w_t`` is the gate's detached per-token weight (EAFT by default: the normalised top-K entropy
    ``H_topK / ln K``) and N the supervised tokens of the optimizer step (``num_items_in_batch``), or of
    the batch when the Trainer passes no count.

    Use it as ``Trainer(compute_loss_func=EAFTLoss(...))`` (full logits), or give it to
    :class:`~eaft_pl.integrations.transformers.EAFTTrainer` / ``EAFTTrainerMixin`` as ``eaft_loss=``;
    with ``chunk_size`` set, the trainer computes it from the hidden states and never builds the full
    logits.

    The batch-level gates (:class:`~eaft_pl.loss.gates.EntropyMaskGate`,
    :class:`~eaft_pl.loss.gates.ConflictMaskGate`) take their quantiles over the supervised tokens of
    one micro-batch (one call), not over the whole accumulated step: with gradient accumulation the
    masks, and so the update, depend on how the step is split into micro-batches. The token-local
    gates (SFT, EAFT, the sigmoid gate, DFT and the reference gates) do not.

    Args:
        gate: The per-token weight (any :class:`~eaft_pl.loss.gates.Gate`); ``None`` means
            ``EAFTGate()``, the paper's EAFT. EAFT's ``alpha`` and ``normalizer`` are options of
            :class:`~eaft_pl.loss.gates.EAFTGate`.
        top_k: K of the top-K entropy (20 in the paper); clamped to the vocabulary size.
        ignore_index: Label of the unsupervised positions. The Trainer's ``num_items_in_batch`` counts
            labels other than -100, so another value needs a trainer that counts the same way.
        chunk_size: Tokens per chunk of the lean path (:mod:`eaft_pl.loss.chunked`: a few
            ``(chunk_size, vocab)`` fp32 buffers instead of several full-logit tensors). Used by the
            trainer mixin; ``None`` computes the loss from the full logits.
        reference_model: A frozen copy of the model before fine-tuning, for the gates that read the
            base model's statistics (``Gate.needs_reference``: static EAFT, the static conflict mask,
            FLOW with a fixed ``tau``) and for the KL term. It runs without gradient on every batch
            (put in eval mode, its parameters frozen). Needs the batch's inputs, so it works with the
            trainer mixin, not with ``compute_loss_func``.
        kl_coef: beta of an added ``beta * KL`` per supervised token (SFT-KL: 0.5 with the SFT gate;
            ASFT: 0.1 with the DFT gate and ``kl_direction="ref_policy"``); needs ``reference_model``
            and the full logits (no ``chunk_size``). Normalised like the cross-entropy.
        kl_direction: ``"policy_ref"``: KL(p_theta || p_ref); ``"ref_policy"``: KL(p_ref || p_theta)
            (see :func:`eaft_pl.reference.token_kl`).
    """

    def __init__(
        self,
        gate: Optional[Gate] = None,
        *,
        top_k: int = 20,
        ignore_index: int = IGNORE_INDEX,
        chunk_size: Optional[int] = None,
        reference_model: Optional[nn.Module] = None,
        kl_coef: float = 0.0,
        kl_direction: KLDirection = "policy_ref",
    ) -> None:
        gate = EAFTGate() if gate is None else gate
        if not isinstance(gate, Gate):
            raise _option_error("gate", f"expected a Gate from eaft_pl.loss (EAFTGate(), SFTGate(), ...), got {gate!r}")
        try:
            _validate_top_k(top_k)
        except ValueError as err:
            raise _option_error("top_k", str(err)) from None
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise _option_error("chunk_size", f"must be a positive integer or None (full logits), got {chunk_size!r}")
        if not (kl_coef >= 0 and math.isfinite(kl_coef)):
            raise _option_error("kl_coef", f"must be >= 0 and finite, got {kl_coef!r}")
        if kl_direction not in ("policy_ref", "ref_policy"):
            raise _option_error("kl_direction", f"must be 'policy_ref' or 'ref_policy', got {kl_direction!r}")
        self.gate = gate
        self.top_k = top_k
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.kl_coef = float(kl_coef)
        self.kl_direction = kl_direction
        self.reference_model = reference_model
        self._check_reference()
        if reference_model is not None:
            reference_model.eval().requires_grad_(False)

    def _check_reference(self) -> None:
        """Refuse the combinations that cannot work, naming the option to change."""
        if self.kl_coef > 0 and self.chunk_size is not None:
            raise _option_error(
                "kl_coef", "the KL term needs the full logits of both models, which the lean path never builds; set chunk_size=None"
            )
        if self.needs_reference and self.reference_model is None:
            who = type(self.gate).__name__ if self.gate.needs_reference else "kl_coef > 0"
            raise _option_error(
                "reference_model", f"{who} reads the base model's statistics on every batch; pass reference_model= (a copy of the model before fine-tuning)"
            )
        if isinstance(self.gate, FLOWGate) and self.gate.tau is None:
            raise _option_error(
                "gate", "FLOWGate(tau=None) takes tau from the median base loss over the whole training set, which a "
                "reference model seen one batch at a time cannot give; set FLOWGate(tau=...)"
            )
        if self.needs_reference and self.ignore_index != IGNORE_INDEX:
            raise _option_error("ignore_index", f"the reference statistics mark unsupervised labels with {IGNORE_INDEX}; keep that value")

    @property
    def needs_reference(self) -> bool:
        """Whether every batch needs the reference model (a base-model gate or the KL term)."""
        return self.gate.needs_reference or self.kl_coef > 0

    @property
    def lean(self) -> bool:
        """Whether the loss is computed from the hidden states, chunk by chunk (``chunk_size`` set)."""
        return self.chunk_size is not None

    def __repr__(self) -> str:
        ref = None if self.reference_model is None else type(self.reference_model).__name__
        return (
            f"EAFTLoss(gate={self.gate!r}, top_k={self.top_k}, ignore_index={self.ignore_index}, chunk_size={self.chunk_size}, "
            f"reference_model={ref}, kl_coef={self.kl_coef}, kl_direction={self.kl_direction!r})"
        )

    # ---- compute_loss_func ----------------------------------------------------------------------

    def __call__(self, outputs: Any, labels: Optional[Tensor], num_items_in_batch: ItemCount = None) -> Tensor:
        """The loss from a model's outputs, as ``Trainer(compute_loss_func=...)`` calls it.

        Args:
            outputs: The model's outputs (their ``logits``, ``(B, T, V)``).
            labels: ``(B, T)`` labels aligned with ``input_ids``; shifted by one inside.
            num_items_in_batch: Supervised tokens of the whole optimizer step (the Trainer's count);
                ``None`` takes the mean over this batch's tokens.

        Raises:
            ValueError: Without labels, or when the options need what ``compute_loss_func`` is not
                given: the batch's inputs (``reference_model``) or the hidden states (``chunk_size``).
        """
        if self.lean:
            raise _option_error(
                "chunk_size", "compute_loss_func is called after the model built the full logits, so the lean path cannot "
                "save anything there; train with EAFTTrainer / EAFTTrainerMixin(eaft_loss=...), or set chunk_size=None"
            )
        if self.needs_reference:
            raise _option_error(
                "reference_model", "the reference model must run on the batch's inputs, which compute_loss_func does not "
                "receive; train with EAFTTrainer / EAFTTrainerMixin(eaft_loss=...) instead"
            )
        return self.full_loss(logits_of(outputs), labels, num_items_in_batch)

    # ---- the two paths ----------------------------------------------------------------------------

    def full_loss(
        self, logits: Tensor, labels: Optional[Tensor], num_items_in_batch: ItemCount = None, *, inputs: Optional[Mapping[str, Any]] = None
    ) -> Tensor:
        """The loss from the full logits ``(B, T, V)``; ``inputs`` (the model's inputs) feed the
        reference model when the gate or the KL term needs it."""
        labels = _require_labels(labels)
        reference, ref_logits = self.reference_statistics(inputs, labels)
        stats = token_statistics(
            logits,
            labels,
            top_k=self.top_k,
            ignore_index=self.ignore_index,
            compute_full_entropy=self.gate.needs_full_entropy,
            reference=reference,
        )
        total = (self.gate(stats) * stats.ce).sum()  # an attached 0 when no token is supervised
        if self.kl_coef > 0:
            from eaft_pl.reference import token_kl  # lazily, see reference_statistics

            kl = token_kl(logits, ref_logits, labels, self.kl_direction, self.ignore_index)
            total = total + self.kl_coef * kl.sum()
        return divide_weighted_sum(total, stats.num_tokens, num_items_in_batch)

    def lean_loss(
        self,
        hidden: Tensor,
        head: nn.Linear,
        labels: Optional[Tensor],
        num_items_in_batch: ItemCount = None,
        *,
        reference: Optional[Dict[str, Tensor]] = None,
        transform: LogitTransform = LogitTransform(),
    ) -> Tensor:
        """The loss from the final hidden states ``(B, T, H)`` and the LM head, ``chunk_size`` tokens at
        a time; equal in value and gradient to :meth:`full_loss` on ``transform(head(hidden))``.

        Args:
            hidden: The backbone's last hidden state (after its final norm).
            head: The LM head (its ``weight`` and ``bias``).
            labels: ``(B, T)`` labels aligned with the inputs.
            num_items_in_batch: As in :meth:`__call__`.
            reference: The reference model's statistics ``name -> (B, T)`` (:meth:`reference_statistics`).
            transform: The model's logit scaling / soft-capping (``LogitTransform.from_config``).
        """
        if not self.lean:
            raise _option_error("chunk_size", "the lean path needs a chunk size, e.g. EAFTLoss(chunk_size=1024)")
        return chunked_gated_loss(
            hidden,
            head.weight,
            _require_labels(labels),
            self.gate,
            num_items_in_batch=num_items_in_batch,
            bias=head.bias,
            top_k=self.top_k,
            chunk_size=self.chunk_size,
            ignore_index=self.ignore_index,
            transform=transform,
            reference=reference,
        )

    def reference_statistics(self, inputs: Optional[Mapping[str, Any]], labels: Tensor) -> Tuple[Optional[Dict[str, Tensor]], Optional[Tensor]]:
        """Run the reference model on a batch: its statistics ``name -> (B, T)`` aligned with ``labels``
        and its logits; ``(None, None)`` when neither the gate nor the KL term needs them."""
        if not self.needs_reference:
            return None, None
        if inputs is None:
            raise _option_error("reference_model", "the reference model needs the batch's inputs (input_ids, attention_mask)")
        # Imported here, not at the top: eaft_pl.reference is free of Lightning, but importing it runs
        # eaft_pl.data's __init__, which loads the Lightning DataModules. Only reference runs pay that.
        from eaft_pl.reference import frozen_reference

        ref = self.reference_model
        param = next(ref.parameters(), None)
        if param is not None and param.device != labels.device:
            ref.to(labels.device)
        batch = {name: inputs[name] for name in _REFERENCE_INPUTS if inputs.get(name) is not None}
        batch["labels"] = labels
        return frozen_reference(ref, batch, self.top_k)


def _require_labels(labels: Optional[Tensor]) -> Tensor:
    if labels is None:
        raise ValueError(
            "EAFTLoss got no labels: the batch needs a 'labels' column (-100 on the tokens not to learn), as "
            "DataCollatorForLanguageModeling and TRL's collators make"
        )
    return labels
