"""Checkpoint files written so that a kill during a save never leaves a truncated one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from eaft_pl.fileio import atomic_write

__all__ = ["AtomicCheckpointIO"]


def _save_synced(checkpoint: Dict[str, Any], path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it visible


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its own folder, syncs it to disk and renames
    it onto the target (:func:`eaft_pl.fileio.atomic_write`): the file at the target (``last.ckpt``
    included, which ModelCheckpoint writes through this plugin) is always a complete checkpoint, the
    previous one or the new one; a failed or killed save leaves no temporary file behind (a SIGKILL
    can leave one named ``.<name>.*<suffix>``, never at the target).

    Lightning's own ``TorchCheckpointIO`` serialises to memory first (a second copy of every tensor)
    and moves a file from the system temporary folder, which is a copy when that folder is on
    another filesystem. Local paths only; a remote (``s3://``...) path falls back to Lightning's.
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        target = Path(str(path).removeprefix("file://"))
        atomic_write(target, lambda tmp: _save_synced(checkpoint, tmp))
