"""eaft-pl: Entropy-Adaptive Fine-Tuning experiments with PyTorch Lightning.

The top level is lazy: ``import eaft_pl`` (or ``eaft_pl.loss``) does not import Lightning, so the
loss functions can be used from other trainers. ``eaft_pl.EAFTModule`` and the DataModules are loaded
on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eaft_pl import _moved
from eaft_pl._lazy import lazy_exports

__version__ = "0.1.0"

# name -> module that defines it; imported on first access (PEP 562).
_LAZY = {
    "EAFTModule": "eaft_pl.module",
    "ChatDataModule": "eaft_pl.data.base",
    "ChatJsonlDataModule": "eaft_pl.data.jsonl",
    "HFChatDataModule": "eaft_pl.data.hf",
    "sft_loss": "eaft_pl.loss.functional",
    "eaft_loss": "eaft_pl.loss.functional",
    "dft_loss": "eaft_pl.loss.functional",
}

__all__ = sorted(_LAZY)

_moved.install()

if TYPE_CHECKING:  # pragma: no cover
    from eaft_pl.data.base import ChatDataModule
    from eaft_pl.data.hf import HFChatDataModule
    from eaft_pl.data.jsonl import ChatJsonlDataModule
    from eaft_pl.loss.functional import dft_loss, eaft_loss, sft_loss
    from eaft_pl.module import EAFTModule


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
