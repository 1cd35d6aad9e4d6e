"""FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy``.

Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` sets up the processes and a
device mesh, and leaves the sharding to the LightningModule's ``configure_model``.
``EAFTModule.configure_model`` builds the model and then calls :func:`shard_with_fsdp2`, which does
nothing unless the strategy gave the module a device mesh; under the strategy it applies
``fully_shard`` to every decoder layer (the Hugging Face model's ``_no_split_modules`` classes, as
:class:`~eaft_pl.training.strategies.DecoderLayerFSDPStrategy` wraps them under FSDP1) and then to
the whole model, over the mesh's data-parallel dimension. There is no tensor parallelism.

:class:`FSDP2Strategy` is ``ModelParallelStrategy`` with the mesh this needs: every process in the
data-parallel dimension (Lightning's default puts the processes of a node in the tensor-parallel
one), a tensor-parallel size of 1. It runs on a CPU accelerator too, over gloo (tests); Lightning's
class needs no change for that in the installed version, the subclass changes only the defaults.

    trainer:
      strategy:
        class_path: eaft_pl.training.fsdp2.FSDP2Strategy
        init_args: {save_distributed_checkpoint: false}

The rank-zero callbacks (``SaveHFModel``, ``ForgettingCallback``, ``ConflictCohortCallback``,
``LMEvalCallback``) gather the full weights with ``get_model_state_dict``
(:func:`eaft_pl.training.sharded.gather_full_model`), as they do under FSDP1.
"""

from __future__ import annotations

from typing import Any, List, Literal, Optional, Union

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from eaft_pl.training.strategies import decoder_layer_classes

__all__ = ["FSDP2Strategy", "loads_checkpoints_itself", "shard_with_fsdp2"]


def loads_checkpoints_itself(trainer: Any) -> bool:
    """Whether ``trainer``'s strategy loads the model's weights from a checkpoint itself, strictly,
    before ``LightningModule.on_load_checkpoint`` runs (``ModelParallelStrategy``, and so FSDP2).

    ``EAFTModule``'s adapter-only LoRA checkpoints leave the frozen base out and hand its keys back in
    ``on_load_checkpoint``; under such a strategy that comes too late (a missing-key error on resume,
    for the single file and the sharded folder alike), so there LoRA checkpoints keep the base too.
    """
    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def shard_with_fsdp2(
    module: Any, layer_class_names: Optional[List[str]] = None, reshard_after_forward: Union[bool, int] = True
) -> bool:
    """Apply ``fully_shard`` to ``module.model`` (each decoder layer, then the whole model) when
    ``module`` (a LightningModule) runs under ``ModelParallelStrategy``; return whether it did.

    Outside that strategy (no device mesh) nothing happens. Called again on a sharded model (fit
    then test), it leaves it as it is.

    Args:
        module: The LightningModule; its ``model`` is the Hugging Face (or PEFT) model to shard.
        layer_class_names: Class names of the units to shard on their own (default: the model's
            ``_no_split_modules``).
        reshard_after_forward: As ``fully_shard``'s: free the gathered weights after each unit's
            forward (``True``) or keep them for the backward (``False``: faster, more memory).

    Raises:
        ValueError: the mesh has a tensor-parallel dimension larger than 1 (not supported: the
            loss and the callbacks expect whole rows of the vocabulary).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = getattr(module, "_device_mesh", None)
    if mesh is None:
        return False
    if any(isinstance(m, FSDPModule) for m in module.model.modules()):
        return True
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"eaft-pl shards with FSDP2 only, without tensor parallelism, but the device mesh has a tensor-parallel "
            f"size of {mesh['tensor_parallel'].size()}; use trainer.strategy.class_path: "
            "eaft_pl.training.fsdp2.FSDP2Strategy (or set tensor_parallel_size: 1 and data_parallel_size to the world size)"
        )
    data_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    model: nn.Module = module.model
    classes = tuple(decoder_layer_classes(model, layer_class_names))
    for layer in [m for m in model.modules() if isinstance(m, classes)]:
        fully_shard(layer, mesh=data_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=data_mesh, reshard_after_forward=reshard_after_forward)
    return True


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as FSDP2 alone: the device mesh has every process in its
    data-parallel dimension and a tensor-parallel size of 1, so ``EAFTModule`` shards each decoder
    layer over all processes (:func:`shard_with_fsdp2`).

    Not a registered name: give it by ``class_path``. Checkpoints are Lightning's for this strategy:
    a folder of per-rank shards (``save_distributed_checkpoint: true``, the default) or one file
    assembled on rank zero (``false``).

    Args:
        data_parallel_size: Processes in the data-parallel (sharding) dimension; ``"auto"``: all of
            them (nodes times devices).
        save_distributed_checkpoint: As ``ModelParallelStrategy``'s.
        **kwargs: ``process_group_backend``, ``timeout``: as ``ModelParallelStrategy``'s.
    """

    def __init__(
        self,
        data_parallel_size: Union[Literal["auto"], int] = "auto",
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        if "tensor_parallel_size" in kwargs:
            raise ValueError("FSDP2Strategy has no tensor parallelism; use ModelParallelStrategy for a tensor-parallel mesh")
        super().__init__(
            data_parallel_size=data_parallel_size, tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
