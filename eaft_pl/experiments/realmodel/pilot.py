"""The pilot of the study on a real model: at which learning rates, and after how many steps, does SFT
forget measurably, that is, does its general score drop by several times the seed-to-seed spread?

    python scripts/real_pilot.py --lrs 3e-5 1e-4 3e-4 --seeds 0 1 --steps 120 --eval_every 20

An experiment in which SFT does not forget cannot show what EAFT keeps, and a length or learning rate
picked by hand to make it so would be a hand-tuned result. The pilot fine-tunes SFT with the
real-model driver (:mod:`eaft_pl.experiments.realmodel.driver`; its runs are cached as the driver's
are, so a rerun skips them), reads every seed's general score at every evaluation, and applies
a stated rule (:func:`choose`): a setting forgets measurably at a step where the mean drop of the
general average against the base is at least ``ratio`` times the standard deviation of that drop
over seeds and at least ``min_drop``. The study takes the learning rates that do and the first step
by which all of them do. The table of every (lr, step), the rule and its choice are printed and
written to a stamped results file; if no setting forgets measurably, that is the result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from eaft_pl.experiments.realmodel import driver
from eaft_pl.experiments.runner import mean_std
from eaft_pl.results import command_line, stamp, write_results

__all__ = ["drops", "choose", "format_pilot", "main"]


def drops(histories: Dict[int, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Per evaluation step after the base, from one learning rate's runs (``seed -> forgetting
    history``): the drop of the general average against each seed's own base (mean, std over seeds),
    and the domain score and KL to the base (means), only at steps every seed reached."""
    per_seed = {seed: {e["step"]: driver.scores(e) for e in history} for seed, history in histories.items()}
    common = sorted(set.intersection(*(set(steps) for steps in per_seed.values()))) if per_seed else []
    rows = []
    for step in common:
        if step == 0:
            continue
        got = [(s[0], s[step]) for s in per_seed.values()]
        rows.append({
            "step": step,
            "drop": mean_std([base["general"] - now["general"] for base, now in got]),
            "domain": mean_std([now["domain"] for _, now in got])["mean"],
            "kl": mean_std([now.get("agreement/kl", float("nan")) for _, now in got])["mean"],
        })  # fmt: skip
    return rows


def measurable(point: Dict[str, Any], ratio: float, min_drop: float) -> bool:
    """The pilot's rule: the mean drop is at least ``min_drop`` and at least ``ratio`` times its
    standard deviation over seeds."""
    drop = point["drop"]
    return drop["n"] > 1 and drop["mean"] >= min_drop and drop["mean"] >= ratio * drop["std"]


def choose(table: Dict[float, List[Dict[str, Any]]], ratio: float, min_drop: float) -> Dict[str, Any]:
    """The learning rates at which SFT forgets measurably (:func:`measurable`) at some step, each with
    its first such step, and the study's length: the first step by which every chosen rate does.
    ``{"lrs": [], "steps": None}`` when none does."""
    first = {}
    for lr, points in table.items():
        hit = next((p["step"] for p in points if measurable(p, ratio, min_drop)), None)
        if hit is not None:
            first[lr] = hit
    return {
        "lrs": sorted(first),
        "first_step": {f"{lr:g}": step for lr, step in sorted(first.items())},
        "steps": max(first.values()) if first else None,
        "rule": f"mean drop of the general average >= {min_drop:g} and >= {ratio:g} x its std over seeds",
    }


def format_pilot(table: Dict[float, List[Dict[str, Any]]], choice: Dict[str, Any], ratio: float, min_drop: float) -> str:
    """The pilot's table (general drop in points, mean±std over seeds; domain %; KL) and its choice."""
    lines = ["| lr | step | General drop | Measurable | Domain | KL to base |", "|---|---|---|---|---|---|"]
    for lr, points in table.items():
        for p in points:
            d = p["drop"]
            lines.append(
                f"| {lr:g} | {p['step']} | {d['mean'] * 100:.1f}±{d['std'] * 100:.1f} | {'yes' if measurable(p, ratio, min_drop) else 'no'} "
                f"| {p['domain'] * 100:.1f} | {p['kl']:.3f} |"
            )
    if choice["lrs"]:
        verdict = f"SFT forgets measurably at lr {', '.join(f'{lr:g}' for lr in choice['lrs'])}; the study trains {choice['steps']} steps"
    else:
        verdict = "No learning rate and length in this pilot made SFT forget measurably"
    return "\n".join(lines) + f"\n\nRule: {choice['rule']}. {verdict}."


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="The pilot: where does SFT forget measurably on the real model?")
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval_every", type=int, default=20)
    ap.add_argument("--ratio", type=float, default=3.0, help="the drop must be this many times its std over seeds")
    ap.add_argument("--min_drop", type=float, default=0.0625, help="and at least this (0.0625: 2 of 32 facts)")
    ap.add_argument("--out", default="outputs/realmodel")
    ap.add_argument("--tracking_uri", default="sqlite:///mlruns/mlflow.db")
    ap.add_argument("--results", default="outputs/realmodel/pilot.json")
    return ap


def main(argv: Optional[Sequence[str]] = None, driver_args: Sequence[str] = ()) -> Dict[str, Any]:
    """Run the pilot (options: ``--help``; ``driver_args`` go to the driver as they are, e.g. its
    ``--domain`` or ``--batch_size``) and return what it wrote to its results file."""
    opts, rest = _parser().parse_known_args(argv)
    start = time.time()
    runs = Path(opts.out) / "runs"
    args = [
        "--methods", "sft", "--lrs", *map(str, opts.lrs), "--seeds", *map(str, opts.seeds), "--steps", str(opts.steps),
        "--eval_every", str(opts.eval_every), "--out", opts.out, "--tracking_uri", opts.tracking_uri,
        "--results", f"{opts.out}/pilot-runs.json", "--figures", f"{opts.out}/pilot-figures",
        "--analyze_examples", "0",  # the pilot reads forgetting only; the demo and the study analyse the base
        *driver_args, *rest,
    ]  # fmt: skip
    summary = driver.main(args)
    table = {}
    for lr in opts.lrs:
        histories = {seed: json.loads((runs / f"sft-lr{lr:g}-seed{seed}.json").read_text())["result"]["history"] for seed in opts.seeds}
        table[lr] = drops(histories)
    choice = choose(table, opts.ratio, opts.min_drop)
    text = format_pilot(table, choice, opts.ratio, opts.min_drop)
    result = {
        "settings": vars(opts) | {"driver_args": [*driver_args, *rest]},
        "table": text,
        "points": {f"{lr:g}": points for lr, points in table.items()},
        "choice": choice,
        "compute_s": summary["compute_s"],
    }
    meta = stamp(command_line("scripts/real_pilot.py", argv), time.time() - start)
    write_results(opts.results, result, meta)
    print("\n" + text + f"\n\nresults: {opts.results} (the runs' own summary and curves: {opts.out}/pilot-runs.json, {opts.out}/pilot-figures)")
    return {"meta": meta, **result}
