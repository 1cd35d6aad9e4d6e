"""What the non-finite step check (EAFTModule._skip_nonfinite_step) costs, relative to a training step.

    HF_HUB_OFFLINE=1 python scripts/bench_nonfinite_check.py [--steps 20] [--repeats 3]
    python scripts/bench_nonfinite_check.py --out docs/results/bench_nonfinite_check.json   # docs/reliability.md

On the quickstart config (configs/setup/quickstart.yaml + configs/method/eaft.yaml: a 0.1M-parameter Llama, 2 micro-batches of 20 chats
per step, fp32 on CPU) it runs ``--steps`` optimizer steps ``--repeats`` times with the check on and
with it replaced by a no-op, alternating, and reports per run the median time of one optimizer step
(the interval between consecutive optimizer steps, the first two left out as warm-up) and, with the
check on, the median time of the check itself (both in ms). The machine may be shared: the figures
to trust are the check's own time and the step times' ratio. Prints one JSON line per run and a last
``summary`` line with the stamp of :mod:`eaft_pl.results`; ``--out`` writes it as a results file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's eaft_pl when run as a script

from eaft_pl.results import emit, finish  # noqa: E402


def run(steps: int, check: bool, workdir: str) -> Dict[str, float]:
    """Fit the quickstart config for ``steps`` optimizer steps with the check on or replaced by a
    no-op; the median step time and (check on) the check's median time, in ms."""
    from eaft_pl.cli import cli_main
    from eaft_pl.module import EAFTModule

    data = REPO / "data" / "quickstart"
    cli = cli_main(
        [
            "--config", str(REPO / "configs" / "setup" / "quickstart.yaml"), "--config", str(REPO / "configs" / "method" / "eaft.yaml"),
            f"--trainer.max_steps={steps}", "--trainer.logger=false", "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0",
            "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",  # no banners on stdout "--diagnostics.enabled=false",
            f"--trainer.default_root_dir={workdir}",
            f"--data.init_args.train_file={data / 'train.jsonl'}", f"--data.init_args.val_file={data / 'val.jsonl'}",
            f"--data.init_args.tokenizer_name_or_path={data / 'tokenizer'}",
        ],
        run=False,
    )  # fmt: skip
    module: EAFTModule = cli.model
    step_times: List[float] = []
    check_times: List[float] = []
    original = module._skip_nonfinite_step

    def timed() -> None:
        step_times.append(time.perf_counter())
        if check:
            start = time.perf_counter()
            original()
            check_times.append(time.perf_counter() - start)
        else:
            module.nonfinite._records.clear()  # the micro-batch flags the check would consume, so the list does not grow

    module._skip_nonfinite_step = timed  # type: ignore[method-assign]
    cli.trainer.fit(module, datamodule=cli.datamodule)
    intervals = [b - a for a, b in zip(step_times, step_times[1:])][2:]  # the first steps warm up
    out = {"step_ms": 1e3 * statistics.median(intervals)}
    if check:
        out["check_ms"] = 1e3 * statistics.median(check_times)
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Alternate runs with the check on and off; return the results (also printed, and written to ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (the first 2 are warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs with the check on, and as many with it off")
    parser.add_argument("--out", type=Path, help="also write the results file here (docs/results/bench_nonfinite_check.json)")
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error("--steps must be >= 5: the first 2 intervals are warm-up and a median needs a few more")
    started = time.perf_counter()
    runs: Dict[str, List[Dict[str, float]]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):
            for mode in ("on", "off"):
                record = run(args.steps, mode == "on", workdir)
                runs[mode].append(record)
                emit({"repeat": repeat, "check": mode, **{k: round(v, 4) for k, v in record.items()}})
    # Minimums over runs: on a shared machine the fastest run is the one least disturbed.
    step_on = min(r["step_ms"] for r in runs["on"])
    step_off = min(r["step_ms"] for r in runs["off"])
    check = min(r["check_ms"] for r in runs["on"])
    results = {
        "settings": {"config": "configs/setup/quickstart.yaml + configs/method/eaft.yaml", "steps": args.steps, "repeats": args.repeats},
        "runs": runs,
        "step_ms_check_on": round(step_on, 3),
        "step_ms_check_off": round(step_off, 3),
        "check_ms": round(check, 4),
        "check_share_of_step": round(check / step_off, 5),
        "step_ratio_on_over_off": round(step_on / step_off, 4),
        # The noise to hold that ratio against: how far apart the runs without the check are.
        "step_spread_check_off": round(max(r["step_ms"] for r in runs["off"]) / step_off, 4),
    }
    finish("scripts/bench_nonfinite_check.py", results, started, args.out, argv)
    return results


if __name__ == "__main__":
    main()
