"""FSDP that wraps and activation-checkpoints the model's own decoder layers.

Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` wants the layer classes to shard and
checkpoint as Python types, which a YAML recipe cannot name without knowing the model's module path
(``transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer``) and which change with every model
family. A Hugging Face model already says which blocks must stay whole on one device: its
``_no_split_modules`` names. :class:`DecoderLayerFSDPStrategy` reads those names from the model
``configure_model`` built and hands the matching classes to FSDP as the unit of wrapping and of
activation checkpointing, so one config serves Llama, Qwen, Gemma, ... alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, List, Optional, Set, Type

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

__all__ = ["DecoderLayerFSDPStrategy", "RootClipFSDPPrecision", "decoder_layer_classes", "no_split_module_names", "uses_hf_checkpointing"]


def no_split_module_names(model: nn.Module) -> List[str]:
    """The ``_no_split_modules`` class names declared by every Hugging Face model inside ``model``
    (the model itself, or a LightningModule holding it), in order of first appearance."""
    names: List[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            if name not in names:
                names.append(name)
    return names


def decoder_layer_classes(model: nn.Module, names: Optional[Iterable[str]] = None) -> Set[Type[nn.Module]]:
    """The classes of the submodules of ``model`` whose class name is one of ``names``.

    Args:
        model: A built model (a Hugging Face ``PreTrainedModel`` or any module containing one).
        names: Class names to look for; ``None`` takes the models' ``_no_split_modules``.

    Raises:
        ValueError: no name to try, or no submodule of one of these classes (the message names the
            names tried and the model's class, so a wrong ``layer_class_names`` is easy to fix).
    """
    tried = list(names) if names is not None else no_split_module_names(model)
    if not tried:
        raise ValueError(
            f"{type(model).__name__} declares no _no_split_modules (not a Hugging Face model?); set "
            "trainer.strategy.init_args.layer_class_names to the class name of its decoder layer"
        )
    wanted = set(tried)
    found = {type(module) for module in model.modules() if type(module).__name__ in wanted}
    if not found:
        raise ValueError(
            f"no submodule of {type(model).__name__} is of a class named {tried}; set "
            "trainer.strategy.init_args.layer_class_names to the class name of its decoder layer "
            "(print the model to see its module classes)"
        )
    return found


def uses_hf_checkpointing(model: nn.Module) -> bool:
    """Whether Hugging Face's own activation checkpointing is on somewhere in ``model`` (its layers
    then carry ``gradient_checkpointing = True``)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


class RootClipFSDPPrecision(FSDPPrecision):
    """Lightning's FSDP precision plugin, plus clipping by the global gradient norm.

    Lightning's plugin refuses ``gradient_clip_algorithm: norm`` because a correct norm over sharded
    gradients needs the root FSDP module's ``clip_grad_norm_`` (a collective over the shards), which
    the plugin cannot reach. The strategy hands it the root after wrapping, so the recipes' clipping
    (``trainer.gradient_clip_val: 1.0``) means the same under FSDP as under DDP.

    Args:
        precision: As :class:`~lightning.pytorch.plugins.precision.FSDPPrecision`.
        scaler: As :class:`~lightning.pytorch.plugins.precision.FSDPPrecision`.
    """

    def __init__(self, precision: Any, scaler: Any = None) -> None:
        super().__init__(precision, scaler)
        #: The root ``FullyShardedDataParallel`` module, set when the strategy wraps the model.
        self.root: Optional[nn.Module] = None

    @property
    def mixed_precision_config(self) -> Any:
        """Lightning's FSDP mixed precision, with the buffers kept in float32.

        Lightning casts buffers to the compute dtype too. For a Hugging Face model that rounds the
        rotary embedding's ``inv_freq`` to bf16 at the first forward (measured: float32 before, bf16
        after), so position angles drift at long contexts, unlike under DDP, where buffers keep their
        dtype. Buffers are few and small; keeping them in float32 costs nothing that matters.
        """
        return dataclasses.replace(super().mixed_precision_config, buffer_dtype=torch.float32)

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float, norm_type: float = 2.0) -> None:
        if self.root is None:
            raise RuntimeError("RootClipFSDPPrecision clips through the root FSDP module, which is not wrapped yet")
        self.root.clip_grad_norm_(clip_val, norm_type=norm_type)


class DecoderLayerFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with the model's decoder layer as the unit of sharding and of activation
    checkpointing, found in the built model rather than named in the config.

    When Lightning wraps the model (after ``configure_model`` built it), the classes come from
    :func:`decoder_layer_classes`: the Hugging Face model's ``_no_split_modules`` names, matched
    against the class names of its submodules. An ``auto_wrap_policy`` or
    ``activation_checkpointing_policy`` given explicitly is kept as given.

    Hugging Face's own checkpointing (``model.init_args.gradient_checkpointing: true``) and this
    strategy's ``activation_checkpointing`` would each recompute the layers, so every layer's forward
    would run three times per step for no memory gain: the pair is refused. Keep one of them.

    Clipping by norm (``trainer.gradient_clip_val``), which Lightning's FSDP refuses, works: see
    :class:`RootClipFSDPPrecision`.

    The strategy is not a registered name: give it by ``class_path``. Unlike the plain ``"fsdp"``
    string, Lightning does not refuse it on a CPU accelerator; there it runs over gloo (tests only).

    Args:
        activation_checkpointing: Recompute each decoder layer's activations in the backward pass
            (FSDP's checkpoint wrapper around the same layers FSDP wraps).
        layer_class_names: Class names to wrap and checkpoint instead of the model's
            ``_no_split_modules`` (e.g. ``["Qwen3DecoderLayer"]``).
        **kwargs: Every other :class:`~lightning.pytorch.strategies.FSDPStrategy` option
            (``sharding_strategy``, ``state_dict_type``, ``cpu_offload``, ``mixed_precision``,
            ``device_mesh``, ``process_group_backend``, ``timeout``, ...) and FSDP's own keywords.
    """

    def __init__(
        self,
        activation_checkpointing: bool = True,
        layer_class_names: Optional[List[str]] = None,
        **kwargs: Any,
    ) -> None:
        if layer_class_names is not None and not layer_class_names:
            raise ValueError("trainer.strategy.init_args.layer_class_names is empty; leave it unset to use the model's")
        self._user_wrap_policy = kwargs.get("auto_wrap_policy") is not None
        self._user_checkpoint_policy = kwargs.get("activation_checkpointing_policy") is not None
        super().__init__(**kwargs)
        self.activation_checkpointing_enabled = activation_checkpointing
        self.layer_class_names = list(layer_class_names) if layer_class_names is not None else None
        #: The classes found when the model was last wrapped (for logs and tests).
        self.layer_classes: Set[Type[nn.Module]] = set()

    @property
    def precision_plugin(self) -> FSDPPrecision:
        if self._precision_plugin is None:
            self._precision_plugin = RootClipFSDPPrecision("32-true")
        return self._precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        # The Trainer builds a plain FSDPPrecision from `trainer.precision`; keep its settings and add
        # the clipping. A plugin of another FSDPPrecision subclass is the user's choice and stays.
        if type(plugin) is FSDPPrecision:
            plugin = RootClipFSDPPrecision(plugin.precision, plugin.scaler)
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def resolve_policies(self, model: nn.Module) -> None:
        """Find the decoder layer classes in ``model`` and set FSDP's wrap and checkpoint policies.

        Called by Lightning's ``_setup_model`` hook before it wraps the model; public so that the
        wiring can be checked without starting processes.
        """
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return  # wrapped before (fit then test): FSDP keeps its units
        if self.activation_checkpointing_enabled and uses_hf_checkpointing(model):
            raise ValueError(
                "model.init_args.gradient_checkpointing (Hugging Face's) and "
                "trainer.strategy.init_args.activation_checkpointing (FSDP's) would both recompute every decoder "
                "layer; set one of them to false"
            )
        self.layer_classes = decoder_layer_classes(model, self.layer_class_names)
        if not self._user_wrap_policy:
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(self.layer_classes)
        if self.activation_checkpointing_enabled and not self._user_checkpoint_policy:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(self.layer_classes)}

    def _setup_model(self, model: nn.Module) -> nn.Module:
        self.resolve_policies(model)
        if self.root_device.type == "cpu":
            model = self._wrap_on_cpu(model)
        model = super()._setup_model(model)
        if isinstance(self.precision_plugin, RootClipFSDPPrecision):
            self.precision_plugin.root = model
        return model

    def _wrap_on_cpu(self, model: nn.Module) -> nn.Module:
        # Lightning passes FSDP ``device_id=root_device.index``, None on a CPU, and FSDP then looks
        # for an accelerator and fails; naming the CPU device lets FSDP run over gloo (tests, CI).
        # Lightning's hook finds the model wrapped and only adds the checkpointing.
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return model
        kwargs = dict(self.kwargs)
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **kwargs,
        )
        self.kwargs.pop("auto_wrap_policy", None)  # applied; Lightning would warn that it is ignored
        return model
