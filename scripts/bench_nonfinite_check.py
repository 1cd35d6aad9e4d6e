"""What the non-finite step check (EAFTModule._skip_nonfinite_step) costs, relative to a training step.

    HF_HUB_OFFLINE=1 python scripts/bench_nonfinite_check.py [--steps 30] [--repeats 3]

On the quickstart config (base.yaml + eaft.yaml: a 0.1M-parameter Llama, 2 micro-batches of 20 chats
per step, fp32 on CPU) it runs ``--steps`` optimizer steps ``--repeats`` times with the check on and
with it replaced by a no-op, alternating, and reports per run the median time of one optimizer step
(the interval between consecutive optimizer steps) and, with the check on, the median time of the
check itself (both in ms). The machine may be shared: the figures to trust are the check's own time
and the medians' ratio. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def run(steps: int, check: bool, workdir: str) -> Dict[str, float]:
    from eaft_pl.cli import cli_main
    from eaft_pl.module import EAFTModule

    quick = REPO / "configs" / "quickstart"
    data = REPO / "data" / "quickstart"
    cli = cli_main(
        [
            "--config", str(quick / "base.yaml"), "--config", str(quick / "eaft.yaml"),
            f"--trainer.max_steps={steps}", "--trainer.logger=false", "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0", "--diagnostics.enabled=false",
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
            module._step_batches.clear()  # what the check would consume, so the list does not grow

    module._skip_nonfinite_step = timed  # type: ignore[method-assign]
    cli.trainer.fit(module, datamodule=cli.datamodule)
    intervals = [b - a for a, b in zip(step_times, step_times[1:])][2:]  # the first steps warm up
    out = {"step_ms": 1e3 * statistics.median(intervals)}
    if check:
        out["check_ms"] = 1e3 * statistics.median(check_times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: Dict[str, List[Dict[str, float]]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            for mode in ("on", "off"):
                runs[mode].append(run(args.steps, mode == "on", workdir))
    step_on = min(r["step_ms"] for r in runs["on"])
    step_off = min(r["step_ms"] for r in runs["off"])
    check = min(r["check_ms"] for r in runs["on"])
    print(
        json.dumps(
            {
                "runs": runs,
                "step_ms_check_on": round(step_on, 3),
                "step_ms_check_off": round(step_off, 3),
                "check_ms": round(check, 4),
                "check_share_of_step": round(check / step_off, 5),
                "step_ratio_on_over_off": round(step_on / step_off, 4),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
