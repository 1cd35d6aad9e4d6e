"""What the experiment drivers share: running ``eaft-pl`` subcommands in-process with quiet output, a
pinned thread count, summary statistics over seeds and the command that opens the MLflow UI.

The drivers (:mod:`eaft_pl.experiments.toyworld.driver`, :mod:`eaft_pl.experiments.realmodel.driver`)
print one line per unit of work; Lightning's device banners, model summaries and progress bars, and
the log lines and warnings that a user of a driver cannot act on, are silenced at their source
unless ``verbose`` is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

__all__ = [
    "THREADS", "QUIET_LOGGERS", "add_run_options", "run_cli", "quiet", "quiet_run", "mean_std", "ui_command", "cohort_curves", "cohort_figure",
]  # fmt: skip

#: The torch thread count of every run unless a driver's ``--threads`` says otherwise. The thread count
#: changes the order of float reductions and so the numbers; a pinned count makes a run repeat on any
#: machine of the same kind (2 is the cores of the machines this project is built on).
THREADS = 2
#: Loggers whose INFO lines (device banners, "Seed set to", the LitLogger tip, MLflow creating its
#: tables or an experiment) tell a user of a driver nothing to act on; ``verbose`` keeps them.
QUIET_LOGGERS = {
    "lightning.pytorch.utilities.rank_zero": logging.WARNING,
    "lightning.fabric.utilities.seed": logging.WARNING,
    "lightning.pytorch.loggers.mlflow": logging.ERROR,
    "mlflow.store.db.utils": logging.WARNING,
    "alembic.runtime.migration": logging.WARNING,
}
#: The conflict cohort's curves drawn per method (cohort/conflict/<metric>).
COHORT_PANELS = ["weight", "label_prob", "norm_entropy", "share_in_conflict"]
#: Warnings raised inside Lightning or torch on every fit that nothing in a driver's options changes.
QUIET_WARNINGS = [
    r".*does not have many workers.*",
    r".*number of training batches .* is smaller than the logging interval.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's use of a deprecated torch API
]


def add_run_options(ap: Any, out: str) -> None:
    """The options every driver takes the same way: threads, output folder, MLflow store, results file
    and verbosity (``out``: the default output folder)."""
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads of every run (pinned: the count changes the numbers)")
    ap.add_argument("--out", default=out, help="what the driver writes besides MLflow, and the default results file's folder")
    ap.add_argument("--tracking_uri", default="sqlite:///mlruns/mlflow.db")
    ap.add_argument("--results", default=None, help="results file (default <out>/results.json)")
    ap.add_argument("--verbose", action="store_true", help="Lightning's own output: device banners, model summaries, progress bars")


def run_cli(args: List[str], verbose: bool = False) -> Any:
    """Run ``eaft-pl <args>`` in this process and return the ``LightningCLI`` (its trainer, model and
    callbacks hold what the run measured). Unless ``verbose``, without progress bar and model summary:
    the driver prints its own line per run."""
    from eaft_pl.cli import cli_main

    if not verbose and args and args[0] == "fit":
        args = [*args, "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    # LightningCLI warns when sys.argv holds arguments besides `args`: here they are the driver's own.
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return cli_main(args)
    finally:
        sys.argv = argv


def quiet(verbose: bool) -> Callable[[], None]:
    """Unless ``verbose``: raise the :data:`QUIET_LOGGERS`' levels and turn off transformers' "Loading
    weights" bars (one per model loaded). Returns the function that restores both."""
    from transformers.utils import logging as hf_logging

    old = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    bars = hf_logging.is_progress_bar_enabled()
    if not verbose:
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        hf_logging.disable_progress_bar()

    def restore() -> None:
        for name, level in old.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()

    return restore


@contextlib.contextmanager
def quiet_run(verbose: bool, threads: int) -> Iterator[None]:
    """The context of a driver's whole run: ``threads`` torch threads, and (unless ``verbose``) the
    quiet loggers and warnings; everything restored on exit."""
    old_threads, restore = torch.get_num_threads(), quiet(verbose)
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            if not verbose:
                for pattern in QUIET_WARNINGS:
                    warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        torch.set_num_threads(old_threads)
        restore()


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "std", "n"}`` of the finite ``values`` (sample std; 0 for one value, NaN for none)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on the store ``uri``, runnable from any directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    mlflow = Path(sys.executable).parent / "mlflow"
    exe = str(mlflow) if mlflow.is_file() else "mlflow"
    return f"{shlex.quote(exe)} ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --workers 1"


def cohort_curves(members: List[Dict[str, Any]]) -> Dict[str, List[List[float]]]:
    """``cohort/<c>/<metric> -> [[step, mean, std], ...]`` over the seeds of one (method, lr)."""
    steps: Dict[int, List[Dict[str, float]]] = {}
    for run in members:
        for record in run.get("cohort", []):
            steps.setdefault(record["step"], []).append(record)
    out: Dict[str, List[List[float]]] = {}
    for step in sorted(steps):
        for key in steps[step][0]:
            if key.startswith("cohort/"):
                stat = mean_std([r[key] for r in steps[step]])
                out.setdefault(key, []).append([step, stat["mean"], stat["std"]])
    return out


def cohort_figure(rows: Dict[str, Any], lr: float, methods: Optional[Sequence[str]] = None) -> Any:
    """The conflict cohort's curves (weight, label probability, entropy, share still in conflict) of
    each method at learning rate ``lr``, mean and std over seeds."""
    from eaft_pl.analysis.plots import curves_figure

    chosen = [r for r in rows.values() if r["lr"] == lr and r.get("cohort") and (methods is None or r["method"] in methods)]
    panels = [
        (f"conflict cohort: {metric.replace('_', ' ')}", {r["method"]: r["cohort"].get(f"cohort/conflict/{metric}", []) for r in chosen})
        for metric in COHORT_PANELS
    ]
    return curves_figure(panels, title=f"Tokens that were confident conflicts under the base (lr {lr:g})")
