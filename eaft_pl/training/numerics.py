"""Non-finite training steps: detect a NaN/inf loss or gradient cheaply, describe the step that had it.

:class:`eaft_pl.module.EAFTModule` uses these to skip such a step (every gradient set to ``None``, so
AdamW leaves the weights and its moments and step counts as they were) and to stop once more than
``max_skipped_steps`` steps were skipped. The functions import nothing from Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["NonFiniteStepError", "MicroBatchRecord", "all_finite", "describe_nonfinite_step"]


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
