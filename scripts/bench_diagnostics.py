"""What the training diagnostics (DiagnosticsCallback, on by default) cost, relative to a training step.

    python scripts/bench_diagnostics.py [--repeats 15] [--threads 2]
    python scripts/bench_diagnostics.py --out docs/results/bench_diagnostics.json   # what docs/diagnostics.md shows

On the embedded experiment's fine-tuning setup (its 1M-parameter model and 1.8k-word vocabulary, the
domain training batch of 16, the two validation sets of 67 and 500 conversations at batch 256), it
times, as the minimum over ``--repeats`` runs (the machine is shared, so minimums are the stable
figure):

- ``train_step_ms``: one optimizer step (forward, EAFT loss, backward, AdamW);
- ``eval_batch_ms`` / ``eval_batch_diag_ms``: one validation batch of 256 without / with the
  diagnostics' per-batch work (the logit-gradient norm and the accumulator update);
- ``report_json_ms`` / ``report_png_ms``: the per-evaluation summary and its PNG (one set).

and derives the cost of the diagnostics per validation pass (3 batches, 2 sets), in training steps,
and as a share of the experiment's 200-step run with its 4 validation passes. Prints one JSON line per
timed operation and a last ``summary`` line (with the stamp of :mod:`eaft_pl.results` and the table
the docs show); ``--out`` writes it as a results file.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's eaft_pl when run as a script

from eaft_pl.results import emit, finish, markdown_table  # noqa: E402

#: The timed operations: key of :func:`best_ms`, name in the output, row label in the docs' table.
OPERATIONS = (
    ("train", "train_step_ms", "one training step"),
    ("eval", "eval_batch_ms", "one validation batch, without diagnostics"),
    ("eval_diag", "eval_batch_diag_ms", "one validation batch, with the gradient norm and the histograms"),
    ("png", "report_png_ms", "the PNG of one set and evaluation"),
    ("json", "report_json_ms", "the JSON of one set and evaluation"),
)


def best_ms(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Minimum wall time of each function in ms. The functions take turns (round robin), so a burst
    of load from another process on the shared machine hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, lazy imports, kernels
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: min(t) for name, t in times.items()}


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """Time the diagnostics' parts against a training step; return the results (also printed, and
    written to ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the development machines have 2 cores)")
    ap.add_argument("--out", type=Path, help="also write the results file here (docs/results/bench_diagnostics.json)")
    opts = ap.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)

    from eaft_pl import EAFTModule
    from eaft_pl.data.chat import collate
    from eaft_pl.experiments.toyworld.datamodule import ToyWorldDataModule
    from eaft_pl.analysis.statistics import PlaneAccumulator, PlaneGrid
    from eaft_pl.evaluation.diagnostics import DiagnosticsCallback

    pretrain = yaml.safe_load((REPO / "configs" / "setup" / "toy_pretrain.yaml").read_text())
    finetune = yaml.safe_load((REPO / "configs" / "setup" / "toy_finetune.yaml").read_text())
    data_args = finetune["data"]["init_args"]
    model_config = dict(pretrain["model"]["init_args"]["model_config"], max_position_embeddings=data_args["max_length"])

    with tempfile.TemporaryDirectory() as tmp:
        data = ToyWorldDataModule(
            part="domain", seed=0, n_entities=data_args["n_entities"], tokenizer_name_or_path=f"{tmp}/tokenizer",
            max_length=data_args["max_length"], batch_size=data_args["batch_size"], eval_batch_size=data_args["eval_batch_size"],
        )  # fmt: skip
        data.prepare_data()
        data.setup("fit")
        module = EAFTModule(model_config=model_config, tokenizer_name_or_path=f"{tmp}/tokenizer", learning_rate=1e-3)
        module.configure_model()
    pad = data.pad_token_id
    train_batch = collate(data.datasets["train"][: data_args["batch_size"]], pad)
    val_batch = collate(data.datasets["val:general"][: data_args["eval_batch_size"]], pad)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)

    def train_step() -> None:
        module.train()
        stats, _, weighted_sum = module.token_stats(train_batch)  # the module's own training path
        loss = weighted_sum / max(stats.num_tokens, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    grid = PlaneGrid(math.log(module.hparams.top_k))
    acc = PlaneAccumulator(grid)

    @torch.no_grad()
    def eval_batch(diagnostics: bool) -> None:
        module.eval()
        # What validation_step computes, with and without the gradient norm the callback asks for.
        stats, weights, _ = module.token_stats(val_batch, grad_norm=diagnostics)
        if diagnostics:
            acc.update(stats.label_prob, stats.topk_entropy, stats.norm_entropy, stats.ce, weights, stats.logit_grad_norm)

    # The per-evaluation summary and figure of one set, filled by a diagnostics batch first.
    eval_batch(True)
    record = {"stage": "val", "name": "general", "step": 0, **acc.summary()}

    def png() -> None:
        fig = DiagnosticsCallback._figure(record, acc)
        fig.savefig(io.BytesIO(), format="png")

    r = opts.repeats
    t = best_ms(
        {
            "train": train_step,
            "eval": lambda: eval_batch(False),
            "eval_diag": lambda: eval_batch(True),
            "json": lambda: json.dumps(acc.summary()),
            "png": png,
        },
        r,
    )
    ms = {name: t[key] for key, name, _ in OPERATIONS}
    for key, name, _ in OPERATIONS:
        emit({"measure": name, "best_ms": round(ms[name], 3), "repeats": r, "vs_train_step": round(ms[name] / ms["train_step_ms"], 3)})
    train_ms, eval_ms, eval_diag_ms, json_ms, png_ms = (ms[k] for k in ("train_step_ms", "eval_batch_ms", "eval_batch_diag_ms", "report_json_ms", "report_png_ms"))

    # One validation pass of the embedded experiment: the domain set (67 conversations, 1 batch) and the
    # general set (500, 2 batches); a report (JSON + PNG) per set. The experiment's run: 200 steps, a
    # validation every 50 micro-batches (4 passes).
    batches, sets, passes, steps = 3, 2, 4, 200
    per_pass_ms = batches * (eval_diag_ms - eval_ms) + sets * (json_ms + png_ms)
    per_pass_no_png_ms = batches * (eval_diag_ms - eval_ms) + sets * json_ms
    overhead = eval_diag_ms / eval_ms - 1
    rows = []
    for _, name, label in OPERATIONS:
        extra = f" (+{overhead:.0%})" if name == "eval_batch_diag_ms" else ""
        rows.append([label, f"{ms[name]:.1f} ms{extra}", f"{ms[name] / train_ms:.2f}"])
    result = {
        "settings": {
            "repeats": r, "threads": opts.threads, "vocab": len(module.tokenizer),
            "train_batch": list(train_batch["input_ids"].shape), "val_batch": list(val_batch["input_ids"].shape),
            "validation_batches_per_pass": batches, "validation_sets": sets, "validation_passes": passes, "run_steps": steps,
        },  # fmt: skip
        **{name: round(value, 2) for name, value in ms.items()},
        "eval_batch_overhead": round(overhead, 3),
        "diagnostics_per_validation_ms": round(per_pass_ms, 1),
        "diagnostics_per_validation_in_train_steps": round(per_pass_ms / train_ms, 2),
        "diagnostics_share_of_run": round(passes * per_pass_ms / (steps * train_ms), 4),
        "diagnostics_share_of_run_without_png": round(passes * per_pass_no_png_ms / (steps * train_ms), 4),
        "table": markdown_table(["what", f"time (best of {r})", "in training steps"], rows),
    }
    finish("scripts/bench_diagnostics.py", result, started, opts.out, argv)
    return result


if __name__ == "__main__":
    main()
