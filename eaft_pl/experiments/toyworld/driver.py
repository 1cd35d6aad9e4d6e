"""The embedded experiment: pretrain the synthetic world's base (cached), fine-tune it with each
method, seed and learning rate through the package's own CLI and configs, and summarise domain
gain and general forgetting in the paper's Table 1 layout.

    python scripts/embedded_experiment.py [--seeds 0 1 2] [--methods sft eaft ...] [--lrs 3e-4 ...]

Every fine-tuning run is an MLflow run (experiment ``toyworld``); the summary is printed and written
as a results file (:mod:`eaft_pl.results`: per method and learning rate, domain score, general
average and forgetting as mean and standard deviation over seeds, the printed table, and the stamp
of command, commit and machine). The output is one line per run, then the table, the paths of the
results file and figures, and the command that opens the MLflow UI on the runs; ``--verbose`` brings
back Lightning's own output (device banners, model summaries, progress bars).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from eaft_pl.experiments.runner import add_run_options, cohort_curves, cohort_figure, mean_std, quiet_run, run_cli as _cli, ui_command
from eaft_pl.results import command_line, stamp, write_results

# Package data, so an installed wheel finds them: the world's two setups and the shared method overlays.
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRETRAIN = CONFIGS / "setup" / "toy_pretrain.yaml"
FINETUNE = CONFIGS / "setup" / "toy_finetune.yaml"
METHODS = CONFIGS / "method"
ALL_METHODS = [
    "sft", "eaft", "eaft2", "eaft_sigmoid", "entropy_mask", "conflict_mask", "dft",
    # from the base model (the reference pass): static gates, FLOW, and the KL baselines
    "static_eaft", "static_mask", "eaft_static_mask", "flow", "sft_kl", "asft",
]  # fmt: skip
GENERAL_TASKS = ["colour", "city", "arithmetic", "reverse", "repeat"]
DOMAIN_MATCH = 0.9  # "learned the domain": style-agnostic domain accuracy at least this

__all__ = [
    "main", "ensure_base", "finetune", "conflict_statistics", "summarise", "format_table", "conflicts_line",
    "cohort_curves", "cohort_figure", "recomputable",
]  # fmt: skip


def _common(opts: argparse.Namespace, seed: int) -> List[str]:
    return [
        f"--data.init_args.seed={seed}",
        f"--data.init_args.n_entities={opts.entities}",
        f"--data.init_args.tokenizer_name_or_path={opts.out}/tokenizer",
        f"--trainer.logger.init_args.tracking_uri={opts.tracking_uri}",
    ]


def ensure_base(opts: argparse.Namespace, seed: int) -> str:
    """Pretrain the base of ``seed`` unless a folder made with the same settings exists."""
    path = f"{opts.out}/base-seed{seed}"
    # The base depends on its config, the options, the world's generator and its DataModule's defaults:
    # a change to any of them must not reuse a stale base.
    from eaft_pl.experiments.toyworld import datamodule as toy, world as toyworld

    recipe = (
        PRETRAIN.read_text()
        + Path(toyworld.__file__).read_text()
        + Path(toy.__file__).read_text()
        + json.dumps({
            "seed": seed, "steps": opts.pretrain_steps, "n": opts.pretrain_examples, "entities": opts.entities,
            "threads": opts.threads,  # the thread count orders float reductions, so it changes the weights
        })  # fmt: skip
    )
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    marker = Path(path) / "eaft_pl_recipe.txt"
    if marker.is_file() and marker.read_text() == key:
        print(f"[base] world {seed}: cached at {path}", flush=True)
        return path
    print(f"[base] world {seed}: pretraining {opts.pretrain_steps} steps ...", end=" ", flush=True)
    start = time.time()
    _cli(
        ["fit", "--config", str(PRETRAIN), *_common(opts, seed),
         f"--trainer.max_steps={opts.pretrain_steps}", f"--data.init_args.n_pretrain={opts.pretrain_examples}",
         f"--trainer.callbacks.init_args.dirpath={path}", f"--trainer.val_check_interval={max(1, opts.pretrain_steps // 3)}"],
        getattr(opts, "verbose", False),
    )  # fmt: skip
    marker.write_text(key)
    print(f"{time.time() - start:.0f} s -> {path}", flush=True)
    return path


def finetune(opts: argparse.Namespace, seed: int, method: str, lr: float, order_seed: Optional[int] = None) -> Dict[str, Any]:
    """One fine-tuning run of the base of world ``seed``; ``order_seed`` (default: ``seed``) seeds
    the run itself (``seed_everything``: the order of the domain data). Returns the forgetting and
    cohort callbacks' histories, the reference pass's time and the run's identity."""
    from eaft_pl.evaluation.cohort import ConflictCohortCallback
    from eaft_pl.evaluation import ForgettingCallback

    start = time.time()
    order_seed = seed if order_seed is None else order_seed
    name = f"{method}-lr{lr:g}-seed{seed}" + (f"-order{order_seed}" if order_seed != seed else "")
    cli = _cli(
        ["fit", "--config", str(FINETUNE), "--config", str(METHODS / f"{method}.yaml"),
         *_common(opts, seed), f"--seed_everything={order_seed}",
         f"--model.init_args.model_name_or_path={opts.out}/base-seed{seed}",
         f"--model.init_args.learning_rate={lr}", f"--trainer.max_steps={opts.steps}",
         f"--trainer.logger.init_args.run_name={name}",
         f"--trainer.callbacks.init_args.every_n_steps={opts.eval_every}", f"--cohort.every_n_steps={opts.eval_every}",
         f"--model.init_args.reference_cache_dir={opts.out}/reference_cache"],
        getattr(opts, "verbose", False),
    )  # fmt: skip
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ForgettingCallback))
    cohort = next(c for c in cli.trainer.callbacks if isinstance(c, ConflictCohortCallback))
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "order_seed": order_seed,
        "run_id": cli.trainer.logger.run_id,
        "wall_s": time.time() - start,
        "history": callback.history,
        "cohort": cohort.history,
        "cohort_s": cohort.seconds,
        "reference_s": cli.model.reference_seconds,
        "reference_cache_hit": cli.model.reference_cache_hit,
    }


# ---- the mechanism, measured ---------------------------------------------------------------------


def conflict_statistics(opts: argparse.Namespace, seed: int) -> Dict[str, Any]:
    """Confident conflicts in the domain training data under the base model, by token role.

    Roles of the teacher's answer ``it has V , ok .``: ``content`` (the value: a job to learn),
    ``contradiction`` (a wrongly restated colour) and ``style`` (every other token, end of turn
    included). Conflicts use the metric's absolute thresholds (H/ln K <= 0.17 and p <= 0.1).
    """
    from eaft_pl.data.chat import collate
    from eaft_pl.experiments.toyworld.datamodule import ToyWorldDataModule
    from eaft_pl.loss.conflict import CONFLICT_MAX_LABEL_PROB, CONFLICT_MAX_NORM_ENTROPY
    from eaft_pl.loss.metrics import confident_conflicts
    from eaft_pl.module import EAFTModule

    module = EAFTModule(model_name_or_path=f"{opts.out}/base-seed{seed}")
    module.configure_model()
    module.eval()
    data = ToyWorldDataModule(part="domain", seed=seed, n_entities=opts.entities, tokenizer_name_or_path=f"{opts.out}/tokenizer")
    data.setup("fit")
    counts: Dict[str, List[int]] = {"style": [0, 0], "content": [0, 0], "contradiction": [0, 0]}
    weights: Dict[str, List[float]] = {"style": [], "content": [], "contradiction": []}
    tok = data.tokenizer
    with torch.no_grad():
        for example in data.datasets["train"]:
            stats, _, _ = module.token_stats(collate([example], data.pad_token_id))
            flags = confident_conflicts(stats, CONFLICT_MAX_NORM_ENTROPY, CONFLICT_MAX_LABEL_PROB).tolist()
            targets = [t for t, label in zip(example.input_ids[1:], example.labels[1:]) if label != -100]
            contradiction = ":contradiction:" in example.source
            for token, flag, h in zip(targets, flags, stats.norm_entropy.tolist()):
                word = tok.convert_ids_to_tokens(token)
                is_value = word in data.world.job.values() or (contradiction and word in data.world.colour.values())
                role = ("contradiction" if contradiction else "content") if is_value else "style"
                counts[role][0] += int(flag)
                counts[role][1] += 1
                weights[role].append(h)
    total_conflicts = sum(c for c, _ in counts.values())
    total = sum(n for _, n in counts.values())
    return {
        "conflict_share": total_conflicts / total,
        "by_role": {
            role: {
                "tokens": n,
                "conflict_share": c / n if n else 0.0,
                "share_of_conflicts": c / total_conflicts if total_conflicts else 0.0,
                "mean_eaft_weight": sum(weights[role]) / len(weights[role]) if weights[role] else 0.0,
            }
            for role, (c, n) in counts.items()
        },
    }


# ---- summary ------------------------------------------------------------------------------------


def _scores(entry: Dict[str, Any]) -> Dict[str, float]:
    """Domain and general numbers of one evaluation (``entry["scores"]``)."""
    s = entry["scores"]
    general = s["general"]
    out = {"domain": s["domain"]["job"]["content"]}
    for task in GENERAL_TASKS:
        out[task] = general[task]["exact"]
    out["general"] = sum(out[t] for t in GENERAL_TASKS) / len(GENERAL_TASKS)
    out["general_content"] = sum(general[t]["content"] for t in GENERAL_TASKS) / len(GENERAL_TASKS)
    mc = [v["acc"] for v in general.values() if "acc" in v]
    out["general_mc"] = sum(mc) / len(mc)
    return out


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per (method, lr): final scores, the base, forgetting and the matched-domain comparison, each as
    mean and standard deviation over seeds."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(f"{run['method']}@{run['lr']:g}", []).append(run)
    rows = {}
    for key, members in groups.items():
        base = [_scores(r["history"][0]) for r in members]
        final = [_scores(r["history"][-1]) for r in members]
        # Matched comparison: the best general score among evaluations that learned the domain.
        matched = []
        for r in members:
            learned = [s["general"] for s in map(_scores, r["history"]) if s["domain"] >= DOMAIN_MATCH]
            matched.append(max(learned) if learned else float("nan"))
        row = {
            "method": members[0]["method"], "lr": members[0]["lr"], "seeds": [r["seed"] for r in members],
            "order_seeds": [r.get("order_seed", r["seed"]) for r in members],
        }  # fmt: skip
        for name in final[0]:
            row[name] = mean_std([f[name] for f in final])
        row["base_general"] = mean_std([b["general"] for b in base])
        row["base_domain"] = mean_std([b["domain"] for b in base])
        row["forgetting"] = mean_std([b["general"] - f["general"] for b, f in zip(base, final)])
        row["general_at_domain_0.9"] = mean_std(matched)
        row["learned_domain_runs"] = sum(not math.isnan(m) for m in matched)
        row["wall_s"] = mean_std([r["wall_s"] for r in members])
        row["cohort_s"] = mean_std([r.get("cohort_s", float("nan")) for r in members])
        row["reference_s"] = mean_std([r["reference_s"] for r in members if r.get("reference_s") is not None])
        row["cohort"] = cohort_curves(members)
        row["run_ids"] = [r["run_id"] for r in members]
        rows[key] = row
    return rows


def _pm(stat: Dict[str, float], scale: float = 100.0) -> str:
    if stat["n"] == 0:
        return "-"
    if stat["n"] == 1:
        return f"{stat['mean'] * scale:.1f}"
    return f"{stat['mean'] * scale:.1f}±{stat['std'] * scale:.1f}"


def format_table(rows: Dict[str, Any]) -> str:
    """The paper's Table 1 layout: domain score; general scores, their average and the change
    against the base; plus the style-agnostic and multiple-choice general averages and the matched
    comparison. Scores in %, mean±std over seeds."""
    head = ["method", "lr", "Domain"] + [t.capitalize() for t in GENERAL_TASKS] + [
        "General (Δ base)", "General content", "General MC", "General @ domain≥90%"
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = next(iter(rows.values()))
    base_cells = ["base", "", _pm(first["base_domain"])] + [""] * len(GENERAL_TASKS) + [_pm(first["base_general"]), "", "", ""]
    lines.append("| " + " | ".join(base_cells) + " |")
    for row in rows.values():
        delta = {"mean": -row["forgetting"]["mean"], "std": row["forgetting"]["std"], "n": row["forgetting"]["n"]}
        cells = [row["method"], f"{row['lr']:g}", _pm(row["domain"])] + [_pm(row[t]) for t in GENERAL_TASKS] + [
            f"{_pm(row['general'])} ({_pm(delta)})",
            _pm(row["general_content"]),
            _pm(row["general_mc"]),
            f"{_pm(row['general_at_domain_0.9'])} ({row['learned_domain_runs']}/{len(row['seeds'])})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conflicts_line(mechanism: Dict[str, Any]) -> str:
    """The printed summary of :func:`conflict_statistics` over the worlds: the share of answer tokens
    that are confident conflicts under the base, overall and per token role (mean over worlds)."""
    shares = [m["conflict_share"] for m in mechanism.values()]
    return f"Confident conflicts in the domain data under the base: {statistics.fmean(shares):.1%} of answer tokens; " + ", ".join(
        f"{role} {statistics.fmean(m['by_role'][role]['conflict_share'] for m in mechanism.values()):.0%} of its tokens"
        for role in ("style", "content", "contradiction")
    )


def recomputable(result: Dict[str, Any]) -> Dict[str, Any]:
    """What a rerun of the same command must reproduce digit for digit: the printed table and
    conflict summary (timings, run ids and paths differ from run to run)."""
    return {"table": result["table"], "conflicts": result["conflicts"]}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="The embedded EAFT experiment on the synthetic world.")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="worlds: each seed is a world and its own base")
    ap.add_argument(
        "--order_seeds", type=int, nargs="+", default=None,
        help="seeds of the fine-tuning runs themselves (the domain data's order) on each world's base (default: the world's seed)",
    )  # fmt: skip
    ap.add_argument("--methods", nargs="+", default=["sft", "eaft"], help=f"any of {ALL_METHODS}, or 'all'")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning optimizer steps")
    ap.add_argument("--eval_every", type=int, default=25)
    ap.add_argument("--pretrain_steps", type=int, default=1500)
    ap.add_argument("--pretrain_examples", type=int, default=96000)
    ap.add_argument("--entities", type=int, default=60)
    add_run_options(ap, out="outputs/toyworld")  # --threads, --out (bases, tokenizer), --tracking_uri, --results, --verbose
    ap.add_argument("--cohort_figure", default=None, help="PNG of the conflict cohort's curves (default <results>-cohort-lr<lr>.png)")
    return ap


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the experiment (options: ``--help``) and return what it wrote to the results file."""
    ap = _parser()
    opts = ap.parse_args(argv)
    methods = ALL_METHODS if opts.methods == ["all"] else opts.methods
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    if opts.threads < 1:
        ap.error(f"--threads must be at least 1, got {opts.threads}")
    command = command_line("scripts/embedded_experiment.py", argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with quiet_run(opts.verbose, opts.threads):
        return _run(opts, methods, command)


def _run(opts: argparse.Namespace, methods: List[str], command: str) -> Dict[str, Any]:
    start = time.time()
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    runs: List[Dict[str, Any]] = []
    mechanism: Dict[int, Any] = {}
    path = opts.results or f"{opts.out}/results.json"
    total = len(opts.seeds) * len(opts.order_seeds or [None]) * len(opts.lrs) * len(methods)
    for seed in opts.seeds:
        ensure_base(opts, seed)
        mechanism[seed] = conflict_statistics(opts, seed)
        for order in opts.order_seeds or [seed]:
            for lr in opts.lrs:
                for method in methods:
                    run = finetune(opts, seed, method, lr, order)
                    runs.append(run)
                    final, base = _scores(run["history"][-1]), _scores(run["history"][0])
                    print(
                        f"[{len(runs)}/{total}] {method} lr={lr:g} world {seed} order {order}: domain {final['domain']:.1%}, "
                        f"general {final['general']:.1%} (base {base['general']:.1%}), {run['wall_s']:.0f} s",
                        flush=True,
                    )
                    # Rewritten after every run: a sweep stopped early still leaves the summary of what ran.
                    rows = summarise(runs)
                    result = {
                        "settings": vars(opts) | {"methods": methods},
                        "table": format_table(rows),
                        "conflicts": conflicts_line({str(k): v for k, v in mechanism.items()}),
                        "rows": rows,
                        "mechanism": {str(k): v for k, v in mechanism.items()},
                        "complete": len(runs) == total,
                    }
                    write_results(path, result, stamp(command, time.time() - start))
    from eaft_pl.analysis.plots import save_figure

    figures = []
    for lr in opts.lrs:
        if opts.cohort_figure is None:
            figure = str(Path(path).with_suffix("")) + f"-cohort-lr{lr:g}.png"
        else:
            figure = opts.cohort_figure if len(opts.lrs) == 1 else opts.cohort_figure.replace(".png", f"-lr{lr:g}.png")
        save_figure(cohort_figure(rows, lr), figure)
        figures.append(figure)
    wall = time.time() - start
    meta = stamp(command, wall)
    write_results(path, result, meta)  # once more: the stamp's wall time now includes the figures
    print("\n" + result["table"] + "\n\n" + result["conflicts"])
    print(f"\nresults: {path}\nfigures: {', '.join(figures)}\nwall time: {wall:.0f} s")
    print(f"runs (MLflow experiment 'toyworld'): {ui_command(opts.tracking_uri)}")
    return {"meta": meta, **result}
