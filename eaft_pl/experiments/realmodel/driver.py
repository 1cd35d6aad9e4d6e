"""The real-model experiment: SmolLM2-135M-Instruct (or any model the loader accepts) fine-tuned on a
realistic domain answered in a teacher's voice, with each method, learning rate and seed, through the
package's own CLI and configs; what it learns of the domain and forgets of its general skills, in the
paper's Table 1 layout.

    python scripts/real_experiment.py                       # make real-demo: SFT and EAFT, one seed
    python scripts/real_experiment.py --methods sft eaft static_mask sft_kl dft --lrs 2e-5 5e-5 --seeds 0 1 2
    python scripts/real_experiment.py --methods sft eaft --seeds 0 1 2 --pilot docs/results/real_pilot.json  # the pilot's rates and length

Before any fine-tuning it runs ``eaft-pl analyze`` on the base: the confident-conflict shares of the
teacher's answers against the base's own greedy answers to the same prompts (the paper's Fig. 1b).

Every run is an MLflow run (experiment ``realmodel``). Each finished run is also written to
``<out>/runs/<name>.json`` with a key of everything that determines it (the options, the setup and
method configs): a rerun of the same command skips the runs it finds, so a grid can be completed over
several sittings, and a changed option or config runs again; ``--summary_only`` summarises the
finished runs of a grid without running the rest. The summary (per method and learning
rate: domain score, each general suite, the general average and its change against the base, the KL
to the base, as mean and standard deviation over seeds; the conflict shares; the forgetting and cohort
curves) is printed and written as a results file stamped with command, commit and machine
(:mod:`eaft_pl.results`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from eaft_pl.experiments.realmodel.datamodule import DOMAINS
from eaft_pl.experiments.runner import add_run_options, cohort_curves, cohort_figure, mean_std, quiet_run, run_cli, ui_command
from eaft_pl.fileio import atomic_write
from eaft_pl.results import command_line, read_results, stamp, write_results

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SETUP = CONFIGS / "setup" / "smollm2_math.yaml"
METHODS = CONFIGS / "method"
ALL_METHODS = sorted(p.stem for p in METHODS.glob("*.yaml"))
EXPERIMENT = "realmodel"
#: The general-suite metrics of the table: (task, metric, column, scale). ``acc`` metrics of scored
#: suites make the general average; the others are continuous (perplexity, agreement, KL).
GENERAL_COLUMNS = [
    ("facts", "acc", "Facts", 100.0),
    ("instructions", "acc", "Instructions", 100.0),
    ("prose", "ppl", "Prose ppl", 1.0),
    ("agreement", "agree", "Agree", 100.0),  # whole greedy answers as the base's: 0 once any token moves
    ("agreement", "token_agree", "Token agree", 100.0),  # the base's answer tokens still the top-1 prediction
    ("agreement", "kl", "KL to base", 1.0),
]
#: Forgetting-curve panels: (a key of :func:`scores`, title).
CURVES = [
    ("domain", "domain: held-out accuracy"),
    ("facts/acc", "general: world facts (accuracy)"),
    ("prose/ppl", "general: prose perplexity"),
    ("agreement/kl", "general: KL(base || model) on the base's answers"),
]

__all__ = [
    "main", "analyze_base", "finetune", "summarise", "format_table", "paired", "format_paired", "conflicts_line", "curves_figure",
    "pareto_figure", "pilot_choice", "run_key",
]  # fmt: skip


def _overrides(opts: argparse.Namespace, seed: int) -> List[str]:
    """The options every subcommand of the experiment shares: model, data and store."""
    return [
        f"--model.init_args.model_name_or_path={opts.model}",
        f"--data.init_args.tokenizer_name_or_path={opts.model}",
        f"--data.init_args.domain={opts.domain}",
        f"--data.init_args.seed={seed}",
        f"--data.init_args.n_train={opts.n_train}",
        f"--data.init_args.n_test={opts.n_test}",
        f"--data.init_args.batch_size={opts.batch_size}",
        f"--trainer.logger.init_args.tracking_uri={opts.tracking_uri}",
        f"--trainer.logger.init_args.experiment_name={EXPERIMENT}",
        *(f"--{o}" for o in opts.override),
    ]


def run_key(opts: argparse.Namespace, *parts: Any, configs: Sequence[Path] = (), keyed: Optional[Set[str]] = None) -> str:
    """A key of everything that determines one unit of work: the experiment's options that reach it
    (``keyed``, default: those of a fine-tuning run), ``parts`` (method, learning rate, seed, ...) and
    the text of its config files. A cached unit is reused only under the same key."""
    fields = {k: v for k, v in vars(opts).items() if k in (_KEYED if keyed is None else keyed)}
    recipe = json.dumps([fields, [str(p) for p in parts], [Path(c).read_text() for c in configs]], sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


#: The options that change what a run computes (not where it writes, how verbose it is, or the grid).
_KEYED = {
    "model", "domain", "n_train", "n_test", "batch_size", "steps", "eval_every", "cohort_every", "threads", "analyze_examples",
    "max_new_tokens", "override",
}  # fmt: skip
#: The options that change the analysis of the base (not the training length or batch).
_KEYED_ANALYSIS = {"model", "domain", "n_train", "analyze_examples", "max_new_tokens", "threads", "override"}


def _cached(path: Path, key: str) -> Optional[Dict[str, Any]]:
    """The record at ``path`` if it was written under ``key``."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn file from a killed run: run it again
    return record["result"] if record.get("key") == key else None


def _store(path: Path, key: str, result: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps({"key": key, "result": result})))


def analyze_base(opts: argparse.Namespace, seed: int) -> Optional[Dict[str, Any]]:
    """``eaft-pl analyze`` of the base on ``analyze_examples`` teacher answers of the training split and
    on the base's own greedy answers to the same prompts; returns the shares of confident conflicts
    (absolute and quantile rules), mean p and H, and where the figures are (``None`` under
    ``--summary_only`` when it has not run)."""
    folder = Path(opts.out) / f"analyze-seed{seed}"
    key = run_key(opts, "analyze", seed, configs=[SETUP, METHODS / "eaft.yaml"], keyed=_KEYED_ANALYSIS)
    cached = _cached(folder / "record.json", key)
    if cached is not None:
        print(f"[analyze] seed {seed}: cached at {folder}", flush=True)
        return cached
    if opts.summary_only:
        print(f"[analyze] seed {seed}: not run yet", flush=True)
        return None
    print(f"[analyze] seed {seed}: {opts.analyze_examples} teacher answers and the base's own ...", end=" ", flush=True)
    start = time.time()
    # analyze prints its own report; the driver prints one line and keeps the report in <folder>/report.md.
    with contextlib.nullcontext() if opts.verbose else contextlib.redirect_stdout(io.StringIO()):
        run_cli(
            ["analyze", "--config", str(SETUP), "--config", str(METHODS / "eaft.yaml"), *_overrides(opts, seed),
             f"--trainer.logger.init_args.run_name=analyze-base-seed{seed}", f"--max_examples={opts.analyze_examples}",
             f"--seed={seed}", "--on_policy=greedy", f"--max_new_tokens={opts.max_new_tokens}", "--full_entropy=true",
             f"--output_dir={folder}", "--progress_bar=false"],
            opts.verbose,
        )  # fmt: skip
    summary = json.loads((folder / "summary.json").read_text())
    result = {
        "seed": seed,
        "wall_s": time.time() - start,
        "folder": str(folder),
        "figures": [str(folder / "plane.png"), str(folder / "weights.png")],
        **{source: _analysis_row(summary[source]) for source in ("sft_data", "on_policy") if summary.get(source)},
        "top_conflict_tokens": summary["top_conflict_tokens"][:10],
    }
    _store(folder / "record.json", key, result)
    print(f"{result['wall_s']:.0f} s", flush=True)
    return result


def _analysis_row(source: Dict[str, Any]) -> Dict[str, Any]:
    conflicts = source["conflicts"]
    return {
        "tokens": source["tokens"],
        "label_prob": source["label_prob"],
        "topk_entropy": source["topk_entropy"],
        "conflict_share": conflicts["absolute_share"],
        "conflict_share_quantile": conflicts["quantile_share"],
        "eaft_weight": source["weights"]["eaft"]["mean"],
        "full_entropy_pearson": source.get("full_entropy", {}).get("pearson_with_topk"),
    }


def run_name(method: str, lr: float, seed: int) -> str:
    """A run's name: its MLflow run name and its cache file's stem under ``<out>/runs``."""
    return f"{method}-lr{lr:g}-seed{seed}"


def finetune(opts: argparse.Namespace, method: str, lr: float, seed: int) -> Optional[Dict[str, Any]]:
    """One fine-tuning run (cached under ``<out>/runs``): the forgetting and cohort callbacks' histories,
    the wall time and the MLflow run id (``None`` under ``--summary_only`` when it has not run)."""
    from eaft_pl.evaluation import ForgettingCallback
    from eaft_pl.evaluation.cohort import ConflictCohortCallback

    name = run_name(method, lr, seed)
    path = Path(opts.out) / "runs" / f"{name}.json"
    key = run_key(opts, method, lr, seed, configs=[SETUP, METHODS / f"{method}.yaml"])
    cached = _cached(path, key)
    if cached is not None:
        return {**cached, "cached": True}
    if opts.summary_only:
        return None
    start = time.time()
    cli = run_cli(
        ["fit", "--config", str(SETUP), "--config", str(METHODS / f"{method}.yaml"), *_overrides(opts, seed),
         f"--model.init_args.learning_rate={lr}", f"--trainer.max_steps={opts.steps}",
         f"--trainer.val_check_interval={opts.eval_every}", f"--trainer.logger.init_args.run_name={name}",
         f"--trainer.callbacks.init_args.every_n_steps={opts.eval_every}", f"--cohort.every_n_steps={opts.cohort_every}",
         f"--model.init_args.reference_cache_dir={opts.out}/reference_cache"],
        opts.verbose,
    )  # fmt: skip
    forgetting = next(c for c in cli.trainer.callbacks if isinstance(c, ForgettingCallback))
    cohort = next(c for c in cli.trainer.callbacks if isinstance(c, ConflictCohortCallback))
    result = {
        "method": method, "lr": lr, "seed": seed, "name": name,
        "run_id": cli.trainer.logger.run_id, "wall_s": time.time() - start,
        "history": forgetting.history, "cohort": cohort.history, "cohort_s": cohort.seconds,
    }  # fmt: skip
    _store(path, key, result)
    return {**result, "cached": False}


# ---- summary ------------------------------------------------------------------------------------


def scores(entry: Dict[str, Any]) -> Dict[str, float]:
    """The table's numbers of one evaluation (a forgetting-callback history entry): the domain's
    accuracy and style, each general metric of :data:`GENERAL_COLUMNS` the run scored, and the general
    average (the mean accuracy of the scored general suites)."""
    s = entry["scores"]
    (domain,) = s["domain"].values()  # the domain suite's one task, named after its domain
    out = {"domain": domain["accuracy"], "style": domain.get("style", float("nan"))}
    general = s.get("general", {})
    accs = []
    for task, metric, _, _ in GENERAL_COLUMNS:
        if metric in general.get(task, {}):
            out[f"{task}/{metric}"] = general[task][metric]
            if metric == "acc":
                accs.append(general[task][metric])
    out["general"] = sum(accs) / len(accs) if accs else float("nan")
    return out


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per (method, lr): the base's and the final scores, the general average's change against the
    base, the forgetting and cohort curves, each as mean and std over seeds."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(f"{run['method']}@{run['lr']:g}", []).append(run)
    rows = {}
    for key, members in groups.items():
        base = [scores(r["history"][0]) for r in members]
        final = [scores(r["history"][-1]) for r in members]
        row: Dict[str, Any] = {"method": members[0]["method"], "lr": members[0]["lr"], "seeds": [r["seed"] for r in members]}
        row["final"] = {k: mean_std([f[k] for f in final]) for k in final[0]}
        row["base"] = {k: mean_std([b[k] for b in base]) for k in base[0]}
        row["general_delta"] = mean_std([f["general"] - b["general"] for b, f in zip(base, final)])
        # The pilot's yardstick: how many seed spreads the general average's drop is (NaN without a spread).
        spread = row["general_delta"]["std"]
        row["drop_over_std"] = -row["general_delta"]["mean"] / spread if spread > 0 else float("nan")
        row["curves"] = _curves(members)
        row["cohort"] = cohort_curves(members)
        row["wall_s"] = mean_std([r["wall_s"] for r in members])
        row["run_ids"] = [r["run_id"] for r in members]
        rows[key] = row
    return rows


#: The paired differences against SFT: (a key of :func:`scores`, column, scale, digits).
PAIRED_COLUMNS = [
    ("domain", "Domain", 100.0, 1),
    ("general", "General avg", 100.0, 1),
    ("prose/ppl", "Prose ppl", 1.0, 2),
    ("agreement/kl", "KL to base", 1.0, 3),
]


def paired(runs: List[Dict[str, Any]], reference: str = "sft") -> Dict[str, Any]:
    """Per (method, lr) other than ``reference``: its final scores minus the reference method's at the
    same learning rate and seed, as mean and std over the seeds both ran. A seed fixes the training
    order, the held-out problems and the general items, and every method of a seed starts from the
    same base, so the per-seed difference removes what the methods of a seed share (which items are
    hard, which requests are held out); its spread is the comparison's own."""
    final = {(r["method"], r["lr"], r["seed"]): scores(r["history"][-1]) for r in runs}
    out: Dict[str, Any] = {}
    for (method, lr, _seed) in final:
        key = f"{method}@{lr:g}"
        if method == reference or key in out:
            continue
        seeds = sorted(s for (m, l, s) in final if m == method and l == lr and (reference, lr, s) in final)
        if not seeds:
            continue
        diffs = {
            name: mean_std([final[(method, lr, s)][name] - final[(reference, lr, s)][name] for s in seeds])
            for name, _, _, _ in PAIRED_COLUMNS
            if all(name in final[(m, lr, s)] for s in seeds for m in (method, reference))
        }
        out[key] = {"method": method, "lr": lr, "reference": f"{reference}@{lr:g}", "seeds": seeds, **diffs}
    return out


def format_paired(comparisons: Dict[str, Any]) -> str:
    """The paired differences against SFT as a table: each method's final score minus SFT's under the
    same seed, mean±std over seeds (accuracies in points; positive means more than SFT)."""
    if not comparisons:
        return ""
    head = ["method", "lr", "seeds"] + [f"{column} − SFT" for _, column, _, _ in PAIRED_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in comparisons.values():
        cells = []
        for name, _, scale, digits in PAIRED_COLUMNS:
            stat = row.get(name)
            cells.append("-" if stat is None else ("+" if stat["mean"] >= 0 else "") + _cell(stat, scale, digits))
        lines.append("| " + " | ".join([row["method"], f"{row['lr']:g}", str(len(row["seeds"])), *cells]) + " |")
    return "\n".join(lines)


def _curves(members: List[Dict[str, Any]]) -> Dict[str, List[List[float]]]:
    """``<key of scores> -> [[step, mean, std], ...]`` over the seeds: the forgetting curves of every
    number of :func:`scores` (the figure draws :data:`CURVES`)."""
    steps: Dict[int, List[Dict[str, float]]] = {}
    for run in members:
        for entry in run["history"]:
            steps.setdefault(entry["step"], []).append(scores(entry))
    out: Dict[str, List[List[float]]] = {}
    for step in sorted(steps):
        for key in steps[step][0]:
            stat = mean_std([s[key] for s in steps[step] if key in s])
            out.setdefault(key, []).append([step, stat["mean"], stat["std"]])
    return out


def _cell(stat: Dict[str, float], scale: float, digits: int) -> str:
    if stat["n"] == 0:
        return "-"
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text if stat["n"] == 1 else f"{text}±{stat['std'] * scale:.{digits}f}"


def format_table(rows: Dict[str, Any]) -> str:
    """The paper's Table 1 layout: domain score (and the share of answers in the teacher's style), each
    general suite, the general average with its change against the base, and the KL to the base.
    Accuracies in %, mean±std over seeds."""
    first = next(iter(rows.values()))
    columns = [c for c in GENERAL_COLUMNS if f"{c[0]}/{c[1]}" in first["base"]]
    head = ["method", "lr", "Domain", "Teacher style"] + [c[2] for c in columns] + ["General avg (Δ base)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(stats: Dict[str, Dict[str, float]]) -> List[str]:
        out = [_cell(stats["domain"], 100, 1), _cell(stats["style"], 100, 1)]
        for task, metric, _, scale in columns:
            out.append(_cell(stats[f"{task}/{metric}"], scale, 1 if scale == 100 else 3 if metric == "kl" else 2))
        return out

    lines.append("| " + " | ".join(["base", "", *cells(first["base"]), _cell(first["base"]["general"], 100, 1)]) + " |")
    for row in rows.values():
        delta = row["general_delta"]
        sign = "+" if delta["n"] and delta["mean"] >= 0 else ""
        general = f"{_cell(row['final']['general'], 100, 1)} ({sign}{_cell(delta, 100, 1)})"
        lines.append("| " + " | ".join([row["method"], f"{row['lr']:g}", *cells(row["final"]), general]) + " |")
    return "\n".join(lines)


def conflicts_line(analyses: Dict[str, Dict[str, Any]]) -> str:
    """The printed Fig. 1b summary: confident conflicts among the teacher's answer tokens against the
    base's own greedy answers (absolute rule, mean over seeds)."""

    def share(source: str) -> str:
        stat = mean_std([a[source]["conflict_share"] for a in analyses.values() if source in a])
        tokens = sum(a[source]["tokens"] for a in analyses.values() if source in a)
        return f"{_cell(stat, 100, 1)}% of {tokens} tokens"

    return f"Confident conflicts under the base: teacher's answers {share('sft_data')}; the base's own greedy answers {share('on_policy')}"


def curves_figure(rows: Dict[str, Any], lr: float) -> Any:
    """The forgetting curves at learning rate ``lr``: domain accuracy, facts, prose perplexity and the
    KL to the base against the optimizer step, one line per method (mean and std over seeds)."""
    from eaft_pl.analysis.plots import curves_figure as draw

    chosen = [r for r in rows.values() if r["lr"] == lr]
    panels = [(title, {r["method"]: r["curves"].get(key, []) for r in chosen}) for key, title in CURVES]
    return draw(panels, title=f"What each method learns and forgets (lr {lr:g})")


def pareto_figure(rows: Dict[str, Any], lr: float) -> Any:
    """Domain score against the general average at the end of training, one point per method at
    learning rate ``lr`` (mean, with the std over seeds as error bars), and the base (the paper's
    Fig. 5 on this model)."""
    from eaft_pl.analysis.plots import pareto_figure as draw

    chosen = [r for r in rows.values() if r["lr"] == lr]
    points = [
        {"label": r["method"], "x": 100 * r["final"]["general"]["mean"], "y": 100 * r["final"]["domain"]["mean"],
         "xerr": 100 * r["final"]["general"]["std"], "yerr": 100 * r["final"]["domain"]["std"]}
        for r in chosen
    ]  # fmt: skip
    base = chosen[0]["base"]
    return draw(
        points, base=(100 * base["general"]["mean"], 100 * base["domain"]["mean"]), x_label="general average (%)",
        y_label="domain: held-out accuracy (%)", title=f"Domain against general skill after fine-tuning (lr {lr:g})",
    )  # fmt: skip


# ---- the command ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="EAFT against SFT (and the baselines) on a real pretrained model.")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="short name, GGUF file or Hugging Face folder")
    ap.add_argument("--domain", choices=sorted(DOMAINS), default="tools", help="tools: the base never uses the call format, which a short run can teach; math: the base's arithmetic limits its score")
    ap.add_argument("--methods", nargs="+", default=["sft", "eaft"], help=f"any of {ALL_METHODS}")
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates (default: 1e-4, or the pilot's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="each seed: its own problems, order and general items")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 40, or the pilot's)")
    ap.add_argument(
        "--pilot", default=None, metavar="RESULTS",
        help="take the learning rates and the length from the pilot's results file (make real-pilot), not by hand",
    )  # fmt: skip
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--eval_every", type=int, default=40, help="forgetting evaluation every N steps (and before the first, and at the end)")
    ap.add_argument("--cohort_every", type=int, default=10, help="conflict-cohort evaluation every N steps")
    ap.add_argument("--n_train", type=int, default=2000)
    ap.add_argument("--n_test", type=int, default=32, help="held-out domain problems scored at each evaluation")
    ap.add_argument("--analyze_examples", type=int, default=32, help="teacher answers analysed (0: skip the analysis)")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="longest greedy answer of the base in the analysis (default: the domain's budget)")
    ap.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE",
        help="a config override for every run and the analysis, as eaft-pl takes it without its dashes "
        "(e.g. trainer.precision=bf16-mixed, data.init_args.general_sizes='{\"n_facts\": 64}'); repeatable",
    )  # fmt: skip
    add_run_options(ap, out="outputs/realmodel")  # --threads, --out (analyses, finished runs), --tracking_uri, --results, --verbose
    ap.add_argument(
        "--summary_only", action="store_true",
        help="run nothing: summarise the runs of this grid that have finished (the results file lists the missing ones)",
    )  # fmt: skip
    ap.add_argument("--figures", default=None, help="folder of the curves and cohort figures (default: beside the results file)")
    return ap


def pilot_choice(path: str) -> Tuple[List[float], int]:
    """The learning rates and the number of steps the pilot's results file chose (its ``choice``)."""
    choice = read_results(path).get("choice")
    if not isinstance(choice, dict) or "lrs" not in choice or "steps" not in choice:
        raise SystemExit(f"{path} has no pilot 'choice': write it with scripts/real_pilot.py (make real-pilot)")
    if not choice["lrs"]:
        raise SystemExit(f"{path}: the pilot found no learning rate at which SFT forgets measurably; pass --lrs and --steps yourself")
    return [float(lr) for lr in choice["lrs"]], int(choice["steps"])


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the experiment (options: ``--help``) and return what it wrote to the results file."""
    ap = _parser()
    opts = ap.parse_args(argv)
    unknown = sorted(set(opts.methods) - set(ALL_METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    bad = [o for o in opts.override if "=" not in o or o.startswith("-")]
    if bad:
        ap.error(f"--override takes KEY=VALUE without leading dashes, got {bad}")
    if opts.pilot is not None:
        if opts.lrs is not None or opts.steps is not None:
            ap.error("--pilot sets the learning rates and the length: leave out --lrs and --steps")
        opts.lrs, opts.steps = pilot_choice(opts.pilot)
    opts.lrs = [1e-4] if opts.lrs is None else opts.lrs
    opts.steps = 40 if opts.steps is None else opts.steps
    for name in ("steps", "batch_size", "eval_every", "cohort_every", "n_train", "n_test", "threads"):
        if getattr(opts, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(opts, name)}")
    if opts.max_new_tokens is None:
        opts.max_new_tokens = DOMAINS[opts.domain]
    command = command_line("scripts/real_experiment.py", argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with quiet_run(opts.verbose, opts.threads):
        return _run(opts, command)


def _run(opts: argparse.Namespace, command: str) -> Dict[str, Any]:
    from eaft_pl.models.gguf import resolve_model_path

    start = time.time()
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    path = opts.results or f"{opts.out}/results.json"
    folder = resolve_model_path(opts.model)  # converts a GGUF once (cached); a folder or hub id passes through
    print(f"[model] {opts.model}: {folder} ({time.time() - start:.0f} s)", flush=True)
    found = {str(seed): analyze_base(opts, seed) for seed in opts.seeds if opts.analyze_examples > 0}
    analyses = {seed: a for seed, a in found.items() if a is not None}
    runs: List[Dict[str, Any]] = []
    missing: List[str] = []
    total = len(opts.seeds) * len(opts.lrs) * len(opts.methods)
    result: Dict[str, Any] = {}
    for seed in opts.seeds:
        for lr in opts.lrs:
            for method in opts.methods:
                run = finetune(opts, method, lr, seed)
                if run is None:  # --summary_only: not run yet
                    missing.append(run_name(method, lr, seed))
                    print(f"[{len(runs) + len(missing)}/{total}] {method} lr={lr:g} seed {seed}: not run yet", flush=True)
                    continue
                runs.append(run)
                final, base = scores(run["history"][-1]), scores(run["history"][0])
                print(
                    f"[{len(runs) + len(missing)}/{total}] {method} lr={lr:g} seed {seed}: domain {final['domain']:.1%} (base {base['domain']:.1%}), "
                    f"general {final['general']:.1%} (base {base['general']:.1%}), "
                    + (f"{run['wall_s']:.0f} s" if not run["cached"] else f"cached ({run['wall_s']:.0f} s when run)"),
                    flush=True,
                )
                rows, comparisons = summarise(runs), paired(runs)
                # Rewritten after every run: a grid stopped early still leaves the summary of what ran.
                result = {
                    "settings": vars(opts),
                    "model_folder": folder,
                    "table": format_table(rows),
                    "paired": comparisons,
                    "paired_table": format_paired(comparisons),
                    "conflicts": conflicts_line(analyses) if analyses else "",
                    "analysis": analyses,
                    "rows": rows,
                    "runs": [{k: r[k] for k in ("name", "run_id", "wall_s", "cached")} for r in runs],
                    "compute_s": sum(r["wall_s"] for r in runs) + sum(a["wall_s"] for a in analyses.values()),
                    "complete": len(runs) == total,
                    "finished": len(runs),
                    "planned": total,
                    "missing": list(missing),
                }
                write_results(path, result, stamp(command, time.time() - start))
    if not runs:
        raise SystemExit(f"no run of this grid has finished under {opts.out}/runs: run it without --summary_only")
    result["missing"] = list(missing)  # --summary_only: with those after the last finished run
    from eaft_pl.analysis.plots import save_figure

    figures = [a["figures"][0] for a in analyses.values()]
    stem = str(Path(path).with_suffix("")) + "-" if opts.figures is None else f"{opts.figures}/"
    for lr in [lr for lr in opts.lrs if any(row["lr"] == lr for row in rows.values())]:
        for name, draw in (("curves", curves_figure), ("cohort", cohort_figure), ("pareto", pareto_figure)):
            figure = draw(rows, lr)
            target = f"{stem}{name}-lr{lr:g}.png"
            save_figure(figure, target)
            figures.append(target)
    wall = time.time() - start
    meta = stamp(command, wall)
    write_results(path, result, meta)  # once more: the stamp's wall time now includes the figures
    print("\n" + result["table"] + ("\n\n" + result["paired_table"] if result["paired_table"] else ""))
    if result["conflicts"]:
        print("\n" + result["conflicts"])
    print(f"\nresults: {path}\nfigures: {', '.join(figures)}")
    print(f"wall time: {wall:.0f} s (this sitting; all the runs and analyses took {result['compute_s']:.0f} s)")
    if missing:
        print(f"not run yet ({len(missing)} of {total}): {', '.join(missing)}; the same command without --summary_only runs them")
    print(f"runs (MLflow experiment '{EXPERIMENT}'): {ui_command(opts.tracking_uri)}")
    return {"meta": meta, **result}
