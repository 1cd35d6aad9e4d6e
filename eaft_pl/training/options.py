"""The checks of :class:`eaft_pl.module.EAFTModule`'s options, before anything is loaded.

One pure function, so a wrong option fails the run at parse time with the config key that holds it
(``model.init_args.<name>``) and what to set instead, rather than hours later inside a step.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

from eaft_pl.models.loading import _dtype

__all__ = ["KEY", "check_module_options", "check_strategy_options"]

#: Where the module's options sit in a config.
KEY = "model.init_args"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_module_options(
    *,
    model_name_or_path: Optional[str],
    model_config: Optional[Dict[str, Any]],
    top_k: int,
    learning_rate: float,
    weight_decay: float,
    warmup_ratio: float,
    min_lr_ratio: float,
    adam_betas: Sequence[float],
    adam_eps: float,
    loss_normalization: str,
    torch_dtype: Optional[str],
    conflict_max_norm_entropy: float,
    conflict_max_label_prob: float,
    chunk_size: Optional[int],
    reference_source: str,
    reference_kl_coef: float,
    reference_kl_direction: str,
    max_skipped_steps: int,
) -> None:
    """Raise ``ValueError`` naming ``model.init_args.<option>`` for the first option out of range, or
    for two options that cannot go together (the KL term with the chunked loss or a cached reference)."""
    if (model_name_or_path is None) == (model_config is None):
        raise ValueError(f"set exactly one of {KEY}.model_name_or_path and {KEY}.model_config")
    if not _is_int(top_k) or top_k < 2:
        raise ValueError(f"{KEY}.top_k must be >= 2, got {top_k}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"{KEY}.learning_rate must be > 0 and finite, got {learning_rate}")
    if weight_decay < 0:
        raise ValueError(f"{KEY}.weight_decay must be >= 0, got {weight_decay}")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"{KEY}.warmup_ratio must lie in [0, 1), got {warmup_ratio}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"{KEY}.min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    if len(adam_betas) != 2 or not all(0 <= b < 1 for b in adam_betas):
        raise ValueError(f"{KEY}.adam_betas must be two numbers in [0, 1), got {adam_betas!r}")
    if not adam_eps > 0:
        raise ValueError(f"{KEY}.adam_eps must be > 0, got {adam_eps!r}")
    for name, value in (("conflict_max_norm_entropy", conflict_max_norm_entropy), ("conflict_max_label_prob", conflict_max_label_prob)):
        if not 0 <= value <= 1:
            raise ValueError(f"{KEY}.{name} must lie in [0, 1], got {value!r}")
    if not _is_int(max_skipped_steps) or max_skipped_steps < 0:
        raise ValueError(f"{KEY}.max_skipped_steps must be an integer >= 0 (0: stop at the first), got {max_skipped_steps!r}")
    if torch_dtype is not None:
        _dtype(torch_dtype)  # names model.init_args.torch_dtype; fail before any weight is read
    if loss_normalization not in ("step", "micro_batch"):
        raise ValueError(f"{KEY}.loss_normalization must be 'step' or 'micro_batch', got {loss_normalization!r}")
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"{KEY}.chunk_size must be a positive integer or null, got {chunk_size!r}")
    if reference_source not in ("cache", "frozen"):
        raise ValueError(f"{KEY}.reference_source must be 'cache' or 'frozen', got {reference_source!r}")
    if not reference_kl_coef >= 0:
        raise ValueError(f"{KEY}.reference_kl_coef must be >= 0, got {reference_kl_coef!r}")
    if reference_kl_direction not in ("policy_ref", "ref_policy"):
        raise ValueError(f"{KEY}.reference_kl_direction must be 'policy_ref' or 'ref_policy', got {reference_kl_direction!r}")
    if reference_kl_coef > 0 and chunk_size is not None:
        raise ValueError(
            f"{KEY}.reference_kl_coef needs the full logits of both models, which the chunked loss never "
            f"builds; unset {KEY}.chunk_size for SFT-KL / ASFT"
        )
    if reference_kl_coef > 0 and reference_source != "frozen":
        raise ValueError(
            f"{KEY}.reference_kl_coef needs the reference model's whole distribution on every batch; "
            f"set {KEY}.reference_source: frozen"
        )


def check_strategy_options(strategy: str, *, chunk_size: Optional[int], loss_normalization: str) -> None:
    """Refuse options that the training strategy (its class name) cannot honour, before training."""
    sharded = any(name in strategy for name in ("FSDP", "DeepSpeed", "ModelParallel"))
    if chunk_size is not None and sharded:
        # The chunked loss reads the LM-head weight outside the model's forward, where a sharded
        # strategy has not gathered it.
        raise ValueError(f"{KEY}.chunk_size is not supported with {strategy} (sharded weights); unset it or use DDP")
    if "DeepSpeed" in strategy and loss_normalization == "step":
        raise ValueError(
            "DeepSpeed scales and owns the gradients, so the step-level token normalisation cannot be "
            f"applied; set {KEY}.loss_normalization: micro_batch"
        )
