"""Step-level token normalisation: the loss of an optimizer step is ``sum(w * CE) / N``, where N counts
the supervised tokens of every micro-batch of the step on every rank.

Under gradient accumulation a mean per micro-batch would weight the tokens of short micro-batches
more (the accumulation bug that Hugging Face ``Trainer`` fixed with ``num_items_in_batch`` in 2024).
N is only known once the step's last micro-batch has run, so each micro-batch returns its weighted
sum over a fixed divisor and the gradients are rescaled once, before clipping and the optimizer
step. The backends (Lightning's strategy) come in as two reductions, so the arithmetic is tested
without one.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

__all__ = ["StepNormalizer", "scale_gradients"]

#: A sum or max over the ranks (the identity on one process), returning a tensor.
Reduce = Callable[[Tensor], Tensor]


def scale_gradients(params: Iterable[torch.nn.Parameter], scale: float) -> None:
    """Multiply every existing gradient by ``scale`` in place, in a few fused kernels."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        # A python float keeps the scale exact for bf16 gradients (a bf16 tensor would round it).
        torch._foreach_mul_(grads, scale)


class StepNormalizer:
    """The state of one optimizer step's normalisation: its tokens so far and the fixed divisor.

    Use :meth:`micro_batch_loss` in each training step and :meth:`gradient_scale` before the
    optimizer step. The divisor is fixed by the run's first micro-batch and must be kept across a
    resume (``divisor`` goes into the checkpoint) so a resumed run rounds exactly as an
    uninterrupted one.
    """

    def __init__(self) -> None:
        #: Supervised tokens of the step being accumulated on this rank; None once the step is
        #: normalised already (a step of one micro-batch divides its loss directly).
        self.step_tokens: Optional[int] = 0
        #: The constant that micro-batch losses are divided by (0 until the first micro-batch).
        self.divisor = 0.0

    def micro_batch_loss(
        self, weighted_sum: Tensor, num_tokens: int, *, accumulate: int, world_size: int, reduce_sum: Reduce, reduce_max: Reduce
    ) -> Tensor:
        """The loss to backpropagate for one micro-batch of ``num_tokens`` supervised tokens."""
        if accumulate == 1:
            # The step is this one micro-batch: its global token count is known now, so divide by it
            # and spare gradient_scale a pass over every gradient. DDP averages the gradients over
            # ranks, hence the factor world_size.
            self.step_tokens = None
            if world_size == 1:
                return weighted_sum / max(num_tokens, 1)
            tokens = reduce_sum(torch.tensor(float(num_tokens), device=weighted_sum.device))  # no host sync
            return weighted_sum * world_size / tokens.clamp(min=1.0)
        self.step_tokens = (self.step_tokens or 0) + num_tokens
        # Any constant divisor is undone exactly in gradient_scale; one near a micro-batch's token
        # count keeps the backward pass at the magnitude of a mean (fp16 loss scaling cares). It must
        # be the same on every rank, hence the reduction (once, on the first micro-batch).
        if self.divisor == 0.0:
            first = torch.tensor(float(max(num_tokens, 1)), device=weighted_sum.device)
            self.divisor = float(reduce_max(first))
        return weighted_sum / self.divisor

    def gradient_scale(self, *, accumulate: int, world_size: int, reduce_sum: Reduce, device: torch.device) -> Optional[float]:
        """The factor that turns the accumulated gradients into those of ``sum(w * CE) / N``, or None
        when the step was normalised in :meth:`micro_batch_loss` already. Resets the step."""
        tokens, self.step_tokens = self.step_tokens, 0
        if tokens is None:
            return None
        # Lightning divided every micro-batch loss by accumulate_grad_batches and DDP/FSDP averaged the
        # gradients over ranks: undo both (and the divisor) and divide by the step's global tokens.
        total = float(reduce_sum(torch.tensor(float(tokens), device=device)))
        return self.divisor * accumulate * world_size / max(total, 1.0)
