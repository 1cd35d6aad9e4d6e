"""LoRA adapters through PEFT: the options of ``model.init_args.lora``, wrapping the base model, and
the base model's view with the adapters switched off (the reference of EAFT's base-model gates).

PEFT is an optional extra (``pip install 'eaft-pl[lora]'``) imported only when LoRA is asked for.

    model:
      init_args:
        lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Literal, Optional, Union

import torch
from torch import nn

__all__ = ["LoRAOptions", "AdapterDisabled", "apply_lora", "require_peft", "is_peft_model"]

_KEY = "model.init_args.lora"


@dataclass
class LoRAOptions:
    """Low-rank adapters on the base model's linear layers; only the adapters (and
    ``modules_to_save``) train, the base stays frozen.

    Args:
        r: Rank of each adapter (>= 1).
        alpha: Scaling numerator: the update is ``alpha / r * B @ A`` (``alpha / sqrt(r)`` with
            ``use_rslora``).
        dropout: Dropout on the adapters' input, in [0, 1).
        target_modules: ``all-linear`` (every linear layer except the LM head), a list of module name
            suffixes (``[q_proj, k_proj, v_proj, o_proj]``), or one regular expression matched
            against the full module names.
        modules_to_save: Modules trained in full next to the adapters (e.g. ``[lm_head]`` after adding
            tokens); they are saved in the checkpoints too.
        use_rslora: Rank-stabilised scaling ``alpha / sqrt(r)``.
        init_lora_weights: ``true``: B = 0, so training starts from the base model exactly;
            ``gaussian``: A Gaussian instead of Kaiming-uniform, B = 0; ``false``: both random (tests).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Union[Literal["all-linear"], str, List[str]] = "all-linear"
    modules_to_save: Optional[List[str]] = None
    use_rslora: bool = False
    init_lora_weights: Union[bool, Literal["gaussian"]] = True

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"{_KEY}.r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"{_KEY}.alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"{_KEY}.dropout must lie in [0, 1), got {self.dropout!r}")
        targets = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"{_KEY}.target_modules must be 'all-linear', a non-empty list of module names or a regex, "
                f"got {self.target_modules!r}"
            )
        if self.modules_to_save is not None and not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ValueError(f"{_KEY}.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"{_KEY}.init_lora_weights must be true, false or 'gaussian', got {self.init_lora_weights!r}")

    def to_peft_config(self) -> Any:
        """The equivalent ``peft.LoraConfig`` (biases stay frozen: a trained bias would survive
        ``disable_adapter`` and the reference would no longer be the base model)."""
        peft = require_peft()
        return peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=float(self.dropout),
            target_modules=self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
            modules_to_save=list(self.modules_to_save) if self.modules_to_save else None,
            bias="none",
            use_rslora=self.use_rslora,
            init_lora_weights=self.init_lora_weights,
        )


def require_peft() -> Any:
    """Import ``peft`` or say how to install it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"{_KEY} needs the peft package: pip install 'eaft-pl[lora]'") from error
    return peft


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT wrapper (without importing peft when it is not installed)."""
    return any(cls.__module__.startswith("peft.") and cls.__name__ == "PeftModel" for cls in type(model).__mro__)


def apply_lora(model: nn.Module, options: LoRAOptions) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (``peft.get_peft_model``); every base parameter is frozen.

    With gradient checkpointing on, PEFT also makes the input embeddings' output require grad, so the
    checkpointed layers see an input with gradient even though the embedding is frozen.
    """
    peft = require_peft()
    return peft.get_peft_model(model, options.to_peft_config())


class AdapterDisabled:
    """The base model behind a PEFT model: calls run the same weights with the adapters switched off,
    in eval mode and without gradient, as a frozen copy of the base would, at no extra memory.

    Stands in for the frozen reference copy (``EAFTModule._frozen``), so it offers what that code uses:
    calling, ``parameters()`` and ``to()``.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        self._model = peft_model

    def parameters(self) -> Iterator[nn.Parameter]:
        return self._model.parameters()

    def to(self, *args: Any, **kwargs: Any) -> "AdapterDisabled":
        return self  # the weights are the trained model's, which Lightning moves

    def __call__(self, **kwargs: Any) -> Any:
        model = self._model
        was_training = model.training
        model.eval()  # no dropout, like the frozen copy
        try:
            with torch.no_grad(), model.disable_adapter():
                return model(**kwargs)
        finally:
            model.train(was_training)
