"""Entry points of the EAFT loss family for trainers other than Lightning.

- :mod:`eaft_pl.integrations.transformers`: Hugging Face ``transformers.Trainer`` and TRL's
  ``SFTTrainer`` (a ``compute_loss_func``, a trainer mixin with the memory-lean loss, a forgetting
  callback).

Nothing here imports Lightning or MLflow (an import-linter contract checks it), and nothing in the
rest of the package imports this package.
"""
