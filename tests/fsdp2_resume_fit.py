"""Resuming a LoRA fit on a base loaded from ``model_name_or_path`` under
:class:`~eaft_pl.training.fsdp2.FSDP2Strategy` (2 CPU processes over gloo), for tests/test_sharded.py.

``python tests/fsdp2_resume_fit.py OUT_DIR BASE_DIR TRAIN_FILE [dist|file]`` fits 4 steps straight,
2 steps with a checkpoint, then resumes that checkpoint to 4; rank zero writes the trained weights of
both 4-step runs (gathered whole) and the checkpoint's keys to ``OUT_DIR/result.pt``. ``dist``: the
strategy's sharded checkpoint folder; ``file``: one file assembled on rank zero.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_fit import InOrderData  # noqa: E402
from eaft_pl import EAFTModule  # noqa: E402
from eaft_pl.training.fsdp2 import FSDP2Strategy  # noqa: E402

LORA = {"r": 2, "alpha": 4.0, "dropout": 0.0}  # no dropout: the resumed run's RNG stream needs no restoring


def fit(out: Path, base: Path, train: Path, steps: int, name: str, distributed: bool, ckpt_path=None):
    pl.seed_everything(0)
    module = EAFTModule(model_name_or_path=str(base), lora=LORA, learning_rate=1e-3, warmup_ratio=0.0, min_lr_ratio=1.0)
    data = InOrderData(train_file=str(train), tokenizer_name_or_path=str(base), batch_size=2)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=2, strategy=FSDP2Strategy(save_distributed_checkpoint=distributed),
        logger=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[ModelCheckpoint(dirpath=out / name, save_last=True)],
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, trained(module)


def trained(module) -> Dict[str, torch.Tensor]:
    """The trainable weights, whole (``full_tensor`` is a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in module.model.named_parameters() if p.requires_grad
    }


if __name__ == "__main__":
    out, base, train = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    distributed = sys.argv[4:] != ["file"]
    _, straight = fit(out, base, train, 4, "straight", distributed)
    fit(out, base, train, 2, "first", distributed)
    trainer, resumed = fit(out, base, train, 4, "resumed", distributed, ckpt_path=str(out / "first" / "last.ckpt"))
    if trainer.is_global_zero:
        ckpt = out / "first" / "last.ckpt"
        if ckpt.is_dir():
            from torch.distributed.checkpoint import FileSystemReader

            keys = sorted(k[len("state_dict.") :] for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("state_dict."))
        else:
            keys = sorted(torch.load(ckpt, weights_only=True)["state_dict"])
        torch.save({"straight": straight, "resumed": resumed, "checkpoint_keys": keys}, out / "result.pt")
