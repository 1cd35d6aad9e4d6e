"""The trainer side: a mixin for ``transformers.Trainer`` and TRL's ``SFTTrainer`` whose loss is an
:class:`~eaft_pl.integrations.transformers.loss.EAFTLoss`, and the model patch of its lean path.

The lean path must run inside the model's own forward: DDP prepares its gradient reduction there,
and the trainer may have wrapped the model in other ways (PEFT, accelerate's mixed precision). So,
like Liger-Kernel's model patching, :func:`add_lean_forward` wraps the model's ``forward``; the
wrapper computes the chunked loss from the backbone's hidden states and the LM head only when the
mixin's ``compute_loss`` asks for it (``eaft_loss=``), and is the original forward otherwise, so
generation, evaluation tasks and TRL's own patched forward are left as they were.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Dict, Optional

from torch import Tensor, nn
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from eaft_pl.integrations.transformers.loss import EAFTLoss, ItemCount, logits_of
from eaft_pl.loss.chunked import LogitTransform, check_chunked_support

__all__ = ["EAFTTrainerMixin", "EAFTTrainer", "add_lean_forward", "unwrap_peft"]

# Set on a patched model: the forward it had before (a second patch would only add a layer).
_ORIGINAL_FORWARD = "_eaft_original_forward"
# check_chunked_support names the Lightning option; the message is reused without that prefix.
_LIGHTNING_PREFIX = "model.init_args.chunk_size: "


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a PEFT wrapper (the one whose ``forward`` PEFT calls), else ``model``."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def add_lean_forward(model: nn.Module) -> None:
    """Patch ``model.forward`` so that ``model(..., labels=..., eaft_loss=loss)`` returns the lean loss.

    With ``eaft_loss`` given, the patched forward runs the backbone (``get_decoder()``), computes
    :meth:`EAFTLoss.lean_loss` from its last hidden state and the LM head, and returns a
    ``CausalLMOutputWithPast`` whose ``logits`` are ``None``; it also takes ``num_items_in_batch`` and
    ``eaft_reference`` (the reference model's statistics). Without ``eaft_loss`` it is the original
    forward. The signature seen by ``inspect`` stays the original one (``generate`` and the Trainer's
    column filter read it).

    Raises:
        ValueError: If the model's logits are not its LM head applied to the last hidden state (up to
            a known scaling or soft-capping): the chunked loss would compute something else.
    """
    if hasattr(model, _ORIGINAL_FORWARD):
        return
    transform = LogitTransform.from_config(model.config)
    try:
        check_chunked_support(model, transform)
    except ValueError as err:
        problem = str(err).removeprefix(_LIGHTNING_PREFIX)
        raise ValueError(f"EAFTLoss(chunk_size=...): the lean path cannot serve this model: {problem}") from None
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: nn.Module, *args: Any, eaft_loss: Optional[EAFTLoss] = None, eaft_reference: Optional[Dict[str, Tensor]] = None, **kwargs: Any) -> Any:
        if eaft_loss is None:
            return original(*args, **kwargs)
        labels = kwargs.pop("labels", None)
        count = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)  # an option of the LM head, which is not called
        kwargs["use_cache"] = False
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state  # (B, T, H): no logits
        # Looked up on each call: PEFT and the trainer's wrappers may replace the head after patching.
        head = self.get_output_embeddings()
        loss = eaft_loss.lean_loss(hidden, head, labels, count, reference=eaft_reference, transform=transform)
        return CausalLMOutputWithPast(loss=loss)

    setattr(model, _ORIGINAL_FORWARD, original)
    model.forward = types.MethodType(forward, model)


class EAFTTrainerMixin:
    """Makes a ``transformers.Trainer`` (or a subclass: TRL's ``SFTTrainer``, ...) train with an :class:`EAFTLoss`.

    Put it first among the bases: ``class EAFTSFTTrainer(EAFTTrainerMixin, SFTTrainer): pass``
    (:class:`EAFTTrainer` and ``EAFTSFTTrainer`` are ready-made). The trainer takes one more keyword,
    ``eaft_loss``, and its ``compute_loss`` then:

    - with ``EAFTLoss(chunk_size=...)``, calls the model through a patched forward
      (:func:`add_lean_forward`) that computes the loss from the final hidden states and the LM head,
      chunk by chunk, so the ``(tokens, vocab)`` logits never exist; the outputs have no ``logits``,
      so ``compute_metrics`` is refused;
    - without ``chunk_size``, computes it from the model's logits, like ``compute_loss_func`` but with
      the batch's inputs at hand, so the reference model of the base-model gates and of the KL term
      can run.

    Either way the loss is divided by the Trainer's ``num_items_in_batch``, the supervised tokens of
    the whole optimizer step: the accumulated update equals the update of one batch holding the same
    tokens. The trainer's own loss (TRL's ``loss_type``, its entropy and token-accuracy metrics) is
    replaced.

    Args:
        eaft_loss: The loss; ``None`` means ``EAFTLoss()`` (EAFT from the full logits).

    Raises:
        ValueError: With ``compute_loss_func`` (give the loss as ``eaft_loss``), under
            ``nn.DataParallel`` (several GPUs in one process), or on the lean path with
            ``compute_metrics``, FSDP or DeepSpeed ZeRO-3 (the chunked loss reads the LM-head weight
            outside the head's own forward, where those have not gathered it).
    """

    # The loss is already divided by the step's token count: the Trainer must not divide it by the
    # accumulation steps again (its documented switch for trainers that compute their own loss).
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, eaft_loss: Optional[EAFTLoss] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        loss = EAFTLoss() if eaft_loss is None else eaft_loss
        if not isinstance(loss, EAFTLoss):
            raise ValueError(f"{type(self).__name__}(eaft_loss=...) must be an EAFTLoss, got {loss!r}")
        if self.compute_loss_func is not None:
            raise ValueError(f"{type(self).__name__} computes its loss from eaft_loss=; leave compute_loss_func unset")
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support nn.DataParallel (several GPUs in one process); launch with "
                "`accelerate launch` or `torchrun`, or make one GPU visible with CUDA_VISIBLE_DEVICES"
            )
        if loss.lean:
            self._check_lean_setup()
            add_lean_forward(unwrap_peft(self.model))
        self.eaft_loss = loss
        # The Trainer counts the step's supervised tokens (num_items_in_batch) only for models it thinks
        # take loss keywords, or with a compute_loss_func; this compute_loss needs the count always.
        self.model_accepts_loss_kwargs = True

    def _check_lean_setup(self) -> None:
        name = type(self).__name__
        if self.compute_metrics is not None:
            raise ValueError(
                f"{name}: the lean path (EAFTLoss(chunk_size=...)) builds no logits, so compute_metrics would see none; "
                "unset compute_metrics or set chunk_size=None"
            )
        from transformers.integrations import is_deepspeed_zero3_enabled

        if getattr(self, "is_fsdp_enabled", False) or is_deepspeed_zero3_enabled():
            raise ValueError(
                f"{name}: the lean path (EAFTLoss(chunk_size=...)) reads the LM-head weight outside the head's forward, "
                "where FSDP and DeepSpeed ZeRO-3 have not gathered it; set chunk_size=None, or use DDP"
            )

    def compute_loss(
        self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False, num_items_in_batch: ItemCount = None
    ) -> Any:
        """The :class:`EAFTLoss` of a batch (and the model's outputs with ``return_outputs``)."""
        loss_fn: EAFTLoss = self.eaft_loss
        if inputs.get("labels") is None:
            raise ValueError(f"{type(self).__name__}: the batch has no 'labels' (-100 on the tokens not to learn)")
        labels = inputs["labels"]
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        model_inputs.setdefault("use_cache", False)  # a training forward needs no key/value cache
        if loss_fn.lean:
            reference, _ = loss_fn.reference_statistics(model_inputs, labels)
            outputs = model(**model_inputs, labels=labels, num_items_in_batch=num_items_in_batch, eaft_loss=loss_fn, eaft_reference=reference)
            loss = outputs.loss
        else:
            outputs = model(**model_inputs)
            loss = loss_fn.full_loss(logits_of(outputs), labels, num_items_in_batch, inputs=model_inputs)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts the tokens of every rank and DDP averages the gradients over the
            # ranks: scale back to a sum, as Trainer.compute_loss does (tensor-parallel ranks share a batch).
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp_size)
        return (loss, outputs) if return_outputs else loss


class EAFTTrainer(EAFTTrainerMixin, Trainer):
    """``transformers.Trainer`` trained with an :class:`EAFTLoss` (see :class:`EAFTTrainerMixin`).

    Example::

        trainer = EAFTTrainer(model=model, args=args, train_dataset=data, eaft_loss=EAFTLoss(chunk_size=1024))
    """
