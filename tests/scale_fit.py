"""A short recorded `fit` for the scale-out tests: the logged loss of every optimizer step, the
gradients the optimizer sees (DDP) and the final weights, written by rank 0 to one file.

Also a script: ``python tests/scale_fit.py OUT.pt TOKENIZER_DIR TRAIN_FILE CLIP [fsdp|fsdp2]`` runs the
same fit under :class:`~eaft_pl.training.strategies.DecoderLayerFSDPStrategy` (or
:class:`~eaft_pl.training.fsdp2.FSDP2Strategy`) on 2 CPU processes. FSDP launches its
ranks by re-running the script (Lightning's subprocess launcher), which a pytest process cannot be.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import TINY_LLAMA  # noqa: E402
from eaft_pl import ChatJsonlDataModule, EAFTModule  # noqa: E402
from eaft_pl.loss.gates import EAFTGate  # noqa: E402
from eaft_pl.training.sharded import unwrapped_name  # noqa: E402

# Supervised tokens per example: 3, 4, 32, 62 | 5, 12, 22, 42. Two ranks take the even and the odd
# examples: 35 against 66 tokens in step 1, 27 against 54 in step 2, so per-rank means differ from
# the global mean.
RECORDS = [
    {"prompt": "a", "response": "1"},
    {"prompt": "b", "response": "22"},
    {"prompt": "c", "response": "x" * 30},
    {"prompt": "d", "response": "y" * 60},
    {"prompt": "e", "response": "333"},
    {"prompt": "f", "response": "z" * 10},
    {"prompt": "g", "response": "w" * 20},
    {"prompt": "h", "response": "v" * 40},
]
STEPS = 2
LOGGED = ("train/loss", "train/ce", "train/tokens")


def write_records(path: Path) -> Path:
    """Write the training chats as JSONL and return the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


class InOrderData(ChatJsonlDataModule):
    """No shuffling: every world size sees the same examples in each optimizer step. Lightning gives
    every distributed training loader a shuffling sampler, so the Trainer needs
    ``use_distributed_sampler=False`` and the ranks take every ``world_size``-th example here."""

    def train_dataloader(self):
        loader = self._loader("train", shuffle=False)
        world = self.trainer.world_size if self.trainer is not None else 1
        if world == 1:
            return loader
        sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn)


class RecordingModule(EAFTModule):
    """Records the logged step metrics and (unsharded strategies) the gradients after eaft-pl's
    rescaling; rank 0 saves them with the final weights to ``record_path`` at the end of fit."""

    record_path: str = ""
    keep_grads: bool = True

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.recorded: Dict[str, Any] = {"logged": [], "grads": [], "initial": self._weights()}
        self.recorded["param_types"] = sorted({type(p).__name__ for p in self.model.parameters()})  # DTensor: FSDP2

    def log_dict(self, dictionary, *args, **kwargs):  # the step's metrics, already reduced over ranks
        if "train/loss" in dictionary:
            self.recorded["logged"].append({k: float(dictionary[k]) for k in LOGGED})
        return super().log_dict(dictionary, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.keep_grads:
            grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
            self.recorded["grads"].append(grads)

    def _weights(self) -> Dict[str, torch.Tensor]:
        """Every weight of the language model, whole. Under FSDP (1 and 2) the shards are gathered (a collective:
        every rank calls this); Lightning's full state dict crashes on CPU tensors in torch 2.13."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        from torch.distributed.tensor import DTensor

        root = self.trainer.strategy.model
        if not isinstance(root, FullyShardedDataParallel):  # FSDP2's shards are DTensors: gathered too
            return {
                n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in self.model.named_parameters()
            }
        with FullyShardedDataParallel.summon_full_params(root, writeback=False):
            return {unwrapped_name(n): p.detach().clone() for n, p in self.model.named_parameters()}

    def on_train_end(self) -> None:
        params = self._weights()
        if self.trainer.is_global_zero:
            torch.save({**self.recorded, "params": params}, self.record_path)


def recorded_fit(
    record_path: Path,
    tokenizer_dir: Path,
    train_file: Path,
    *,
    devices: int = 1,
    strategy: Any = "auto",
    micro_batch: int = 4,
    accumulate: int = 1,
    normalization: str = "step",
    chunk_size: Optional[int] = None,
    gradient_clip_val: Optional[float] = None,
    callbacks: Sequence[pl.Callback] = (),
    lora: Optional[Dict[str, Any]] = None,
    data_class: type = InOrderData,
) -> Dict[str, Any]:
    """Fit ``STEPS`` optimizer steps of the tiny Llama (with ``lora``: LoRA options, its adapters) on
    ``train_file`` and return the record (``logged``: a dict per step, ``grads``: a dict per step,
    ``initial`` and ``params``: the weights before and after)."""
    pl.seed_everything(0)
    module = RecordingModule(
        model_config=TINY_LLAMA,
        tokenizer_name_or_path=str(tokenizer_dir),
        gate=EAFTGate(),
        loss_normalization=normalization,
        chunk_size=chunk_size,
        learning_rate=1e-3,  # large enough that two AdamW steps move every weight visibly
        lora=lora,
    )
    module.record_path = str(record_path)  # instance attributes travel to spawned ranks
    module.keep_grads = "FSDP" not in type(strategy).__name__  # FSDP's (and FSDP2's) are shards
    data = data_class(train_file=str(train_file), tokenizer_name_or_path=str(tokenizer_dir), batch_size=micro_batch)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=gradient_clip_val,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # InOrderData deals the examples itself
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=data)
    return torch.load(record_path) if trainer.is_global_zero else {}


if __name__ == "__main__":  # the FSDP and FSDP2 runs of tests/test_scale.py
    from eaft_pl.training.fsdp2 import FSDP2Strategy
    from eaft_pl.training.strategies import DecoderLayerFSDPStrategy

    out, tokenizer, train, clip = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    strategy = FSDP2Strategy() if sys.argv[5:] == ["fsdp2"] else DecoderLayerFSDPStrategy()
    recorded_fit(Path(out), Path(tokenizer), Path(train), devices=2, strategy=strategy, micro_batch=2, gradient_clip_val=clip)
