"""Adapter-only checkpoints of LoRA runs: the frozen base weights are left out of ``last.ckpt`` (it
shrinks to the adapters and their optimizer state) and put back from ``model_name_or_path`` on load.

A base built from ``model_config`` has random weights that only the checkpoint could restore, so
only runs that reload their base from a path write adapter-only checkpoints.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Set

from torch import nn

from eaft_pl.training.sharded import unwrapped_name

__all__ = ["ADAPTER_ONLY_KEY", "frozen_base_keys", "drop_frozen_base", "restore_frozen_base"]

#: Set in the checkpoints of LoRA runs that leave the frozen base out (its value: the base's path).
ADAPTER_ONLY_KEY = "eaft_adapter_only_base"


def frozen_base_keys(model: nn.Module, keys: Iterable[str]) -> Set[str]:
    """The keys among ``keys`` (a LightningModule state dict's, whose model entries start with
    ``model.``) of the frozen base weights: every model entry but the trainable ones. Parameter
    names are compared without FSDP's wrapper parts, which ``named_parameters`` shows and a state
    dict does not."""
    trainable = {unwrapped_name(n) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k for k in keys if k.startswith("model.") and unwrapped_name(k[len("model.") :]) not in trainable}


def drop_frozen_base(checkpoint: Dict[str, Any], model: nn.Module, base: str) -> None:
    """Remove the frozen base weights from a checkpoint being saved and record where they come from."""
    frozen = frozen_base_keys(model, checkpoint["state_dict"])
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
    checkpoint[ADAPTER_ONLY_KEY] = base


def restore_frozen_base(checkpoint: Dict[str, Any], model: nn.Module, own_state: Mapping[str, Any], adapter_only: bool) -> None:
    """Put the base weights (already loaded from ``model_name_or_path``: ``own_state``) back into an
    adapter-only checkpoint being loaded, so that strict loading still catches a missing or
    unexpected adapter key. ``adapter_only``: whether this run writes such checkpoints itself."""
    if ADAPTER_ONLY_KEY not in checkpoint:
        return
    if not adapter_only:
        raise ValueError(
            f"this checkpoint holds only LoRA adapter weights for the base {checkpoint[ADAPTER_ONLY_KEY]!r}; "
            "load it with the same model.init_args.model_name_or_path and model.init_args.lora as the run that wrote it"
        )
    state = checkpoint["state_dict"]
    for key in frozen_base_keys(model, own_state) - state.keys():
        state[key] = own_state[key]
