"""Writing a trained model as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained``
loads without eaft-pl or peft: full fine-tuning saves the model as it is, LoRA saves the base with the
adapters merged in (and, on request, the adapters alone under ``adapter/``, PEFT's format).

Used by :class:`SaveHFModel` (below) at the end of training and by ``eaft-pl export``
(:meth:`eaft_pl.cli.EAFTTrainer.export`) on a finished checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn

from eaft_pl.fileio import atomic_directory
from eaft_pl.tracking import mlflow_loggers
from eaft_pl.training.lora import is_peft_model
from eaft_pl.training.sharded import gather_full_model, refuse_unsupported_sharding

__all__ = ["export_hf_folder", "merged_copy", "load_module_checkpoint", "SaveHFModel", "ADAPTER_SUBDIR"]

#: Where the adapters go inside the exported folder with ``save_adapter``.
ADAPTER_SUBDIR = "adapter"


def merged_copy(peft_model: nn.Module) -> nn.Module:
    """A CPU copy of a PEFT model with its adapters merged into the base weights (the plain
    ``transformers`` model). The trained model is untouched: no merge/unmerge round trip rounds its
    bf16 weights, and no second copy is made on the accelerator."""
    # deepcopy takes tensors found in its memo as already copied: pre-seeding it with CPU copies of the
    # weights makes it rebuild the module tree around them. copy=True also copies CPU tensors, which
    # the merge below would otherwise change in place.
    memo: Dict[int, Any] = {}
    for tensor in itertools.chain(peft_model.parameters(), peft_model.buffers()):
        cpu = tensor.detach().to("cpu", copy=True)
        memo[id(tensor)] = nn.Parameter(cpu, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else cpu
    clone = copy.deepcopy(peft_model, memo)
    return clone.merge_and_unload()


def export_hf_folder(
    module: Any, output_dir: Union[str, Path], save_adapter: bool = False, model: Optional[nn.Module] = None
) -> Path:
    """Write ``module.model`` (merged when it carries LoRA adapters) and ``module.tokenizer`` to
    ``output_dir`` with ``save_pretrained``. The folder is written under a temporary name next to it
    and renamed, so it is complete or absent; an existing folder is replaced.

    Args:
        module: An :class:`~eaft_pl.module.EAFTModule` whose model is built.
        output_dir: The folder to write.
        save_adapter: With LoRA, also write the adapters alone (PEFT's ``save_pretrained``) under
            ``<output_dir>/adapter``.
        model: What to write instead of ``module.model``: a private copy of it, such as
            :func:`eaft_pl.training.sharded.gather_full_model` makes under FSDP. Being a copy, it is merged in
            place (no second copy) and unusable afterwards.
    """
    if module.model is None:
        raise ValueError("export: the model is not built (call configure_model or build_model first)")
    private = model is not None and model is not module.model
    model = model if private else module.model

    def write(tmp: Path) -> None:
        if is_peft_model(model):
            if save_adapter:  # before merging: a merged copy has no adapters left
                model.save_pretrained(tmp / ADAPTER_SUBDIR)
            (model.merge_and_unload() if private else merged_copy(model)).save_pretrained(tmp)
        else:
            if save_adapter:
                raise ValueError("export: save_adapter needs a LoRA model (model.init_args.lora)")
            model.save_pretrained(tmp)
        module.tokenizer.save_pretrained(tmp)

    output = atomic_directory(Path(output_dir), write)
    return output


def load_module_checkpoint(module: Any, ckpt_path: Union[str, Path]) -> None:
    """Build ``module``'s model (without the reference pass) and load the model weights of a Lightning
    checkpoint into it, adapter-only LoRA checkpoints included (their base comes from
    ``model_name_or_path``). Other entries (metrics, optimizer) are ignored."""
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"export: --ckpt_path {ckpt_path} is not a file")
    module.build_model(reference=False)
    # weights_only, as Lightning loads a checkpoint to resume: tensors and plain containers, no pickled
    # code (a CLI run stores its hyperparameters as plain values).
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module.on_load_checkpoint(checkpoint)
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        module.model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"export: {ckpt_path} does not fit the model of this config (same model.init_args.model_name_or_path / "
            f"model_config and lora as the run that wrote it?): {error}"
        ) from error


class SaveHFModel(pl.Callback):
    """At the end of training, writes the model and its tokenizer as a Hugging Face folder
    (``save_pretrained``) that ``AutoModelForCausalLM.from_pretrained`` (or ``model_name_or_path``)
    loads. A LoRA model is written with its adapters merged into the base weights, so the folder needs
    no peft; the training model is left as it is. The folder is written under a temporary name and
    renamed, so it is complete or absent, and replaced if it exists. Rank zero writes it; under FSDP
    every rank first helps gather the full weights into a CPU copy on rank zero
    (:func:`eaft_pl.training.sharded.gather_full_model`), and the ranks leave the hook once the folder exists.

    Args:
        dirpath: Folder to write; by default ``hf`` next to the run's checkpoint folder
            (``<root>/<experiment id>/<run id>/hf`` with the MLflow logger), so every run keeps its own.
        save_adapter: With LoRA, also write the adapters alone (PEFT's format) under
            ``<dirpath>/adapter``.
    """

    def __init__(self, dirpath: Optional[str] = None, save_adapter: bool = False) -> None:
        self.dirpath = dirpath
        self.save_adapter = save_adapter

    def resolve_dirpath(self, trainer: pl.Trainer) -> str:
        """The folder this run writes: ``dirpath``, or ``hf`` beside the checkpoint folder."""
        if self.dirpath is not None:
            return self.dirpath
        ckpt_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
        if ckpt_dir:
            return os.path.join(os.path.dirname(os.path.normpath(ckpt_dir)), "hf")
        return os.path.join(trainer.default_root_dir, "hf")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Refused before training rather than after it: DeepSpeed ZeRO shards cannot be
        # gathered into the folder (export the Lightning checkpoint with `eaft-pl export` instead).
        if stage == "fit":
            refuse_unsupported_sharding(trainer.strategy, "SaveHFModel")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = gather_full_model(trainer.strategy, pl_module.model, device="cpu")  # a collective under FSDP
        if model is not None:
            dirpath = self.resolve_dirpath(trainer)
            export_hf_folder(pl_module, dirpath, save_adapter=self.save_adapter, model=model)
            del model  # the FSDP copy: free it before the other callbacks run
            for logger in mlflow_loggers(trainer):
                logger.experiment.set_tag(logger.run_id, "hf_model_dir", os.path.abspath(dirpath))
        trainer.strategy.barrier("save_hf_model")  # the folder exists when any rank goes on
