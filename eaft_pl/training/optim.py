"""The optimiser of the paper's recipes: AdamW with decoupled weight decay on matrices only, and a
linear-warmup cosine schedule stepped once per optimizer step."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Sequence

import torch

__all__ = ["warmup_cosine", "adamw_warmup_cosine"]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup from 0 to 1 over ``warmup_steps``, then a cosine decay
    to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_warmup_cosine(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    betas: Sequence[float],
    eps: float,
    total_steps: int,
    warmup_ratio: float,
    min_lr_ratio: float,
) -> Dict[str, Any]:
    """AdamW over the trainable ``params`` and its schedule, as Lightning's ``configure_optimizers``
    returns them. Only matrices decay: decaying norm gains and biases towards 0 hurts (and is not
    what Hugging Face ``Trainer`` does)."""
    trainable = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    total = max(1, int(total_steps))
    warmup = int(round(warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup, min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
