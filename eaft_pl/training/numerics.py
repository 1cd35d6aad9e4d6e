"""Non-finite training steps: detect a NaN/inf loss or gradient cheaply, describe the step that had it.

:class:`eaft_pl.module.EAFTModule` uses these to skip such a step (every gradient set to ``None``, so
AdamW leaves the weights and its moments and step counts as they were) and to stop once more than
``max_skipped_steps`` steps were skipped. The functions import nothing from Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["NonFiniteStepError", "MicroBatchRecord", "NonFiniteStepGuard", "all_finite", "describe_nonfinite_step"]


class NonFiniteStepError(RuntimeError):
    """Training stopped: more optimizer steps had a non-finite loss or gradient than allowed."""


@dataclass
class MicroBatchRecord:
    """What a step needs to name a micro-batch whose loss was not finite.

    Attributes:
        batch_idx: Lightning's index of the micro-batch in its epoch.
        loss_finite: 0-dim bool tensor (left on the device: reading it would sync every micro-batch).
        sources: The examples' ``file:line`` (the ``"sources"`` entry the DataModules' collate functions add).
    """

    batch_idx: int
    loss_finite: Tensor
    sources: Optional[List[str]] = field(default=None)


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor, True when every element of every tensor is finite.

    One fused max-abs per tensor (``torch._foreach_norm`` with ``ord=inf``; grouped by device and dtype
    into few kernels) and one reduction, no host sync. The max-abs norm never overflows for finite
    values (an L2 norm of large finite gradients could) and propagates NaN.

    FSDP2's DTensor gradients are checked shard by shard (this rank's part): the caller combines the
    ranks' answers, and a DTensor answer could not go through a plain all-reduce.
    """
    if not tensors:
        return torch.tensor(True)
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # DTensor -> this rank's shard
    norms = torch._foreach_norm(tensors, float("inf"))
    return torch.isfinite(torch.stack(norms)).all()  # stack promotes bf16/fp32 norms to one dtype


def describe_nonfinite_step(
    global_step: int,
    epoch: int,
    records: Sequence[MicroBatchRecord],
    rank: int,
    world_size: int,
    skipped: int,
    limit: int,
) -> str:
    """The message of a skipped step: which step, which micro-batches (and examples) had a non-finite
    loss, or that the loss was finite and a gradient was not, and what to do."""
    bad = [r for r in records if not bool(r.loss_finite)]
    batches = ", ".join(str(r.batch_idx) for r in records) or "none"
    if bad:
        parts = []
        for r in bad:
            where = f"batch {r.batch_idx}"
            if r.sources:
                where += f" (examples {', '.join(r.sources[:8])})"
            parts.append(where)
        what = f"non-finite loss in {'; '.join(parts)}"
    else:
        what = f"finite loss but a non-finite gradient (the step's micro-batches: batch {batches})"
        if world_size > 1:
            what = f"a non-finite loss or gradient on another rank, or a non-finite gradient here (batch {batches})"
    rank_note = f" on rank {rank} of {world_size}" if world_size > 1 else ""
    return (
        f"optimizer step {global_step} (epoch {epoch}){rank_note}: {what}; step skipped "
        f"({skipped} skipped so far, model.init_args.max_skipped_steps={limit}). Check those examples, lower "
        "model.init_args.learning_rate or set trainer.gradient_clip_val; bf16-mixed is more robust than fp16"
    )


class NonFiniteStepGuard:
    """Decides, once per optimizer step, whether the step is skipped for a non-finite loss or gradient,
    and stops training once more than ``max_skipped`` steps were.

    :meth:`record` each micro-batch's loss (no host sync), then call :meth:`step_is_bad` before the
    optimizer step; on True, :meth:`skip` clears the gradients and returns the message to warn with,
    and :meth:`stop_if_exhausted` raises :class:`NonFiniteStepError` once past the limit. Every rank
    takes the same decision (the flag is summed over ranks), so none waits for another in the next
    collective.

    Args:
        max_skipped: Steps that may be skipped before training stops (0: stop at the first).
    """

    def __init__(self, max_skipped: int) -> None:
        self.max_skipped = max_skipped
        #: Steps skipped so far in the run (kept across a resume through the checkpoint).
        self.skipped = 0
        self._records: List[MicroBatchRecord] = []

    def record(self, batch_idx: int, loss: Tensor, sources: Optional[List[str]] = None) -> None:
        """Keep a micro-batch's finiteness as a device flag, read only if the step's check fails."""
        self._records.append(MicroBatchRecord(batch_idx, torch.isfinite(loss.detach()), sources))

    def step_is_bad(self, grads: Sequence[Tensor], *, check_grads: bool, reduce_sum: Callable[[Tensor], Tensor], device: Any) -> bool:
        """Whether any rank's loss (or, with ``check_grads``, gradient) of this step is non-finite.
        One host sync. ``check_grads`` is False under a GradScaler (fp16), whose inf gradients are
        routine overflow that the scaler skips itself: counting them would count them twice."""
        finite = torch.stack([r.loss_finite for r in self._records]).all() if self._records else torch.tensor(True)
        if check_grads:
            finite = finite & all_finite(grads)
        bad = bool(reduce_sum((~finite).to(device=device, dtype=torch.float32)).item())
        if not bad:
            self._records = []
        return bad

    def skip(self, params: Sequence[torch.nn.Parameter], *, global_step: int, epoch: int, rank: int, world_size: int) -> str:
        """Count the step as skipped and set every gradient to None, so AdamW moves no weight, moment
        or step count; return the message naming the step and its batches."""
        records, self._records = self._records, []
        self.skipped += 1
        for p in params:
            p.grad = None
        return describe_nonfinite_step(global_step, epoch, records, rank, world_size, self.skipped, self.max_skipped)

    def stop_if_exhausted(self, message: str) -> None:
        """Raise :class:`NonFiniteStepError` with ``message`` once more steps were skipped than allowed."""
        if self.skipped > self.max_skipped:
            raise NonFiniteStepError(f"training stopped after {self.skipped} skipped steps; last: {message}")
