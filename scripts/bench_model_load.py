"""What loading a real model costs: the first load, which converts its GGUF file, against a later
load from the cached folder.

For each model (a short name of an installed model package, or a ``.gguf`` path) the script makes a
fresh, temporary model cache (``EAFT_PL_MODEL_CACHE``), so the conversion really runs whatever the
user's own cache holds (the default cache is never touched), and runs two processes on it one after
the other:

- ``cold``: the first load on the empty cache: locating the GGUF file (for Gemma 3 270M, joining its
  chunk packages), its SHA-256, the conversion (transformers reading and de-quantising the GGUF,
  timed on its own, then writing the float32 folder), and loading model and tokenizer from the folder;
- ``warm``: a later process on the filled cache: locating, hashing, and loading the folder.

Each is a fresh process, so its peak resident set (``ru_maxrss``) is its own and the warm one pays the
per-process SHA-256 that a real later run pays. Reported per model: the seconds of each phase, both
peaks, parameter count, vocabulary, the GGUF file's size and the converted folder's size on disk.

Usage::

    python scripts/bench_model_load.py --models smollm2-135m-instruct gemma3-270m \\
        --out docs/results/real_model_load.json

Prints one JSON line per process (model and phase) as it finishes, then the report (with the
:mod:`eaft_pl.results` stamp); ``--out`` writes the report as a results file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's eaft_pl when run as a script

from eaft_pl.results import finish  # noqa: E402

PHASES = ("cold", "warm")
MB = 2**20


def _timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    """``fn()`` and its wall seconds."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def folder_mb(folder: Path) -> float:
    """The size on disk of the files under ``folder`` (their byte sizes, in MiB)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / MB


def measure_load(name: str, phase: str) -> Dict[str, Any]:
    """Load ``name`` once in this process through the package's loaders, on the cache that
    ``EAFT_PL_MODEL_CACHE`` names, timing each phase. ``phase`` only labels the result; which phase
    it is depends on whether the cache already holds the conversion."""
    from eaft_pl.models import gguf
    from eaft_pl.models.loading import load_causal_lm, load_tokenizer

    dequantise: List[float] = []
    original = gguf.load_gguf

    def timed_load_gguf(path: Path) -> Any:  # convert_gguf looks load_gguf up in its module at call time
        value, seconds = _timed(lambda: original(path))
        dequantise.append(seconds)
        return value

    gguf.load_gguf = timed_load_gguf
    try:
        path, locate_s = _timed(lambda: gguf.find_packaged_gguf(name) if name in gguf.PACKAGED_MODELS else Path(name))
        _, hash_s = _timed(lambda: gguf.gguf_sha256(path))  # remembered in-process: resolve does not hash again
        folder, resolve_s = _timed(lambda: gguf.resolve_model_path(name))
        (model, tokenizer), load_s = _timed(lambda: (load_causal_lm(name, torch_dtype="float32"), load_tokenizer(name)))
    finally:
        gguf.load_gguf = original
    marker = json.loads((Path(folder) / gguf.MARKER).read_text())
    return {
        "model": name,
        "phase": phase,
        "converted": bool(dequantise),
        "locate_s": round(locate_s, 2),
        "hash_s": round(hash_s, 2),
        "convert_s": round(resolve_s, 2),
        "dequantise_s": round(dequantise[0], 2) if dequantise else 0.0,
        "load_folder_s": round(load_s, 2),
        "total_s": round(locate_s + hash_s + resolve_s + load_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": int(model.config.vocab_size),
        "tokenizer_len": len(tokenizer),
        "chat_template": bool(marker.get("chat_template")),
        "architecture": marker.get("architecture"),
        "gguf_mb": round(Path(path).stat().st_size / MB, 1),
        "folder_mb": round(folder_mb(Path(folder)), 1),
    }


def run_phase(name: str, phase: str, cache: Path) -> Dict[str, Any]:
    """``measure_load(name, phase)`` in a fresh process whose model cache is ``cache``."""
    cmd = [sys.executable, __file__, "--worker", name, "--phase", phase]
    env = {**os.environ, "EAFT_PL_MODEL_CACHE": str(cache), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"bench_model_load: the {phase} load of {name!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_model(name: str) -> Dict[str, Dict[str, Any]]:
    """The cold and the warm load of ``name``, on a fresh temporary cache deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="eaft_pl_load_") as cache:
        phases = {}
        for phase in PHASES:
            phases[phase] = run_phase(name, phase, Path(cache))
            print(json.dumps(phases[phase]), flush=True)
    return phases


#: The rows of the rendered table: label, then a function of (cold, warm) giving the cell.
ROWS: List[Tuple[str, Callable[[Dict[str, Any], Dict[str, Any]], str]]] = [
    ("parameters", lambda c, w: f"{c['parameters'] / 1e6:.0f}M"),
    ("vocabulary", lambda c, w: f"{c['vocab_size']:,}"),
    ("chat template in the GGUF", lambda c, w: "yes" if c["chat_template"] else "no"),
    ("GGUF file", lambda c, w: f"{c['gguf_mb']:.0f} MiB"),
    ("converted folder (float32)", lambda c, w: f"{c['folder_mb']:.0f} MiB"),
    ("first load: all", lambda c, w: f"{c['total_s']:.0f} s"),
    ("first load: locating the GGUF (joining chunks)", lambda c, w: f"{c['locate_s']:.1f} s"),
    ("first load: conversion", lambda c, w: f"{c['convert_s']:.0f} s, {c['dequantise_s']:.0f} s of it reading and de-quantising the GGUF"),
    ("first load: peak resident memory", lambda c, w: f"{c['peak_rss_mb']:,.0f} MiB"),
    ("later load: all", lambda c, w: f"{w['total_s']:.1f} s"),
    ("later load: the file's SHA-256", lambda c, w: f"{w['hash_s']:.1f} s"),
    ("later load: reading the folder", lambda c, w: f"{w['load_folder_s']:.1f} s"),
    ("later load: peak resident memory", lambda c, w: f"{w['peak_rss_mb']:,.0f} MiB"),
    ("first load / later load", lambda c, w: f"{c['total_s'] / w['total_s']:.0f}x"),
]


def summarise(measured: Dict[str, Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
    """The report: each model's phases, the ratios, and a Markdown table (one column per model).

    Raises:
        ValueError: a cold phase did not convert or a warm one did (the cache was not fresh, or not
            reused), so the figures would not measure what their labels say.
    """
    for name, phases in measured.items():
        if not phases["cold"]["converted"] or phases["warm"]["converted"]:
            raise ValueError(f"{name}: the cold load must convert and the warm one must not (converted: cold "
                             f"{phases['cold']['converted']}, warm {phases['warm']['converted']}); is the cache fresh?")
    names = list(measured)
    lines = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for label, cell in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(measured[n]["cold"], measured[n]["warm"]) for n in names) + " |")
    return {
        "models": measured,
        "ratios": {n: {"cold_over_warm_total": round(m["cold"]["total_s"] / m["warm"]["total_s"], 1),
                       "cold_over_warm_peak_rss": round(m["cold"]["peak_rss_mb"] / m["warm"]["peak_rss_mb"], 2)}
                   for n, m in measured.items()},  # fmt: skip
        "table": "\n".join(lines),
    }


def main(argv: Optional[List[str]] = None) -> None:
    """Parse the options; as the parent, measure every model and report; as a worker, one load."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"], help="short names or .gguf paths")
    parser.add_argument("--out", type=Path, help="also write the report here as a results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a fresh process measuring one load
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure_load(args.worker, args.phase)), flush=True)
        return
    started = time.perf_counter()
    report = summarise({name: measure_model(name) for name in args.models})
    finish("scripts/bench_model_load.py", report, started, args.out, argv)


if __name__ == "__main__":
    main()
