"""The training sampler: a seeded shuffle per epoch that can start again in the middle of an epoch."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional, Sized

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DistributedSampler

__all__ = ["ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """Shuffles the training set with ``seed + epoch`` (like :class:`DistributedSampler`, which it
    is, so Lightning neither wraps nor replaces it under DDP and calls :meth:`set_epoch` each epoch)
    and, after :meth:`load_state_dict`, skips the samples this rank consumed before the checkpoint.

    The order depends only on the seed, the epoch, the dataset length and the number of ranks, not
    on the global RNG: a resumed run sees the same batches as an uninterrupted one.

    Args:
        dataset: The training examples (only their number is read).
        num_replicas: Number of ranks (``trainer.world_size``).
        rank: This rank (``trainer.global_rank``).
        seed: Seed of the shuffle; ``None`` takes ``seed_everything``'s (``PL_GLOBAL_SEED``), else 0.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: Optional[int] = None) -> None:
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._resume_epoch: Optional[int] = None
        self._resume_skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip = self._resume_skip if self._resume_epoch == self.epoch else 0
        self._resume_epoch, self._resume_skip = None, 0  # only the epoch that was interrupted is cut
        return iter(indices[skip:])

    def state_dict(self, consumed_samples: int) -> Dict[str, Any]:
        """The position after ``consumed_samples`` samples of the current epoch on this rank."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed_samples": consumed_samples,
            "dataset_size": len(self.dataset),
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state``: the same seed, and the next :meth:`__iter__` of its epoch skips the
        samples already consumed (an epoch consumed to the end resumes at the next epoch)."""
        size, replicas = len(self.dataset), self.num_replicas
        if state["dataset_size"] != size or state["num_replicas"] != replicas:
            rank_zero_warn(
                f"resuming with {size} training examples on {replicas} rank(s) where the checkpoint had "
                f"{state['dataset_size']} on {state['num_replicas']}: the shuffle differs, so the rest of the "
                "interrupted epoch is not the data the original run would have seen (examples may repeat or be skipped)"
            )
        self.seed = state["seed"]
        epoch, skip = state["epoch"], state["consumed_samples"]
        if skip >= self.num_samples:
            epoch, skip = epoch + 1, 0
        self.set_epoch(epoch)
        self._resume_epoch, self._resume_skip = epoch, skip
