"""``eaft-pl compare``: the runs of an MLflow experiment in the paper's Table 1 layout, and the Pareto
plot of domain score against general score (Fig. 5).

    eaft-pl compare --experiment toyworld [--tracking-uri sqlite:///mlruns/mlflow.db] [--out DIR]

It reads the scores :class:`~eaft_pl.evaluation.ForgettingCallback` logs,
``val/<suite>/<task>/<metric>``, for a domain suite and a general suite: the value at the first
logged step is the base model's (the callback scores it before the first update), the latest value is
the fine-tuned model's. Runs are grouped by their name without its ``seed<N>`` part (the embedded
experiment names runs ``<method>-lr<lr>-seed<seed>``) or by tags and params (``--group-by tags.gate
params.learning_rate``), so runs that differ only in their seed form one row, shown as mean ±
standard deviation. One row per group:
the domain tasks and their average, the general tasks and their average with the change against the
base. It prints the table, writes ``table.md``, ``table.csv``, ``compare.json`` and ``pareto.png``
to ``--out``, and logs them as a ``compare`` run in the same experiment (``--no-log`` to skip).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from eaft_pl.fileio import atomic_write

__all__ = ["RunScores", "load_runs", "group_runs", "format_markdown", "write_csv", "pareto_points", "main"]


@dataclass
class RunScores:
    """Base and final score of every task of the two suites of one run.

    Attributes:
        run_id: MLflow run id.
        name: Run name.
        group: Values of the grouping keys (e.g. method and learning rate).
        domain: ``task -> (base, final)`` for the domain suite.
        general: ``task -> (base, final)`` for the general suite.
        base: Identity of the base model the run fine-tuned (its ``model`` tag, the checkpoint it
            started from; the run id when unknown): runs with the same base share its base scores.
    """

    run_id: str
    name: str
    group: Dict[str, str]
    domain: Dict[str, tuple] = field(default_factory=dict)
    general: Dict[str, tuple] = field(default_factory=dict)
    base: str = ""

    def __post_init__(self) -> None:
        self.base = self.base or self.run_id


#: The seed part of a run name (``eaft-lr0.001-seed2``), removed by the ``name`` grouping key.
SEED_PART = re.compile(r"[-_.]?seed[-_]?\d+")


def _key_value(run: Any, key: str) -> str:
    if key == "name":
        return SEED_PART.sub("", run.info.run_name or run.info.run_id)
    kind, _, name = key.partition(".")
    source = {"tags": run.data.tags, "params": run.data.params}.get(kind)
    if source is None or not name:
        raise ValueError(f"--group-by entries are name, tags.<name> or params.<name>, got {key!r}")
    return source.get(name, "?")


def _suite_tasks(metrics: Dict[str, float], suite: str, metric: str) -> List[str]:
    tasks = []
    for key in metrics:
        parts = key.split("/")
        # val/<suite>/<task>/<metric>; "avg" is the callback's own average, recomputed here.
        if len(parts) == 4 and parts[0] == "val" and parts[1] == suite and parts[3] == metric and parts[2] != "avg":
            tasks.append(parts[2])
    return sorted(tasks)


def load_runs(
    client: Any,
    experiment: str,
    *,
    domain_suite: str = "domain",
    general_suite: str = "general",
    domain_metric: str = "content",
    general_metric: str = "exact",
    group_by: Sequence[str] = ("name",),
) -> List[RunScores]:
    """The finished runs of ``experiment`` that logged both suites, with base and final scores.

    Raises:
        ValueError: the experiment does not exist, or none of its runs has the suites' metrics (the
            message lists the ``val/<suite>/<task>/<metric>`` names that were found).
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} in this tracking store")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=5000)
    out: List[RunScores] = []
    seen: set = set()
    for run in runs:
        metrics = run.data.metrics
        seen.update(k for k in metrics if k.count("/") == 3 and k.startswith("val/"))
        d_tasks = _suite_tasks(metrics, domain_suite, domain_metric)
        g_tasks = _suite_tasks(metrics, general_suite, general_metric)
        if not d_tasks or not g_tasks:
            continue  # e.g. an `analyze` or `compare` run, or a run without the forgetting callback
        base = run.data.tags.get("model") or run.data.params.get("model_name_or_path") or run.info.run_id
        scores = RunScores(
            run.info.run_id, run.info.run_name, {k.partition(".")[2] or k: _key_value(run, k) for k in group_by}, base=base
        )
        for suite, metric, tasks, target in (
            (domain_suite, domain_metric, d_tasks, scores.domain),
            (general_suite, general_metric, g_tasks, scores.general),
        ):
            for task in tasks:
                history = client.get_metric_history(run.info.run_id, f"val/{suite}/{task}/{metric}")
                history = sorted(history, key=lambda m: (m.step, m.timestamp))
                target[task] = (history[0].value, history[-1].value)
        out.append(scores)
    if not out:
        found = ", ".join(sorted(seen)[:20]) or "none"
        raise ValueError(
            f"no finished run of experiment {experiment!r} logged val/{domain_suite}/<task>/{domain_metric} and "
            f"val/{general_suite}/<task>/{general_metric}; metrics of that form found: {found}. "
            "Set --domain-suite/--domain-metric/--general-suite/--general-metric"
        )
    return out


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _avg(scores: Dict[str, tuple], index: int) -> float:
    return statistics.fmean(v[index] for v in scores.values())


def group_runs(runs: List[RunScores]) -> Dict[str, Any]:
    """Aggregate runs by their group: per task and per suite average, the mean and standard deviation
    over the group's runs (its seeds), the change of the general average against the base, and a
    ``base`` row (the first logged scores, once per distinct base model: runs fine-tuned from the
    same base checkpoint share its scores, so its ``n`` counts bases, listed in ``bases``).

    Raises:
        ValueError: a run lacks a task that other runs scored (averages over different task sets
            would not be comparable); the message names the run and the missing tasks.

    Returns:
        ``{"base": row, "rows": [row, ...], "domain_tasks": [...], "general_tasks": [...]}``; a row has
        ``label``, ``group``, ``n``, ``run_ids``, ``domain`` / ``general`` (task -> mean/std),
        ``domain_avg``, ``general_avg`` and ``general_delta`` (mean/std/n each).
    """
    domain_tasks = sorted({t for r in runs for t in r.domain})
    general_tasks = sorted({t for r in runs for t in r.general})
    for r in runs:
        missing = [f"domain/{t}" for t in domain_tasks if t not in r.domain]
        missing += [f"general/{t}" for t in general_tasks if t not in r.general]
        if missing:
            # Averages over different task sets are not comparable; refuse rather than mix them.
            raise ValueError(
                f"run {r.name!r} ({r.run_id}) has no scores for {', '.join(missing)}, which other runs of the "
                "experiment have; every run must score the same tasks (select the runs, or re-run the evaluation)"
            )

    def row(members: List[RunScores], index: int) -> Dict[str, Any]:
        return {
            "n": len(members),
            "run_ids": [m.run_id for m in members],
            "domain": {t: _mean_std([m.domain[t][index] for m in members]) for t in domain_tasks},
            "general": {t: _mean_std([m.general[t][index] for m in members]) for t in general_tasks},
            "domain_avg": _mean_std([_avg(m.domain, index) for m in members]),
            "general_avg": _mean_std([_avg(m.general, index) for m in members]),
        }

    groups: Dict[str, List[RunScores]] = {}
    for r in runs:
        groups.setdefault("@".join(r.group.values()), []).append(r)
    rows = []
    for label, members in sorted(groups.items()):
        entry = {"label": label, "group": members[0].group, **row(members, 1)}
        entry["general_delta"] = _mean_std([_avg(m.general, 1) - _avg(m.general, 0) for m in members])
        rows.append(entry)
    bases = _distinct_bases(runs)
    base_row = {"label": "base", **row([bases[b] for b in sorted(bases)], 0), "bases": sorted(bases)}
    return {"base": base_row, "rows": rows, "domain_tasks": domain_tasks, "general_tasks": general_tasks}


def _distinct_bases(runs: List[RunScores]) -> Dict[str, RunScores]:
    """One run per base model (the first), so that each base's scores count once in the base row.

    Runs from the same base whose base scores disagree (a changed evaluation) and groups fine-tuned
    from different sets of bases (their deltas compare against different bases) are warned about.
    """
    bases: Dict[str, RunScores] = {}
    for r in runs:
        first = bases.setdefault(r.base, r)
        if first is not r:
            drift = [
                t
                for scores, ref in ((r.domain, first.domain), (r.general, first.general))
                for t in scores
                if abs(scores[t][0] - ref[t][0]) > 1e-9
            ]
            if drift:
                warnings.warn(
                    f"runs {first.name!r} and {r.name!r} start from the same base {r.base!r} but their base scores "
                    f"differ on {', '.join(drift)}; the base row uses {first.name!r}'s",
                    stacklevel=3,
                )
    per_group: Dict[str, set] = {}
    for r in runs:
        per_group.setdefault("@".join(r.group.values()), set()).add(r.base)
    if len({frozenset(b) for b in per_group.values()}) > 1:
        listing = "; ".join(f"{g}: {sorted(b)}" for g, b in sorted(per_group.items()))
        warnings.warn(f"the groups were fine-tuned from different base models ({listing})", stacklevel=3)
    return bases


def _pm(stat: Dict[str, float], scale: float) -> str:
    if stat["n"] > 1:
        return f"{stat['mean'] * scale:.1f}±{stat['std'] * scale:.1f}"
    return f"{stat['mean'] * scale:.1f}"


def format_markdown(table: Dict[str, Any], scale: float = 100.0) -> str:
    """Table 1 layout: group keys, runs, domain tasks, domain avg, general tasks, general avg (Δ base)."""
    rows = [table["base"], *table["rows"]]
    keys = list(table["rows"][0]["group"]) if table["rows"] else []
    head = keys + ["runs"] + table["domain_tasks"] + ["Domain avg"] + table["general_tasks"] + ["General avg (Δ base)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        group = [r["group"][k] for k in keys] if "group" in r else ["base"] + [""] * (len(keys) - 1)
        general = _pm(r["general_avg"], scale)
        if "general_delta" in r:
            general += f" ({'+' if r['general_delta']['mean'] >= 0 else ''}{_pm(r['general_delta'], scale)})"
        cells = group + [str(r["n"])] + [_pm(r["domain"][t], scale) for t in table["domain_tasks"]]
        cells += [_pm(r["domain_avg"], scale)] + [_pm(r["general"][t], scale) for t in table["general_tasks"]] + [general]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(table: Dict[str, Any], path: Path) -> None:
    """One line per row (base first), mean and std of every score in separate columns (raw scale)."""
    stats = [("domain", t) for t in table["domain_tasks"]] + [("general", t) for t in table["general_tasks"]]
    names = [f"{s}/{t}" for s, t in stats] + ["domain_avg", "general_avg", "general_delta"]
    keys = list(table["rows"][0]["group"]) if table["rows"] else []
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", *keys, "runs"] + [f"{n}_{m}" for n in names for m in ("mean", "std")])
        for r in [table["base"], *table["rows"]]:
            values = [r[s][t] for s, t in stats] + [r["domain_avg"], r["general_avg"], r.get("general_delta")]
            cells: List[Any] = [r["label"], *[r.get("group", {}).get(k, "") for k in keys], r["n"]]
            for v in values:
                cells += ["", ""] if v is None else [v["mean"], v["std"]]
            writer.writerow(cells)


def pareto_points(table: Dict[str, Any], scale: float = 100.0) -> List[Dict[str, Any]]:
    """``{"label", "x", "y", "xerr", "yerr"}`` per row: general average (x) against domain average (y)."""
    return [
        {
            "label": r["label"],
            "x": r["general_avg"]["mean"] * scale,
            "y": r["domain_avg"]["mean"] * scale,
            "xerr": r["general_avg"]["std"] * scale,
            "yerr": r["domain_avg"]["std"] * scale,
        }
        for r in table["rows"]
    ]


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(prog="eaft-pl compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", required=True, help="MLflow experiment name")
    ap.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    ap.add_argument("--domain-suite", default="domain")
    ap.add_argument("--domain-metric", default="content", help="metric of the domain tasks (the embedded experiment's style-agnostic check)")
    ap.add_argument("--general-suite", default="general")
    ap.add_argument("--general-metric", default="exact", help="metric of the general tasks (house-style exact match)")
    ap.add_argument(
        "--group-by", nargs="+", default=["name"],
        help="name (the run name without its seed<N> part, as the embedded experiment names runs), tags.<name>, "
        "params.<name>; the runs of a group (its seeds) are aggregated",
    )  # fmt: skip
    ap.add_argument("--scale", type=float, default=100.0, help="multiply scores by this in the table and plot (100: %%)")
    ap.add_argument("--out", default=None, help="folder for table.md, table.csv, compare.json, pareto.png")
    ap.add_argument("--no-log", action="store_true", help="do not log a `compare` run to MLflow")
    opts = ap.parse_args(argv)

    from mlflow import MlflowClient

    from eaft_pl.analysis.plots import pareto_figure, save_figure

    client = MlflowClient(opts.tracking_uri)
    try:
        runs = load_runs(
            client, opts.experiment, domain_suite=opts.domain_suite, general_suite=opts.general_suite,
            domain_metric=opts.domain_metric, general_metric=opts.general_metric, group_by=opts.group_by,
        )  # fmt: skip
        table = group_runs(runs)
    except ValueError as e:
        ap.exit(2, f"eaft-pl compare: {e} (tracking URI {opts.tracking_uri})\n")
    markdown = format_markdown(table, opts.scale)
    print(markdown)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(opts.out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "table.md", lambda p: p.write_text(markdown + "\n"))
        atomic_write(folder / "table.csv", lambda p: write_csv(table, p))
        atomic_write(folder / "compare.json", lambda p: p.write_text(json.dumps(table, indent=2)))
        base = (table["base"]["general_avg"]["mean"] * opts.scale, table["base"]["domain_avg"]["mean"] * opts.scale)
        figure = pareto_figure(
            pareto_points(table, opts.scale), base=base,
            x_label=f"general average ({opts.general_suite}/{opts.general_metric})",
            y_label=f"domain average ({opts.domain_suite}/{opts.domain_metric})",
            title=f"{opts.experiment}: {len(runs)} runs, mean ± std over runs of a group",
        )  # fmt: skip
        atomic_write(folder / "pareto.png", lambda p: save_figure(figure, p))
        if not opts.no_log:
            exp = client.get_experiment_by_name(opts.experiment)
            run = client.create_run(exp.experiment_id, run_name="compare", tags={"stage": "compare"})
            try:
                client.log_artifacts(run.info.run_id, str(folder), "compare")
            except BaseException:
                client.set_terminated(run.info.run_id, status="FAILED")  # never left RUNNING
                raise
            client.set_terminated(run.info.run_id)
            print(f"logged to MLflow run {run.info.run_id} (artifacts compare/)")
        if opts.out:
            print(f"wrote {folder}/table.md, table.csv, compare.json, pareto.png")
    return table


if __name__ == "__main__":  # pragma: no cover
    main()
