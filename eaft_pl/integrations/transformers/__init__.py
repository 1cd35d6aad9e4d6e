"""EAFT in Hugging Face ``transformers.Trainer`` and TRL's ``SFTTrainer`` (docs: ``docs/huggingface.md``).

- :class:`EAFTLoss`: the loss family of :mod:`eaft_pl.loss` (every gate and option) as
  ``Trainer(compute_loss_func=EAFTLoss(...))``, exact under gradient accumulation
  (``num_items_in_batch``);
- :class:`EAFTTrainerMixin`, :class:`EAFTTrainer` and ``EAFTSFTTrainer`` (TRL, imported on first
  use): the same loss given as ``eaft_loss=``, with the memory-lean path (``EAFTLoss(chunk_size=...)``:
  from the final hidden states and the LM head, never the full logits) and the reference model of the
  base-model gates and the KL term;
- :class:`ForgettingCallback`: general suites scored on the model in memory at every evaluation,
  logged through the Trainer's ``report_to`` loggers.

Importing this module imports neither Lightning nor MLflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eaft_pl.integrations.transformers.forgetting import ForgettingCallback, evaluate_suites, forgetting_metrics
from eaft_pl.integrations.transformers.loss import EAFTLoss
from eaft_pl.integrations.transformers.trainer import EAFTTrainer, EAFTTrainerMixin, add_lean_forward

__all__ = [
    "EAFTLoss",
    "EAFTSFTTrainer",
    "EAFTTrainer",
    "EAFTTrainerMixin",
    "ForgettingCallback",
    "add_lean_forward",
    "evaluate_suites",
    "forgetting_metrics",
]

if TYPE_CHECKING:  # pragma: no cover
    from trl import SFTTrainer

    class EAFTSFTTrainer(EAFTTrainerMixin, SFTTrainer): ...


def _sft_trainer_class() -> type:
    try:
        from trl import SFTTrainer
    except ImportError as err:
        raise ImportError(f"EAFTSFTTrainer needs TRL ({err}); install it with: pip install 'trl>=1.0'") from err
    return type(
        "EAFTSFTTrainer",
        (EAFTTrainerMixin, SFTTrainer),
        {
            "__module__": __name__,
            "__doc__": "TRL's ``SFTTrainer`` trained with an :class:`EAFTLoss` given as ``eaft_loss=`` (see :class:`EAFTTrainerMixin`).",
        },
    )


def __getattr__(name: str) -> Any:
    # TRL takes seconds to import and is optional: build its trainer on first access (PEP 562).
    if name == "EAFTSFTTrainer":
        value = _sft_trainer_class()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
