"""The ``eaft-pl`` command: LightningCLI with fit / validate / test / predict / analyze / export (the
Trainer subclass below holds the last two), plus two commands that read runs, not models:
``eaft-pl compare`` (an experiment's runs as the paper's Table 1 and a Pareto plot) and
``eaft-pl runs`` (an experiment's latest runs, one row each).

Only the CLI lives here: library classes in the module run as ``__main__`` would fail
jsonargparse's ``class_path`` subclass checks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Set

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from jsonargparse import lazy_instance, set_parsing_settings

from eaft_pl.analysis.analyze import run_analysis
from eaft_pl.analysis.compare import main as compare_main
from eaft_pl.analysis.predictions import TokenStatsWriter
from eaft_pl.analysis.runs import main as runs_main
from eaft_pl.data.base import ChatDataModule
from eaft_pl.evaluation.cohort import ConflictCohortCallback
from eaft_pl.evaluation.diagnostics import DiagnosticsCallback
from eaft_pl.module import EAFTModule
from eaft_pl.tracking import DEFAULT_TRACKING_URI, MLflowSaveConfig, mlflow_loggers
from eaft_pl.training.checkpoint_io import AtomicCheckpointIO
from eaft_pl.training.export import export_hf_folder, load_module_checkpoint
from eaft_pl.training.interrupt import GracefulStop
from eaft_pl.training.resume import ResumeState, continue_mlflow_run

__all__ = ["EAFTTrainer", "EAFTLightningCLI", "cli_main", "main"]


class EAFTTrainer(Trainer):
    """Lightning's ``Trainer`` plus the ``analyze`` and ``export`` subcommands of ``eaft-pl``
    (everything else is unchanged: ``fit``, ``validate``, ``test`` and ``predict`` are Lightning's)."""

    def export(
        self, model: Any, ckpt_path: str, output_dir: str, datamodule: Any = None, save_adapter: bool = False
    ) -> Path:
        """Write a checkpoint's model and tokenizer as a Hugging Face folder (LoRA merged in).

        ``AutoModelForCausalLM.from_pretrained`` loads the folder without eaft-pl or peft. Reads the
        same configs as ``fit``.

        Args:
            model: The EAFTModule of the config (its model is built here, on the CPU).
            ckpt_path: A checkpoint of a run with this config (``last.ckpt``); LoRA checkpoints hold
                the adapters only and the base comes from ``model.init_args.model_name_or_path``.
            output_dir: Folder to write (replaced if it exists; complete or absent).
            datamodule: Unused (the configs name one).
            save_adapter: With LoRA, also write the adapters alone under ``<output_dir>/adapter``.
        """
        load_module_checkpoint(model, ckpt_path)
        path = export_hf_folder(model, output_dir, save_adapter=save_adapter)
        print(f"wrote {path}")
        return path

    def analyze(
        self,
        model: Any,
        datamodule: Any,
        split: str = "train",
        max_examples: Optional[int] = 1000,
        seed: int = 0,
        batch_size: Optional[int] = None,
        on_policy: Literal["greedy", "sample", "none"] = "greedy",
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        quantile: float = 0.15,
        low_entropy_max: float = 0.5,
        high_entropy_min: float = 2.0,
        full_entropy: bool = False,
        bins: int = 20,
        top: int = 20,
        output_dir: Optional[str] = None,
        progress_bar: bool = True,
    ) -> Dict[str, Any]:
        """Statistics of the training data under the model as configured (before training): confident
        conflicts, (p, H) heatmap, EAFT weight distribution, conflict tokens, on-policy contrast.

        Args:
            model: The EAFTModule of the config (its model is built here).
            datamodule: The ChatDataModule of the config.
            split: Data split to analyse (``train``, ``val``, ``test``).
            max_examples: Analyse a random sample of this many conversations (null: all).
            seed: Seed of the sample and of sampled answers.
            batch_size: Conversations per forward pass (default: the data's eval batch size).
            on_policy: Also score the model's own answers to the same prompts, generated greedily or by
                sampling; ``none`` skips it.
            max_new_tokens: Longest generated answer (also capped so that prompt and answer fit the
                data's ``max_length``).
            temperature: Sampling temperature (``on_policy: sample``).
            quantile: The "bottom q" of the quantile conflict rule, for both entropy and probability.
            low_entropy_max: Low-entropy bucket bound (nats).
            high_entropy_min: High-entropy bucket bound (nats).
            full_entropy: Also compute the full-vocabulary entropy and its correlation with top-K.
            bins: Histogram bins per axis of the (p, H) plane.
            top: Rows of the conflict-token and conversation tables.
            output_dir: Also write the artifacts to this folder.
            progress_bar: Show progress bars on stderr.
        """
        return run_analysis(
            self, model, datamodule,
            split=split,
            max_examples=max_examples,
            seed=seed,
            batch_size=batch_size,
            on_policy=on_policy,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            quantile=quantile,
            low_entropy_max=low_entropy_max,
            high_entropy_min=high_entropy_min,
            full_entropy=full_entropy,
            bins=bins,
            top=top,
            output_dir=output_dir,
            progress_bar=progress_bar,
        )


class EAFTLightningCLI(LightningCLI):
    """LightningCLI whose model and data are any subclass of :class:`EAFTModule` and
    :class:`ChatDataModule`, selected by ``class_path``. ``analyze`` and ``export`` run
    :meth:`EAFTTrainer.analyze` and :meth:`EAFTTrainer.export` on
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
            "`eaft-pl compare --help` compares the runs of an MLflow experiment; `eaft-pl runs --help` lists them.",
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


#: Subcommands that read logged runs and build no model or data, so they bypass LightningCLI.
RUN_COMMANDS = {"compare": compare_main, "runs": runs_main}


def main() -> None:
    """Console-script entry point (returns nothing, so the exit status is 0 on success)."""
    command = RUN_COMMANDS.get(sys.argv[1]) if len(sys.argv) > 1 else None
    if command is not None:
        command(sys.argv[2:])
        return
    cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
