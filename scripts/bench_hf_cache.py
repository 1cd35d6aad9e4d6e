"""What the tokenisation cache of ``HFChatDataModule`` saves: the first setup of a split (tokenise and
write the ``datasets`` cache), a second setup by a fresh DataModule with the same settings (a cache
hit), and ``ChatJsonlDataModule`` on the same file (no cache), side by side in one process.

The data is the quickstart's ``train.jsonl`` repeated to ``--rows`` rows, in a temporary folder with
its own ``datasets`` cache, so every run starts cold. Times on a shared machine vary; the ratios of
the three, measured in one run, are what to quote.

Usage::

    python scripts/bench_hf_cache.py              # 20,000 rows
    python scripts/bench_hf_cache.py --rows 5000
    python scripts/bench_hf_cache.py --out docs/results/bench_hf_cache.json   # the file docs/data.md shows

Prints one JSON line per measurement and a last ``summary`` line with the ratios and the stamp of
:mod:`eaft_pl.results`; ``--out`` writes them as a results file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's eaft_pl when run as a script

from eaft_pl.data import ChatJsonlDataModule, HFChatDataModule  # noqa: E402
from eaft_pl.results import emit, finish  # noqa: E402

QUICKSTART = REPO / "data" / "quickstart"


def timed(name: str, setup: Callable[[], Any]) -> Dict[str, Any]:
    """Run one DataModule ``setup`` and print (and return) its wall time and example count."""
    start = time.perf_counter()
    datamodule = setup()
    seconds = time.perf_counter() - start
    record = {"measure": name, "seconds": round(seconds, 3), "examples": len(datamodule.datasets["train"])}
    emit(record)
    return record


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Time the three setups and return the results (also printed, and written to ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the training file")
    parser.add_argument("--out", type=Path, help="also write the results file here (docs/results/bench_hf_cache.json)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    lines = (QUICKSTART / "train.jsonl").read_text().splitlines()
    with tempfile.TemporaryDirectory(prefix="bench-hf-cache-") as tmp:
        train = Path(tmp) / "train.jsonl"
        train.write_text("".join(lines[i % len(lines)] + "\n" for i in range(args.rows)))
        common = {"tokenizer_name_or_path": str(QUICKSTART / "tokenizer"), "max_length": 192}

        def hf() -> HFChatDataModule:
            datamodule = HFChatDataModule(path="json", data_files=str(train), cache_dir=str(Path(tmp) / "cache"), **common)
            datamodule.setup("fit")
            return datamodule

        def jsonl() -> ChatJsonlDataModule:
            datamodule = ChatJsonlDataModule(train_file=str(train), **common)
            datamodule.setup("fit")
            return datamodule

        first = timed("hf_first_setup", hf)
        second = timed("hf_cached_setup", hf)
        plain = timed("jsonl_setup", jsonl)
    if not first["examples"] == second["examples"] == plain["examples"]:
        raise SystemExit(f"the three setups read different example counts: {first}, {second}, {plain}")
    results = {
        "settings": {"rows": args.rows, "max_length": 192, "data": "data/quickstart/train.jsonl repeated"},
        "measures": {r["measure"]: r for r in (first, second, plain)},
        "ratios": {
            "cached_over_first": round(second["seconds"] / first["seconds"], 4),
            "first_over_jsonl": round(first["seconds"] / plain["seconds"], 3),
        },
    }
    finish("scripts/bench_hf_cache.py", results, started, args.out, argv)
    return results


if __name__ == "__main__":
    main()
