"""``eaft-pl runs``: the latest runs of an MLflow experiment, one row each, newest first.

    eaft-pl runs --experiment quickstart [--tracking_uri sqlite:///mlruns/mlflow.db]
        [--metrics val/domain/ce train/ce ...] [--limit 10] [--json]

A Markdown table for people; with ``--json`` one JSON object per run for scripts. A metric a run did
not log is empty in the table and ``null`` in JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional, Sequence

from mlflow import MlflowClient

from eaft_pl.tracking import DEFAULT_TRACKING_URI

__all__ = ["DEFAULT_METRICS", "run_rows", "format_runs", "main"]

#: What a fine-tune's row shows unless ``--metrics`` says otherwise: the domain fit and what the gate did.
DEFAULT_METRICS = (
    "val/domain/ce",
    "val/domain/label_prob",
    "val/domain/eaft_weight",
    "val/domain/weight",
    "val/domain/conflict_share",
    "train/ce",
)


def run_rows(client: MlflowClient, experiment: str, metrics: Sequence[str], limit: int) -> List[Dict[str, Any]]:
    """The ``limit`` newest runs of ``experiment``: run id, name, method and stage tags, status and the
    last logged value of each metric (None where the run has none).

    Raises:
        ValueError: The tracking store has no experiment of that name.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment {experiment!r}; this store has {known or 'none'}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit)
    return [
        {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "method": run.data.tags.get("method"),
            "stage": run.data.tags.get("stage"),
            "status": run.info.status,
            **{m: run.data.metrics.get(m) for m in metrics},
        }
        for run in runs
    ]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_runs(rows: Sequence[Dict[str, Any]], metrics: Sequence[str]) -> str:
    """A Markdown table of :func:`run_rows`: name, method, stage, status, the metrics, the run id."""
    cols = ["name", "method", "stage", "status", *metrics, "run_id"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="eaft-pl runs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", required=True, help="MLflow experiment name (e.g. quickstart, toyworld)")
    ap.add_argument("--tracking_uri", default=DEFAULT_TRACKING_URI)
    ap.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metric names, as logged")
    ap.add_argument("--limit", type=int, default=10, help="newest runs to show")
    ap.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    opts = ap.parse_args(argv)
    if opts.limit < 1:
        ap.error(f"--limit must be at least 1, got {opts.limit}")
    try:
        rows = run_rows(MlflowClient(opts.tracking_uri), opts.experiment, opts.metrics, opts.limit)
    except ValueError as e:
        ap.exit(2, f"eaft-pl runs: {e} (tracking URI {opts.tracking_uri})\n")
    if opts.json:
        print("\n".join(json.dumps(row) for row in rows))
    else:
        print(format_runs(rows, opts.metrics))
    return rows


if __name__ == "__main__":  # pragma: no cover
    main()
