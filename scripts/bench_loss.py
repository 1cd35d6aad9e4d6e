"""Memory and time of the EAFT loss on an LM head with a large vocabulary, one fresh process per variant.

Variants, all on the same random hidden states, LM-head weight and labels (a third of each sequence
masked as prompt), forward and backward down to the hidden states and the weight:

- ``lf``: a faithful re-implementation of LLaMA-Factory's ``eaft_loss_func`` on the full logits
  (``tests/reference_llamafactory.py``);
- ``plain``: eaft-pl's plain path (``eaft_loss`` on the full logits);
- ``chunked``: eaft-pl's chunked path (``chunked_gated_loss``, no full logits), at each ``--chunk_sizes``;
- ``ce``: plain ``F.cross_entropy`` SFT on the full logits, the speed floor.

Each variant runs in its own process so that one's peak memory cannot hide in another's; peak memory
is the process's maximum resident set (``ru_maxrss``) minus its resident set before the inputs were
made. ``floor_mb`` is what any method must hold: hidden states, LM-head weight and its gradient.
The variants take turns for ``--rounds`` rounds (a fresh process each time) so that a slow spell of
the shared machine hits them all; the median time over all rounds is reported.

Usage::

    python scripts/bench_loss.py                    # V=151,936, H=512, 2,048 tokens, fp32, 2 rounds
    python scripts/bench_loss.py --hidden 1024 --tokens 4096 --rounds 3   # larger: about 4x the time
    python scripts/bench_loss.py --out docs/results/bench_loss.json       # what docs/performance.md shows

Prints one JSON line per variant, then a last ``summary`` line with the ratios, the issue's targets,
the table the docs show and the stamp of :mod:`eaft_pl.results`; ``--out`` writes it as a results file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's eaft_pl when run as a script

from eaft_pl.results import emit, finish, markdown_table  # noqa: E402

#: The variants' row labels in the docs' table.
LABELS = {
    "lf": "(a) LLaMA-Factory's `eaft_loss_func` on full logits",
    "plain": "(b) eaft-pl plain path (`eaft_loss`)",
    "chunked": "(c) eaft-pl chunked, `chunk_size` {chunk}",
    "ce": "(d) `F.cross_entropy` SFT on full logits",
}


def current_rss_mb() -> float:
    """This process's resident set now, in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_inputs(args):
    """Random hidden states, an LM-head weight with a spread of entropies, and labels with a prompt third."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    seq = args.tokens // args.batch
    hidden = torch.randn(args.batch, seq, args.hidden, generator=g)
    weight = torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5 * 4  # a spread of entropies
    labels = torch.randint(0, args.vocab, (args.batch, seq), generator=g)
    labels[:, : seq // 3] = -100  # the prompt third of every sequence
    return hidden.requires_grad_(True), weight.requires_grad_(True), labels


def loss_function(variant: str, chunk_size: int):
    """``(hidden, weight, labels) -> loss`` of ``variant``."""
    import torch
    import torch.nn.functional as F

    from eaft_pl.loss.chunked import chunked_gated_loss
    from eaft_pl.loss.functional import eaft_loss
    from eaft_pl.loss.gates import EAFTGate

    if variant == "lf":
        sys.path.insert(0, str(REPO / "tests"))
        from reference_llamafactory import lf_eaft_loss_func

        return lambda h, w, y: lf_eaft_loss_func(h @ w.T, y)
    if variant == "plain":
        return lambda h, w, y: eaft_loss(h @ w.T, y)
    if variant == "chunked":
        gate = EAFTGate()
        return lambda h, w, y: chunked_gated_loss(h, w, y, gate, chunk_size=chunk_size)
    if variant == "ce":

        def ce(h, w, y):
            logits = h @ w.T
            shift = F.pad(y[..., 1:], (0, 1), value=-100)  # no copy of the logits for the shift
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100)

        return ce
    raise ValueError(f"unknown variant {variant!r}")


def worker(args) -> dict:
    """Run one variant in this process: its times, peak memory above the start, loss and gradient norm."""
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    fn = loss_function(args.worker, args.chunk_size)
    base = current_rss_mb()
    hidden, weight, labels = make_inputs(args)
    times, losses = [], []
    for rep in range(args.warmup + args.reps):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        loss = fn(hidden, weight, labels)
        loss.backward()
        elapsed = time.perf_counter() - start
        if rep >= args.warmup:
            times.append(elapsed)
            losses.append(float(loss.detach()))
    floor = (hidden.numel() + 2 * weight.numel()) * 4 / 2**20
    return {
        "variant": args.worker + (f"@{args.chunk_size}" if args.worker == "chunked" else ""),
        "vocab": args.vocab,
        "hidden": args.hidden,
        "tokens": args.tokens,
        "median_s": round(statistics.median(times), 3),
        "times_s": [round(t, 3) for t in times],
        "peak_mb": round(peak_rss_mb() - base, 1),
        "floor_mb": round(floor, 1),
        "loss": losses[0],
        "grad_weight_norm": float(weight.grad.norm()),
        "threads": torch.get_num_threads(),
    }


def run_variant(args, variant: str, chunk_size: int) -> dict:
    """One variant in a fresh process (the same sizes), its worker's JSON line."""
    cmd = [sys.executable, __file__, "--worker", variant, "--chunk_size", str(chunk_size)]
    for name in ("vocab", "hidden", "tokens", "batch", "reps", "warmup", "seed", "threads"):  # not rounds
        cmd += [f"--{name}", str(getattr(args, name))]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"variant {variant} (chunk_size {chunk_size}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(results: list) -> dict:
    """Each chunked variant's and the plain path's ratios to LLaMA-Factory's, the floor and plain CE,
    and whether they meet the issue's targets."""
    by = {r["variant"]: r for r in results}
    summary: Dict[str, Any] = {}
    if "lf" in by and "ce" in by:
        for name, r in by.items():
            if name.startswith("chunked"):
                summary[name] = {
                    "memory_vs_lf": round(r["peak_mb"] / by["lf"]["peak_mb"], 3),
                    "memory_vs_floor": round(r["peak_mb"] / r["floor_mb"], 3),
                    "time_vs_lf": round(r["median_s"] / by["lf"]["median_s"], 3),
                    "time_vs_ce": round(r["median_s"] / by["ce"]["median_s"], 3),
                    "targets_met": r["peak_mb"] <= 0.2 * by["lf"]["peak_mb"]
                    and r["peak_mb"] <= 1.5 * r["floor_mb"]
                    and r["median_s"] <= 1.25 * by["lf"]["median_s"]
                    and r["median_s"] <= 1.5 * by["ce"]["median_s"],
                }
    if "lf" in by and "plain" in by:
        p, a = by["plain"], by["lf"]
        summary["plain"] = {
            "memory_vs_lf": round(p["peak_mb"] / a["peak_mb"], 3),
            "time_vs_lf": round(p["median_s"] / a["median_s"], 3),
            "targets_met": p["peak_mb"] <= a["peak_mb"] and p["median_s"] <= a["median_s"],
        }
    for entry in summary.values():  # the word a page shows next to the boolean
        entry["targets"] = "met" if entry["targets_met"] else "not met"
    return summary


def loss_table(results: List[Dict[str, Any]]) -> str:
    """The docs' table: each variant's peak memory and median time, and their ratios to LLaMA-Factory's
    (a), to the floor and to plain CE (d). Needs the variants ``lf`` and ``ce``."""
    by = {r["variant"]: r for r in results}
    lf, ce = by["lf"], by["ce"]
    rows = []
    for r in results:
        name, _, chunk = r["variant"].partition("@")
        rows.append([
            LABELS[name].format(chunk=chunk), f"{r['peak_mb']:,.0f} MB", f"{r['peak_mb'] / lf['peak_mb']:.2f}",
            f"{r['peak_mb'] / r['floor_mb']:.2f}", f"{r['median_s']:.2f} s", f"{r['median_s'] / lf['median_s']:.2f}",
            f"{r['median_s'] / ce['median_s']:.2f}",
        ])  # fmt: skip
    head = ["variant", "peak memory", "vs LLaMA-Factory", "vs floor", "median time (fwd + bwd)", "vs LLaMA-Factory", "vs plain CE"]
    return markdown_table(head, rows)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the variants in turns; return the results (also printed, and written to ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=2048, help="total tokens, split into --batch sequences")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["lf", "plain", "chunked", "ce"])
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all variants, each in fresh processes")
    parser.add_argument("--reps", type=int, default=1, help="timed repetitions per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="also write the results file here (docs/results/bench_loss.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--chunk_size", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokens % args.batch:
        parser.error("--tokens must be a multiple of --batch")
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return {}
    started = time.perf_counter()
    jobs = [(v, c) for v in args.variants for c in (args.chunk_sizes if v == "chunked" else [0])]
    rounds = [[run_variant(args, v, c) for v, c in jobs] for _ in range(args.rounds)]
    results = []
    for runs in zip(*rounds):  # the rounds of one variant
        result = dict(runs[0])
        result["times_s"] = [t for r in runs for t in r["times_s"]]
        result["median_s"] = round(statistics.median(result["times_s"]), 3)
        result["peak_mb"] = max(r["peak_mb"] for r in runs)
        results.append(result)
        emit(result)
    report: Dict[str, Any] = {
        "settings": {k: getattr(args, k) for k in ("vocab", "hidden", "tokens", "batch", "variants", "chunk_sizes", "rounds", "reps", "warmup", "seed", "threads")},
        "variants": {r["variant"]: r for r in results},
        "ratios": summarise(results),
        "chunk_buffer_mb": {str(c): round(c * args.vocab * 4 / 2**20, 1) for c in args.chunk_sizes},  # one fp32 (chunk, V) buffer
    }
    if "lf" in args.variants and "ce" in args.variants:
        report["table"] = loss_table(results)
    finish("scripts/bench_loss.py", report, started, args.out, argv)
    return report


if __name__ == "__main__":
    main()
