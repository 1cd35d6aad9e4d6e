"""eaft-pl: Entropy-Adaptive Fine-Tuning experiments with PyTorch Lightning."""

__version__ = "0.1.0"

from eaft_pl.data import ChatDataModule, ChatJsonlDataModule
from eaft_pl.losses import dft_loss, eaft_loss, sft_loss
from eaft_pl.module import EAFTModule

__all__ = ["ChatDataModule", "ChatJsonlDataModule", "EAFTModule", "dft_loss", "eaft_loss", "sft_loss"]
