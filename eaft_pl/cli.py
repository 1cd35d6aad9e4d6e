"""The ``eaft-pl`` command: LightningCLI with fit / validate / test / predict / analyze / export, plus
``eaft-pl compare`` (an MLflow experiment's runs as the paper's Table 1 and a Pareto plot).

Only the CLI lives here: library classes in the module run as ``__main__`` would fail
jsonargparse's ``class_path`` subclass checks.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Set

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from jsonargparse import lazy_instance, set_parsing_settings

from eaft_pl.analyze import EAFTTrainer
from eaft_pl.callbacks import TokenStatsWriter
from eaft_pl.checkpoint_io import AtomicCheckpointIO
from eaft_pl.cohort import ConflictCohortCallback
from eaft_pl.data.base import ChatDataModule
from eaft_pl.interrupt import GracefulStop
from eaft_pl.module import EAFTModule
from eaft_pl.resume import ResumeState, continue_mlflow_run
from eaft_pl.tracking import DEFAULT_TRACKING_URI, MLflowSaveConfig, mlflow_loggers
from eaft_pl.training_diagnostics import DiagnosticsCallback

__all__ = ["EAFTLightningCLI", "cli_main", "main"]


class EAFTLightningCLI(LightningCLI):
    """LightningCLI whose model and data are any subclass of :class:`EAFTModule` and
    :class:`ChatDataModule`, selected by ``class_path``. ``analyze`` and ``export`` run
    :meth:`eaft_pl.analyze.EAFTTrainer.analyze` and :meth:`~eaft_pl.analyze.EAFTTrainer.export` on
    the same configs as ``fit``."""

    @staticmethod
    def subcommands() -> Dict[str, Set[str]]:
        return {**LightningCLI.subcommands(), "analyze": {"model", "datamodule"}, "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One tokenizer for data and model: the model needs it for the vocabulary size and pad id.
        parser.link_arguments("data.init_args.tokenizer_name_or_path", "model.init_args.tokenizer_name_or_path")
        # Always present (it acts only in `predict`), so a config cannot lose it by replacing the
        # trainer.callbacks list.
        parser.add_lightning_class_args(TokenStatsWriter, "predictions")
        # On by default, for the same reason: `--diagnostics.enabled=false` switches it off.
        parser.add_lightning_class_args(DiagnosticsCallback, "diagnostics")
        # Off by default (it needs the DataModule's encoded splits); `--cohort.enabled=true` tracks the
        # base model's confident conflicts through training (the toy configs switch it on).
        parser.add_lightning_class_args(ConflictCohortCallback, "cohort")
        parser.set_defaults({"cohort.enabled": False})
        # Exact resume (RNG states and the MLflow run in checkpoints) and a checkpoint on SIGTERM/SIGINT.
        parser.add_lightning_class_args(ResumeState, "resume")
        parser.add_lightning_class_args(GracefulStop, "interrupt")

    def before_fit(self) -> None:
        # Before the logger creates a run: a resumed fit continues the MLflow run of its checkpoint.
        continue_mlflow_run(self.trainer, self._get(self.config_init, "ckpt_path"))

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            stop = next((cb for cb in self.trainer.callbacks if isinstance(cb, GracefulStop)), None)
            if stop is None or stop.received is None:
                raise
            # Lightning finalized the run as FAILED; it was stopped on purpose and can be resumed.
            if self.trainer.is_global_zero:
                for logger in mlflow_loggers(self.trainer):
                    logger.experiment.set_terminated(logger.run_id, "KILLED")
            raise SystemExit(128 + stop.received)  # the shell's status for "ended by this signal"


def cli_main(args: Optional[List[str]] = None, run: bool = True) -> EAFTLightningCLI:
    """Entry point of ``eaft-pl``; ``args`` lets tests run the CLI in-process."""
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    # "omegaconf+" resolves ${...} after every config file and command-line override is merged, so
    # `--data.init_args.seed=1` reaches `seed_everything: ${data.init_args.seed}` (plain "omegaconf"
    # resolves each file on its own, before the overrides). Paths stay written from the config root.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return EAFTLightningCLI(
        EAFTModule,
        ChatDataModule,
        trainer_class=EAFTTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=MLflowSaveConfig,
        parser_kwargs={
            "parser_mode": "omegaconf+",
            "description": "EAFT fine-tuning with Lightning. `eaft-pl analyze` reads the same configs as `fit`; "
            "`eaft-pl compare --help` compares the runs of an MLflow experiment.",
        },
        trainer_defaults={
            "default_root_dir": "outputs",
            "logger": lazy_instance(MLFlowLogger, experiment_name="eaft-pl", tracking_uri=DEFAULT_TRACKING_URI),
            # Checkpoints written to a temporary file and renamed: never a truncated last.ckpt.
            "plugins": lazy_instance(AtomicCheckpointIO),
        },
        args=args,
        run=run,
    )


def main() -> None:
    """Console-script entry point (returns nothing, so the exit status is 0 on success)."""
    if sys.argv[1:2] == ["compare"]:  # not a Trainer method: it reads MLflow runs, no model or data
        from eaft_pl.compare import main as compare_main

        compare_main(sys.argv[2:])
        return
    cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
