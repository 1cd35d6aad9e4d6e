"""A whole, ordinary copy of a model that a sharded strategy splits over the ranks, for the work that
rank zero does alone: writing the Hugging Face folder, evaluating between optimizer steps.

Under FSDP each rank holds a slice of every weight, so ``pl_module.model`` on rank zero is not a model
one can save or run: its parameters are shards (FSDP1's flat parameters, FSDP2's DTensors), and a
forward pass there would wait for the other ranks' all-gathers forever. :func:`gather_full_model`
builds a plain copy instead: the model's own classes (and PEFT wrapper) instantiated on the meta
device, then filled with the full weights that
``torch.distributed.checkpoint.state_dict.get_model_state_dict(StateDictOptions(full_state_dict=True,
cpu_offload=True))`` assembles on rank zero, the same call for FSDP1 (Lightning's ``FSDPStrategy``,
:class:`~eaft_pl.training.strategies.DecoderLayerFSDPStrategy`) and FSDP2 (``ModelParallelStrategy``,
:class:`~eaft_pl.training.fsdp2.FSDP2Strategy`). Every rank takes part in the gathers; rank zero gets
the copy.

Memory (rank zero): the full weights once in CPU memory (``cpu_offload``: only rank zero keeps them,
the other ranks keep nothing), moved into the copy on ``device`` one tensor at a time (each gathered
tensor is dropped once copied, so the two together hold about one model). While a weight is
gathered, every rank holds that one weight in full on its accelerator. No random initialisation is
spent on the copy. Before, units were gathered one at a time straight onto ``device``, with no CPU
memory; the CPU now holds the model once on the way.

Buffers: those a state dict leaves out (non-persistent, as the rotary ``inv_freq``) are whole on
every rank and are copied from rank zero's model as training holds them (float32 under
``DecoderLayerFSDPStrategy``, whose precision plugin keeps them so; bf16 under Lightning's plain
``FSDPStrategy`` with ``bf16-mixed``), so the copy computes what the sharded model computes; the
others come with the state dict.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from eaft_pl.training.lora import is_peft_model, require_peft

__all__ = ["gather_full_model", "unwrapped_name", "refuse_unsupported_sharding"]

# What FSDP and its activation-checkpoint wrapper insert into parameter names.
_WRAPPER_PARTS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def unwrapped_name(name: str) -> str:
    """``name`` (a parameter, buffer or module path) without FSDP's and the checkpoint wrapper's parts,
    i.e. the name the same tensor has in the unwrapped model."""
    return _WRAPPER_PARTS.sub("", name)


def refuse_unsupported_sharding(strategy: Any, what: str) -> None:
    """Raise when ``strategy`` shards the model in a way :func:`gather_full_model` cannot gather
    (DeepSpeed ZeRO); ``what`` names the caller."""
    name = type(strategy).__name__
    if "DeepSpeed" in name:
        raise ValueError(
            f"{what} needs the whole model on rank zero and cannot gather it under {name} (FSDP and FSDP2 are "
            "supported); use DDP, DecoderLayerFSDPStrategy or FSDP2Strategy, or evaluate/export a checkpoint after training"
        )


def _sharded_root(strategy: Any) -> Optional[nn.Module]:
    """The root module of ``strategy`` when FSDP1 (``FullyShardedDataParallel``) or FSDP2
    (``fully_shard``) shards it, else None."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    root = getattr(strategy, "model", None)
    if root is None or not any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in root.modules()):
        return None
    return root


def _offload(strategy: Any, root: nn.Module) -> bool:
    """``cpu_offload`` for the full state dict: True, except for FSDP1 on a CPU device (gloo runs,
    tests). There torch's FSDP1 (2.13) "offloads" the gathered CPU weights without a copy, frees them
    and then clones them: a segfault. Without offload every rank assembles the full weights (rank
    zero keeps them); on a CPU, where nothing needs to leave an accelerator, that is the only cost."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp1 = any(isinstance(m, FullyShardedDataParallel) for m in root.modules())
    return not (fsdp1 and torch.device(strategy.root_device).type == "cpu")


def _meta_structure(model: nn.Module) -> nn.Module:
    """A new model of the same classes and configuration as ``model`` (a Hugging Face model, or a PEFT
    model around one), every tensor on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        if is_peft_model(model):
            peft = require_peft()
            base = _meta_structure(model.get_base_model())
            configs = list(model.peft_config.items())
            first, config = configs[0]
            clone = peft.PeftModel(base, config, adapter_name=first)
            for name, config in configs[1:]:
                clone.add_adapter(name, config)
            clone.set_adapter(model.active_adapter)
            return clone
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"gather_full_model: {type(model).__name__} has no Hugging Face config to rebuild it from")
        return _unsharded_class(model)(config)


def _unsharded_class(model: nn.Module) -> type:
    """The model's own class: ``fully_shard`` (FSDP2) swaps a module's class for a subclass
    (``FSDPLlamaForCausalLM``), which a copy must not be (its ``save_pretrained`` would write that
    name into ``config.json``'s architectures)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


class _Filler:
    """Puts gathered tensors into the meta copy by name, keeping tied weights tied (a tensor the copy
    holds under two names is created once and put in both places)."""

    def __init__(self, clone: nn.Module, device: torch.device, dtype: Optional[torch.dtype]) -> None:
        self.clone, self.device, self.dtype = clone, device, dtype
        self.made: Dict[int, Tensor] = {}  # id of the meta placeholder -> its replacement

    def put(self, name: str, source: Tensor, only_if_missing: bool = False) -> None:
        """Put ``source`` at ``name`` (a parameter or buffer of the copy); with ``only_if_missing``,
        only where the copy still holds a meta placeholder."""
        owner_path, _, attr = name.rpartition(".")
        try:
            owner = self.clone.get_submodule(owner_path)
        except AttributeError as error:
            raise ValueError(f"gather_full_model: the gathered {name!r} has no place in a rebuilt {type(self.clone).__name__}") from error
        is_parameter = attr in owner._parameters
        table = owner._parameters if is_parameter else owner._buffers
        if attr not in table:
            raise ValueError(f"gather_full_model: the gathered {name!r} has no place in a rebuilt {type(self.clone).__name__}")
        placeholder = table[attr]
        if only_if_missing and not (placeholder is not None and placeholder.is_meta and id(placeholder) not in self.made):
            return
        if placeholder is None or id(placeholder) not in self.made:
            dtype = self.dtype if self.dtype is not None and source.is_floating_point() else source.dtype
            data = source.detach().to(self.device, dtype, copy=True)
            requires_grad = bool(getattr(placeholder, "requires_grad", False)) and is_parameter
            made = nn.Parameter(data, requires_grad=requires_grad) if is_parameter else data
            if placeholder is not None:
                self.made[id(placeholder)] = made
        else:
            made = self.made[id(placeholder)]
        table[attr] = made

    def check_complete(self) -> None:
        """Raise if a weight of the copy was never gathered (a model the rebuild does not match)."""
        tensors = list(self.clone.named_parameters(remove_duplicate=False)) + list(self.clone.named_buffers(remove_duplicate=False))
        missing = [name for name, tensor in tensors if tensor.is_meta]
        if missing:
            raise ValueError(f"gather_full_model: no gathered weight for {missing[:5]} ({len(missing)} in all)")


def _prefix_of(root: nn.Module, model: nn.Module) -> str:
    """The unwrapped path of ``model`` inside ``root`` with a trailing dot ("" for the root itself)."""
    for name, module in root.named_modules():
        if module is model:
            return unwrapped_name(name + ".") if name else ""
    raise ValueError(f"gather_full_model: the {type(model).__name__} is not part of the strategy's wrapped model")


def gather_full_model(
    strategy: Any,
    model: nn.Module,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> Optional[nn.Module]:
    """The whole ``model`` on rank zero, ``None`` on the other ranks. Call it on EVERY rank (under FSDP
    it runs collectives; a rank that skips it leaves the others waiting).

    - FSDP1 (Lightning's ``FSDPStrategy`` and :class:`~eaft_pl.training.strategies.DecoderLayerFSDPStrategy`)
      and FSDP2 (``ModelParallelStrategy`` / :class:`~eaft_pl.training.fsdp2.FSDP2Strategy`): rank
      zero gets a new model of the same classes (PEFT wrapper and adapters included) holding the full
      current weights, gathered by ``get_model_state_dict(StateDictOptions(full_state_dict=True,
      cpu_offload=True))``, in eval mode; the training model is not touched. Drop the copy when done.
    - Unsharded strategies (single device, DDP): the model itself on rank zero; no copy, ``device`` and
      ``dtype`` are ignored.
    - DeepSpeed: a ``ValueError`` (see :func:`refuse_unsupported_sharding`).

    Call it outside the training step (a callback hook such as ``on_train_start``,
    ``on_train_batch_end`` or ``on_train_end``): FSDP refuses to gather during forward or backward.

    Args:
        strategy: ``trainer.strategy``.
        model: The model to gather, e.g. ``pl_module.model`` (must sit inside ``strategy.model``).
        device: Where the copy lives (default: the strategy's root device, where evaluation runs;
            ``"cpu"`` for writing to disk).
        dtype: Floating-point dtype of the copy (default: each weight's training dtype; e.g.
            ``torch.bfloat16`` halves the copy of a model trained in fp32).
    """
    refuse_unsupported_sharding(strategy, "gather_full_model")
    root = _sharded_root(strategy)
    if root is None:
        return model if strategy.is_global_zero else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    prefix = _prefix_of(root, model)
    # Every rank: collectives, one weight at a time. cpu_offload: rank zero alone keeps the full
    # tensors, on the CPU; the other ranks get an empty mapping.
    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=_offload(strategy, root)))
    if not strategy.is_global_zero:
        return None
    filler = _Filler(_meta_structure(model), torch.device(device or strategy.root_device), dtype)
    with torch.no_grad():
        while state:  # each full tensor dropped once copied: one model's worth of memory at a time
            name, tensor = state.popitem()
            name = unwrapped_name(name)
            if name.startswith(prefix):
                filler.put(name[len(prefix) :], tensor)
        for name, buffer in model.named_buffers(remove_duplicate=False):  # those the state dict leaves out
            filler.put(unwrapped_name(name), buffer, only_if_missing=True)
    filler.check_complete()
    return filler.clone.eval()
