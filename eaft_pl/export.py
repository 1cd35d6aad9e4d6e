"""Writing a trained model as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained``
loads without eaft-pl or peft: full fine-tuning saves the model as it is, LoRA saves the base with the
adapters merged in (and, on request, the adapters alone under ``adapter/``, PEFT's format).

Used by :class:`eaft_pl.callbacks.SaveHFModel` at the end of training and by ``eaft-pl export``
(:meth:`eaft_pl.analyze.EAFTTrainer.export`) on a finished checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from eaft_pl.lora import is_peft_model

__all__ = ["export_hf_folder", "merged_copy", "load_module_checkpoint", "ADAPTER_SUBDIR"]

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
            :func:`eaft_pl.sharded.gather_full_model` makes under FSDP. Being a copy, it is merged in
            place (no second copy) and unusable afterwards.
    """
    if module.model is None:
        raise ValueError("export: the model is not built (call configure_model or build_model first)")
    private = model is not None and model is not module.model
    output = Path(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        model = model if private else module.model
        if is_peft_model(model):
            if save_adapter:  # before merging: a merged copy has no adapters left
                model.save_pretrained(tmp / ADAPTER_SUBDIR)
            (model.merge_and_unload() if private else merged_copy(model)).save_pretrained(tmp)
        else:
            if save_adapter:
                raise ValueError("export: save_adapter needs a LoRA model (model.init_args.lora)")
            model.save_pretrained(tmp)
        module.tokenizer.save_pretrained(tmp)
        shutil.rmtree(output, ignore_errors=True)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
