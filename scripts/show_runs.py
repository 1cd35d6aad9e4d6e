"""Print the latest runs of an MLflow experiment as a Markdown table (one row per run, newest first).

    python scripts/show_runs.py --experiment quickstart [--tracking-uri sqlite:///mlruns/mlflow.db]
        [--metrics val/domain/ce val/domain/label_prob ...] [--limit 10] [--json]

With --json it prints one JSON object per run instead (machine-readable).
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_METRICS = [
    "val/domain/ce",
    "val/domain/label_prob",
    "val/domain/eaft_weight",
    "val/domain/weight",
    "val/domain/conflict_share",
    "train/ce",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    ap.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from mlflow import MlflowClient

    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        sys.exit(f"no experiment {args.experiment!r} in {args.tracking_uri}; run `make demo` first")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=args.limit)
    rows = []
    for run in runs:
        row = {
            "run_id": run.info.run_id,
            "method": run.data.tags.get("method", "?"),
            "stage": run.data.tags.get("stage", "?"),
            "status": run.info.status,
        }
        row.update({m: run.data.metrics.get(m) for m in args.metrics})
        rows.append(row)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    cols = ["method", "stage", *args.metrics, "run_id"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
