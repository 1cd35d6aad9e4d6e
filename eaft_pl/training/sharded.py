"""A whole, ordinary copy of a model that a sharded strategy splits over the ranks, for the work that
rank zero does alone: writing the Hugging Face folder, evaluating between optimizer steps.

Under FSDP each rank holds a slice of every weight, so ``pl_module.model`` on rank zero is not a model
one can save or run: its parameters are flat shards, and a forward pass there would wait for the other
ranks' all-gathers forever. FSDP's ``summon_full_params`` makes the full weights visible but forbids
forward passes inside it, so :func:`gather_full_model` builds a plain copy instead: the model's own
classes (and PEFT wrapper) instantiated on the meta device, then filled, one FSDP unit at a time, with
the unit's gathered weights. Every rank takes part in the gathers; rank zero gets the copy.

Memory (rank zero): the copy itself (every weight once, in its training dtype unless ``dtype`` says
otherwise, on ``device``) plus one FSDP unit's full weights at a time on the accelerator while it is
copied (a decoder layer, or the root unit with the embeddings and the LM head). Nothing is gathered
twice and no random initialisation is spent on the copy. The other ranks hold one unit at a time.
FSDP's ``offload_to_cpu`` is not used: with one unit gathered at a time, the accelerator never holds
more than the largest unit, and each weight goes straight to ``device``. Buffers are copied as the
training model holds them (float32 under ``DecoderLayerFSDPStrategy``, whose precision plugin keeps
them so; bf16 under Lightning's plain ``FSDPStrategy`` with ``bf16-mixed``), so the copy computes
what the sharded model computes.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from eaft_pl.training.lora import is_peft_model, require_peft

__all__ = ["gather_full_model", "unwrapped_name", "refuse_unsupported_sharding"]

# What FSDP and its activation-checkpoint wrapper insert into parameter names.
_WRAPPER_PARTS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")
# FSDP's flattened parameter: the shards themselves, never a model weight.
_FLAT_PARAM = "_flat_param"


def unwrapped_name(name: str) -> str:
    """``name`` (a parameter, buffer or module path) without FSDP's and the checkpoint wrapper's parts,
    i.e. the name the same tensor has in the unwrapped model."""
    return _WRAPPER_PARTS.sub("", name)


def refuse_unsupported_sharding(strategy: Any, what: str) -> None:
    """Raise when ``strategy`` shards the model in a way :func:`gather_full_model` cannot gather
    (DeepSpeed ZeRO, Lightning's ModelParallelStrategy / FSDP2); ``what`` names the caller."""
    name = type(strategy).__name__
    if "DeepSpeed" in name or "ModelParallel" in name:
        raise ValueError(
            f"{what} needs the whole model on rank zero and cannot gather it under {name} (only FSDP is "
            "supported); use DDP or DecoderLayerFSDPStrategy, or evaluate/export a checkpoint after training"
        )


def _fsdp_root(strategy: Any) -> Optional[nn.Module]:
    """The FSDP-wrapped root module of ``strategy``, or None when the model is not wrapped by FSDP."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = getattr(strategy, "model", None)
    if root is None or not any(isinstance(m, FullyShardedDataParallel) for m in root.modules()):
        return None
    return root


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
        return type(model)(config)


def _own_tensors(unit: nn.Module, prefix: str) -> Iterator[Tuple[str, Tensor, bool]]:
    """``(name in the root, tensor, is_parameter)`` of the parameters and buffers that the FSDP unit
    ``unit`` (at ``prefix`` in the root) holds itself, i.e. not those of the FSDP units nested in it."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    pending = [(prefix, unit)]
    while pending:
        path, module = pending.pop()
        for name, param in module.named_parameters(recurse=False):
            if name != _FLAT_PARAM:
                yield path + name, param, True
        for name, buffer in module.named_buffers(recurse=False):
            yield path + name, buffer, False
        for name, child in module.named_children():
            if not isinstance(child, FullyShardedDataParallel):
                pending.append((f"{path}{name}.", child))


class _Filler:
    """Puts gathered tensors into the meta copy by name, keeping tied weights tied (a tensor the copy
    holds under two names is created once and put in both places)."""

    def __init__(self, clone: nn.Module, device: torch.device, dtype: Optional[torch.dtype]) -> None:
        self.clone, self.device, self.dtype = clone, device, dtype
        self.made: Dict[int, Tensor] = {}  # id of the meta placeholder -> its replacement

    def put(self, name: str, source: Tensor, is_parameter: bool) -> None:
        owner_path, _, attr = name.rpartition(".")
        try:
            owner = self.clone.get_submodule(owner_path)
        except AttributeError as error:
            raise ValueError(f"gather_full_model: the gathered {name!r} has no place in a rebuilt {type(self.clone).__name__}") from error
        table = owner._parameters if is_parameter else owner._buffers
        if attr not in table:
            raise ValueError(f"gather_full_model: the gathered {name!r} has no place in a rebuilt {type(self.clone).__name__}")
        placeholder = table[attr]
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

    - FSDP (Lightning's ``FSDPStrategy`` and :class:`~eaft_pl.training.strategies.DecoderLayerFSDPStrategy`): rank
      zero gets a new model of the same classes (PEFT wrapper and adapters included) holding the full
      current weights, in eval mode; the training model is not touched. Drop the copy when done.
    - Unsharded strategies (single device, DDP): the model itself on rank zero; no copy, ``device`` and
      ``dtype`` are ignored.
    - DeepSpeed and ModelParallel: a ``ValueError`` (see :func:`refuse_unsupported_sharding`).

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
    root = _fsdp_root(strategy)
    if root is None:
        return model if strategy.is_global_zero else None
    from torch.distributed.fsdp import FullyShardedDataParallel

    prefix = _prefix_of(root, model)
    zero = strategy.is_global_zero
    filler = _Filler(_meta_structure(model), torch.device(device or strategy.root_device), dtype) if zero else None
    units: List[Tuple[str, nn.Module]] = [(n, m) for n, m in root.named_modules() if isinstance(m, FullyShardedDataParallel)]
    with torch.no_grad():
        for unit_name, unit in units:  # the same units in the same order on every rank: matching collectives
            with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True):
                if filler is None:
                    continue
                for name, tensor, is_parameter in _own_tensors(unit, unit_name + "." if unit_name else ""):
                    name = unwrapped_name(name)
                    if name.startswith(prefix):
                        filler.put(name[len(prefix) :], tensor, is_parameter)
    if filler is None:
        return None
    filler.check_complete()
    return filler.clone.eval()
