"""``eaft-pl compare``: runs in the paper's Table 1 layout, and the Pareto plot of domain score
against general score (Fig. 5).

    eaft-pl compare --experiment toyworld [--tracking_uri sqlite:///mlruns/mlflow.db] [--out DIR]
    eaft-pl compare --tensorboard tb_logs/ --csv csv_logs/ --out DIR
    eaft-pl compare --lm_eval_base base.json --lm_eval a.json b.json --lm_eval_domain_tasks medqa \
        --lm_eval_general_tasks mmlu --domain_metric acc --general_metric acc --out DIR

The runs come from any of four sources, together: the finished runs of an MLflow experiment
(``--experiment``), TensorBoard log folders (``--tensorboard``), CSV log folders (``--csv``,
Lightning's ``metrics.csv`` and ``hparams.yaml``) and lm-eval results files (``--lm_eval``). In the
logs it reads the scores :class:`~eaft_pl.evaluation.ForgettingCallback` (or
:class:`~eaft_pl.evaluation.LMEvalCallback`) logs, ``val/<suite>/<task>/<metric>``, for a domain
suite and a general suite: the value at the first logged step is the base model's (the callback
scores it before the first update), the latest value is the fine-tuned model's. An lm-eval results
file is one fine-tuned model, compared with the ``--lm_eval_base`` file of the model it started from.
Runs are grouped by their name without its ``seed<N>`` and ``order<N>`` parts (the embedded experiment names runs
``<method>-lr<lr>-seed<seed>``) or by tags and params (``--group_by tags.gate
params.learning_rate``), so runs that differ only in their seed form one row, shown as mean ±
standard deviation. One row per group:
the domain tasks and their average, the general tasks and their average with the change against the
base. It prints the table, writes ``table.md``, ``table.csv``, ``compare.json`` and ``pareto.png``
to ``--out``, and, with ``--experiment``, logs them as a ``compare`` run in that experiment
(``--no_log`` to skip).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from eaft_pl.fileio import atomic_write

__all__ = [
    "RunScores", "LoggedRun", "Selection", "load_runs", "load_tensorboard_runs", "load_csv_runs", "load_lm_eval_runs",
    "select_scores", "group_runs", "format_markdown", "write_csv", "pareto_points", "main",
]  # fmt: skip


@dataclass
class RunScores:
    """Base and final score of every task of the two suites of one run.

    Attributes:
        run_id: MLflow run id, or the log folder or results file the run was read from.
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


@dataclass
class LoggedRun:
    """One run as any source holds it: its identity, tags, params and metric histories.

    Attributes:
        run_id: MLflow run id, or the folder or file the run was read from.
        name: Run name (the ``name`` grouping key strips its ``seed<N>`` and ``order<N>`` parts).
        tags: Run tags (MLflow tags; ``tags.json`` of a log folder).
        params: Run params (MLflow params; the top-level entries of a log folder's ``hparams.yaml``).
        metrics: The names of the metrics the run logged.
        history: ``history(name)`` gives that metric's ``(step, value)`` points in logging order.
    """

    run_id: str
    name: str
    tags: Dict[str, str]
    params: Dict[str, str]
    metrics: Collection[str]
    history: Callable[[str], List[Tuple[int, float]]]


@dataclass(frozen=True)
class Selection:
    """Which scores make the table and how runs are grouped (the command's options of the same names)."""

    domain_suite: str = "domain"
    domain_metric: str = "content"
    general_suite: str = "general"
    general_metric: str = "exact"
    group_by: Tuple[str, ...] = ("name",)

    def metric_names(self) -> str:
        return f"val/{self.domain_suite}/<task>/{self.domain_metric} and val/{self.general_suite}/<task>/{self.general_metric}"


#: The seed and data-order parts of a run name (``eaft-lr0.001-seed2-order1``), removed by the ``name``
#: grouping key, so the runs of a group are its seeds and orders.
SEED_PART = re.compile(r"[-_.]?(?:seed|order)[-_]?\d+")


def _key_value(run: LoggedRun, key: str) -> str:
    if key == "name":
        return SEED_PART.sub("", run.name or run.run_id)
    kind, _, name = key.partition(".")
    source = {"tags": run.tags, "params": run.params}.get(kind)
    if source is None or not name:
        raise ValueError(f"--group_by entries are name, tags.<name> or params.<name>, got {key!r}")
    return source.get(name, "?")


def _suite_tasks(metrics: Iterable[str], suite: str, metric: str) -> List[str]:
    tasks = []
    for key in metrics:
        parts = key.split("/")
        # val/<suite>/<task>/<metric>; "avg" is the callback's own average, recomputed here.
        if len(parts) == 4 and parts[0] == "val" and parts[1] == suite and parts[3] == metric and parts[2] != "avg":
            tasks.append(parts[2])
    return sorted(tasks)


def _scores(run: LoggedRun, selection: Selection) -> Optional[RunScores]:
    """The run's base (first step) and final (last step) scores of both suites; None when it lacks a suite."""
    d_tasks = _suite_tasks(run.metrics, selection.domain_suite, selection.domain_metric)
    g_tasks = _suite_tasks(run.metrics, selection.general_suite, selection.general_metric)
    if not d_tasks or not g_tasks:
        return None  # e.g. an `analyze` or `compare` run, or a run without the forgetting callback
    base = run.tags.get("model") or run.params.get("model_name_or_path") or run.run_id
    group = {k.partition(".")[2] or k: _key_value(run, k) for k in selection.group_by}
    scores = RunScores(run.run_id, run.name, group, base=base)
    for suite, metric, tasks, target in (
        (selection.domain_suite, selection.domain_metric, d_tasks, scores.domain),
        (selection.general_suite, selection.general_metric, g_tasks, scores.general),
    ):
        for task in tasks:
            # Stable sort by step: points of one step keep their logging order, so the latest wins.
            history = sorted(run.history(f"val/{suite}/{task}/{metric}"), key=lambda point: point[0])
            target[task] = (history[0][1], history[-1][1])
    return scores


def select_scores(runs: Iterable[LoggedRun], selection: Selection, where: str) -> List[RunScores]:
    """The scores of every run that logged both suites.

    Raises:
        ValueError: none did; the message names ``where`` the runs came from and lists the
            ``val/<suite>/<task>/<metric>`` names that were found, so the right options can be chosen.
    """
    out: List[RunScores] = []
    seen: set = set()
    for run in runs:
        seen.update(k for k in run.metrics if k.count("/") == 3 and k.startswith("val/"))
        scores = _scores(run, selection)
        if scores is not None:
            out.append(scores)
    if not out:
        found = ", ".join(sorted(seen)[:20]) or "none"
        raise ValueError(
            f"no run of {where} logged {selection.metric_names()}; metrics of that form found: {found}. "
            "Set --domain_suite/--domain_metric/--general_suite/--general_metric"
        )
    return out


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
    """The finished runs of an MLflow ``experiment`` that logged both suites, with base and final scores.

    Raises:
        ValueError: the experiment does not exist, or none of its runs has the suites' metrics (the
            message lists the ``val/<suite>/<task>/<metric>`` names that were found).
    """
    selection = Selection(domain_suite, domain_metric, general_suite, general_metric, tuple(group_by))
    return select_scores(mlflow_runs(client, experiment), selection, f"MLflow experiment {experiment!r}")


def mlflow_runs(client: Any, experiment: str) -> List[LoggedRun]:
    """The finished runs of an MLflow experiment (histories fetched when asked for)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} in this tracking store")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=5000)

    def history(run_id: str) -> Callable[[str], List[Tuple[int, float]]]:
        def points(name: str) -> List[Tuple[int, float]]:
            found = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
            return [(m.step, m.value) for m in found]

        return points

    return [
        LoggedRun(r.info.run_id, r.info.run_name or r.info.run_id, dict(r.data.tags), dict(r.data.params),
                  list(r.data.metrics), history(r.info.run_id))  # fmt: skip
        for r in runs
    ]


# ---- log folders -------------------------------------------------------------------------------------


def _folders_with(paths: Sequence[str], pattern: str, option: str) -> List[Path]:
    """Every folder at or below ``paths`` that holds a file matching ``pattern``, sorted."""
    found: set = set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise ValueError(f"{option} {path}: no such folder")
        here = {p.parent for p in path.rglob(pattern)}
        if not here:
            raise ValueError(f"{option} {path}: no {pattern} at or below this folder")
        found |= here
    return sorted(found)


def _folder_run(folder: Path, metrics: Dict[str, List[Tuple[int, float]]]) -> LoggedRun:
    """A log folder as a run: named after Lightning's ``<save_dir>/<name>/version_<n>`` layout by its
    logger's name, with ``tags.json`` (written by eaft-pl's callbacks) and ``hparams.yaml``."""
    name = folder.parent.name if re.fullmatch(r"version_\d+", folder.name) else folder.name
    tags_file, hparams_file = folder / "tags.json", folder / "hparams.yaml"
    tags = json.loads(tags_file.read_text()) if tags_file.is_file() else {}
    hparams = (yaml.safe_load(hparams_file.read_text()) if hparams_file.is_file() else None) or {}
    params = {str(k): str(v) for k, v in hparams.items()} if isinstance(hparams, dict) else {}
    return LoggedRun(str(folder), name, {str(k): str(v) for k, v in tags.items()}, params, list(metrics),
                     lambda key: metrics.get(key, []))  # fmt: skip


def read_metrics_csv(path: Path) -> Dict[str, List[Tuple[int, float]]]:
    """``metric -> [(step, value), ...]`` from Lightning's ``metrics.csv`` (one column per metric,
    a row per logging call, empty cells for the metrics that call did not log).

    Raises:
        ValueError: the file has no ``step`` column, or a cell is not a number (the file, line and column are named).
    """
    out: Dict[str, List[Tuple[int, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "step" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no 'step' column; is this a Lightning CSVLogger metrics.csv?")
        for line, row in enumerate(reader, start=2):
            try:
                step = int(float(row["step"]))
                for key, cell in row.items():
                    if key not in ("step", None) and cell not in ("", None):
                        out.setdefault(key, []).append((step, float(cell)))
            except ValueError as e:
                raise ValueError(f"{path}, line {line}: {e}") from None
    return out


def load_csv_runs(paths: Sequence[str], selection: Selection) -> List[RunScores]:
    """The runs of the CSV log folders at or below ``paths`` (each folder with a ``metrics.csv``)."""
    folders = _folders_with(paths, "metrics.csv", "--csv")
    runs = [_folder_run(folder, read_metrics_csv(folder / "metrics.csv")) for folder in folders]
    return select_scores(runs, selection, f"CSV logs {', '.join(map(str, paths))}")


def read_tensorboard_scalars(folder: Path) -> Dict[str, List[Tuple[int, float]]]:
    """``metric -> [(step, value), ...]`` of every scalar in the TensorBoard event files of ``folder``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as e:
        raise ValueError("reading TensorBoard logs needs the tensorboard package: pip install 'eaft-pl[tensorboard]'") from e
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def load_tensorboard_runs(paths: Sequence[str], selection: Selection) -> List[RunScores]:
    """The runs of the TensorBoard log folders at or below ``paths`` (each folder with event files)."""
    folders = _folders_with(paths, "events.out.tfevents.*", "--tensorboard")
    runs = [_folder_run(folder, read_tensorboard_scalars(folder)) for folder in folders]
    return select_scores(runs, selection, f"TensorBoard logs {', '.join(map(str, paths))}")


# ---- lm-eval results files ---------------------------------------------------------------------------


def read_lm_eval_results(path: Path) -> Dict[str, Any]:
    """The ``results`` table (task -> ``{"<metric>,<filter>": value}``) of an lm-eval results file:
    lm-eval's own ``results*.json``, or a ``step_<step>.json`` that ``LMEvalCallback`` logs (which
    wraps lm-eval's dict in ``results``)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"lm-eval results file {path}: {e}") from None
    inner = data.get("results") if isinstance(data, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("results"), dict):
        inner = inner["results"]  # LMEvalCallback's record around lm-eval's dict
    if not isinstance(inner, dict):
        raise ValueError(f"lm-eval results file {path}: no 'results' table; pass the results*.json lm-eval writes")
    return inner


def lm_eval_score(table: Dict[str, Any], task: str, metric: str, path: Path) -> float:
    """``metric`` of ``task``: lm-eval's key ``metric`` itself (``exact_match,strict-match``), or
    ``<metric>,none`` for a metric without a filter (``acc`` reads ``acc,none``).

    Raises:
        ValueError: the task or the metric is missing; the message lists what the file has.
    """
    entry = table.get(task)
    if not isinstance(entry, dict):
        raise ValueError(f"lm-eval results file {path}: no task {task!r}; it has {', '.join(sorted(table))}")
    for key in (metric, f"{metric},none"):
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            return float(value)
    metrics = sorted(k for k in entry if "," in k and "_stderr" not in k)
    raise ValueError(f"lm-eval results file {path}: task {task!r} has no score {metric!r}; it has {', '.join(metrics)}")


def _lm_eval_name(path: Path) -> str:
    # lm-eval writes <output_path>/<model>/results_<timestamp>.json: the folder names the model.
    return path.parent.name if path.stem.startswith("results") else path.stem


def load_lm_eval_runs(
    files: Sequence[str], base: str, domain_tasks: Sequence[str], general_tasks: Sequence[str], selection: Selection
) -> List[RunScores]:
    """One run per lm-eval results file of a fine-tuned model, its base scores from the ``base`` file.

    The ``domain_tasks`` form the domain suite and the ``general_tasks`` the general one, scored by
    ``selection``'s domain and general metric. A run is named after its file (lm-eval's folder of
    ``results_<time>.json``, else the file's stem).
    """
    if not domain_tasks or not general_tasks:
        raise ValueError("--lm_eval needs --lm_eval_domain_tasks and --lm_eval_general_tasks (lm-eval's task names)")
    base_path = Path(base)
    base_table = read_lm_eval_results(base_path)
    suites = [(selection.domain_suite, selection.domain_metric, domain_tasks),
              (selection.general_suite, selection.general_metric, general_tasks)]  # fmt: skip
    runs = []
    for path in map(Path, files):
        table = read_lm_eval_results(path)
        metrics = {
            f"val/{suite}/{task}/{metric}": [(0, lm_eval_score(base_table, task, metric, base_path)),
                                              (1, lm_eval_score(table, task, metric, path))]  # fmt: skip
            for suite, metric, tasks in suites
            for task in tasks
        }
        runs.append(LoggedRun(str(path), _lm_eval_name(path), {"model": str(base_path)}, {}, list(metrics),
                              lambda key, m=metrics: m.get(key, [])))  # fmt: skip
    return select_scores(runs, selection, "the lm-eval results files")


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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eaft-pl compare", description=__doc__.split("\n\n")[0])
    src = ap.add_argument_group("sources (any of them, together)")
    src.add_argument("--experiment", default=None, help="MLflow experiment name (its FINISHED runs)")
    src.add_argument("--tracking_uri", default="sqlite:///mlruns/mlflow.db", help="MLflow tracking URI of --experiment")
    src.add_argument("--tensorboard", nargs="+", default=[], metavar="DIR",
                     help="TensorBoard log folders; every folder below with event files is a run")  # fmt: skip
    src.add_argument("--csv", nargs="+", default=[], metavar="DIR",
                     help="CSV log folders; every folder below with a metrics.csv (Lightning's CSVLogger) is a run")  # fmt: skip
    src.add_argument("--lm_eval", nargs="+", default=[], metavar="FILE",
                     help="lm-eval results files of fine-tuned models (lm-eval's results*.json), one run each")  # fmt: skip
    src.add_argument("--lm_eval_base", default=None, metavar="FILE", help="lm-eval results file of the base model (with --lm_eval)")
    src.add_argument("--lm_eval_domain_tasks", nargs="+", default=[], metavar="TASK", help="lm-eval tasks of the domain suite")
    src.add_argument("--lm_eval_general_tasks", nargs="+", default=[], metavar="TASK", help="lm-eval tasks of the general suite")
    ap.add_argument("--domain_suite", default="domain", help="suite of the domain tasks in the logs: val/<suite>/<task>/<metric>")
    ap.add_argument("--domain_metric", default="content",
                    help="metric of the domain tasks (the embedded experiment's style-agnostic check; lm-eval: acc, exact_match,strict-match, ...)")  # fmt: skip
    ap.add_argument("--general_suite", default="general", help="suite of the general tasks in the logs")
    ap.add_argument("--general_metric", default="exact", help="metric of the general tasks (house-style exact match)")
    ap.add_argument(
        "--group_by", nargs="+", default=["name"],
        help="name (the run name without its seed<N> and order<N> parts, as the embedded experiment names runs; a log folder's "
        "logger name), tags.<name>, params.<name> (hparams.yaml in a log folder); the runs of a group (its seeds) are aggregated",
    )  # fmt: skip
    ap.add_argument("--scale", type=float, default=100.0, help="multiply scores by this in the table and plot (100: %%)")
    ap.add_argument("--out", default=None, help="folder for table.md, table.csv, compare.json, pareto.png")
    ap.add_argument("--no_log", action="store_true", help="do not log a `compare` run to the MLflow experiment")
    return ap


def _load(opts: argparse.Namespace, selection: Selection) -> List[RunScores]:
    """The runs of every source the options name."""
    runs: List[RunScores] = []
    if opts.experiment:
        from mlflow import MlflowClient

        client = MlflowClient(opts.tracking_uri)
        try:
            runs += select_scores(mlflow_runs(client, opts.experiment), selection, f"MLflow experiment {opts.experiment!r}")
        except ValueError as e:
            raise ValueError(f"{e} (tracking URI {opts.tracking_uri})") from None
    if opts.tensorboard:
        runs += load_tensorboard_runs(opts.tensorboard, selection)
    if opts.csv:
        runs += load_csv_runs(opts.csv, selection)
    if opts.lm_eval:
        if not opts.lm_eval_base:
            raise ValueError("--lm_eval needs --lm_eval_base, the results file of the model the runs started from")
        runs += load_lm_eval_runs(opts.lm_eval, opts.lm_eval_base, opts.lm_eval_domain_tasks, opts.lm_eval_general_tasks, selection)
    return runs


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``eaft-pl compare``: print the table of the runs the options name and write its files."""
    ap = _parser()
    opts = ap.parse_args(argv)
    if not (opts.experiment or opts.tensorboard or opts.csv or opts.lm_eval):
        ap.error("name runs to compare: --experiment, --tensorboard, --csv and/or --lm_eval")
    log = bool(opts.experiment) and not opts.no_log  # the compare run goes into the MLflow experiment

    from eaft_pl.analysis.plots import pareto_figure, save_figure

    selection = Selection(opts.domain_suite, opts.domain_metric, opts.general_suite, opts.general_metric, tuple(opts.group_by))
    try:
        runs = _load(opts, selection)
        table = group_runs(runs)
    except ValueError as e:
        ap.exit(2, f"eaft-pl compare: {e}\n")
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
            title=f"{opts.experiment or 'compare'}: {len(runs)} runs, mean ± std over runs of a group",
        )  # fmt: skip
        atomic_write(folder / "pareto.png", lambda p: save_figure(figure, p))
        if log:
            _log_compare_run(opts.tracking_uri, opts.experiment, folder)
        if opts.out:
            print(f"wrote {folder}/table.md, table.csv, compare.json, pareto.png")
    return table


def _log_compare_run(tracking_uri: str, experiment: str, folder: Path) -> None:
    """The outputs as the artifacts of a run named ``compare`` in the experiment, never left RUNNING."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(exp.experiment_id, run_name="compare", tags={"stage": "compare"})
    try:
        client.log_artifacts(run.info.run_id, str(folder), "compare")
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id)
    print(f"logged to MLflow run {run.info.run_id} (artifacts compare/)")


if __name__ == "__main__":  # pragma: no cover
    main()
