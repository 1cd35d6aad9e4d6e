"""The cost of a whole training step: a bare PyTorch loop against EAFTModule under the Lightning Trainer.

Variants, side by side in one process on the same model (same config, seed and weights), the same
batches and the same AdamW settings:

- ``bare``: forward, ``F.cross_entropy`` on the shifted labels, backward, ``AdamW.step``, ``zero_grad``;
- ``sft``: ``EAFTModule(gate=SFTGate())`` fitted by ``lightning.Trainer`` (statistics and metrics on,
  as shipped; no logger, checkpointing or progress bar, whose cost depends on the disk and terminal);
- ``eaft``: the same with ``EAFTGate()``;
- ``eaft_chunked``: EAFT with ``chunk_size`` set (the memory-lean loss), when ``--chunk_size`` > 0.

Each variant runs ``--warmup`` steps and then ``--steps`` timed steps; the variants take turns for
``--rounds`` rounds so that a slow spell of the shared machine hits them all. A ratio is taken within
each round (the variants of one round ran minutes apart at most) and the median over rounds is
reported. The first step's loss of every variant is printed as a check that they all compute
the same thing (SFT's equals the bare loop's).

Usage::

    python scripts/bench_step.py                       # hidden 256, 4 layers; vocabularies 512 and 32,768
    python scripts/bench_step.py --vocabs 151936 --steps 5
    python scripts/bench_step.py --out docs/results/bench_step.json   # what docs/performance.md shows

Prints one JSON line per (vocabulary, variant), one ``ratios`` line per vocabulary, and a last
``summary`` line with the stamp of :mod:`eaft_pl.results` and the table the docs show; ``--out``
writes that as a results file. With ``--profile`` it also prints, per variant, the operators that
took the most time over the timed steps of one extra run (``torch.profiler``, self CPU time): what a
difference between variants is made of.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's eaft_pl when run as a script

from eaft_pl.loss.gates import EAFTGate, SFTGate  # noqa: E402
from eaft_pl.models.char_tokenizer import build_char_tokenizer  # noqa: E402
from eaft_pl.models.loading import build_causal_lm  # noqa: E402
from eaft_pl.module import EAFTModule  # noqa: E402
from eaft_pl.results import emit, finish, markdown_table  # noqa: E402

#: The variants' column labels in the docs' table.
LABELS = {"bare": "bare loop", "sft": "Lightning + SFT", "eaft": "Lightning + EAFT", "eaft_chunked": "Lightning + EAFT, `chunk_size` {chunk}"}


def model_config(args, vocab: int) -> Dict:
    """The Llama config every variant builds (random weights, the same seed)."""
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 8 // 3,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "max_position_embeddings": args.seq,
    }


def make_batches(args, vocab: int) -> List[Dict[str, torch.Tensor]]:
    """Random token batches, the first third of every row masked as prompt; warm-up and timed steps."""
    g = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        labels = ids.clone()
        labels[:, : args.seq // 3] = -100  # a prompt third
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def steps_per_second(stamps: List[float], warmup: int) -> float:
    """Steps per second over the timed steps, from the end-of-step timestamps."""
    timed = stamps[warmup - 1 :]  # from the end of the last warm-up step to the end of the last step
    return (len(timed) - 1) / (timed[-1] - timed[0])


class _Profile:
    """Profiles the steps after warm-up (``torch.profiler``) when enabled; a no-op otherwise."""

    def __init__(self, enabled: bool, warmup: int) -> None:
        self.enabled, self.warmup, self.steps, self.prof = enabled, warmup, 0, None

    def step_done(self) -> None:
        self.steps += 1
        if self.enabled and self.steps == self.warmup:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()

    def top_ops(self, n: int = 12) -> List[Dict]:
        if self.prof is None:
            return []
        self.prof.__exit__(None, None, None)
        events = sorted(self.prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
        return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count} for e in events]


def run_bare(args, config, tokenizer, batches, profile: bool = False) -> Dict:
    """The bare PyTorch loop: forward, ``F.cross_entropy``, backward, ``AdamW.step``."""
    pl.seed_everything(args.seed, verbose=False)
    prof = _Profile(profile, args.warmup)
    model = build_causal_lm(config, tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    stamps, first_loss = [], None
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        shift = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = float(loss.detach()) if first_loss is None else first_loss
        stamps.append(time.perf_counter())
        prof.step_done()
    return {"steps_per_s": steps_per_second(stamps, args.warmup), "first_loss": first_loss, "top_ops": prof.top_ops()}


class _Stamps(pl.Callback):
    def __init__(self, prof: _Profile) -> None:
        self.stamps: List[float] = []
        self.first_loss = None
        self.prof = prof

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first_loss is None:
            # The module returns sum(w * CE) / c; with one micro-batch per step c is its token count.
            self.first_loss = float(outputs["loss"])
        self.stamps.append(time.perf_counter())
        self.prof.step_done()


def run_lightning(args, config, tokenizer_dir, batches, gate, chunk_size=None, profile: bool = False) -> Dict:
    """``EAFTModule`` with ``gate`` fitted by ``lightning.Trainer`` on ``batches`` (no logger, checkpoints or bar)."""
    pl.seed_everything(args.seed, verbose=False)
    module = EAFTModule(
        model_config=config,
        tokenizer_name_or_path=tokenizer_dir,
        gate=gate,
        learning_rate=args.lr,
        warmup_ratio=0.0,
        chunk_size=chunk_size,
    )
    stamps = _Stamps(_Profile(profile, args.warmup))
    trainer = pl.Trainer(
        max_steps=len(batches),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[stamps],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return {
        "steps_per_s": steps_per_second(stamps.stamps, args.warmup),
        "first_loss": stamps.first_loss,
        "top_ops": stamps.prof.top_ops(),
    }


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Time the variants per vocabulary; return the results (also printed, and written to ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[512, 32768])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk_size", type=int, default=256, help="also time EAFT with this chunk_size (0: off)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also print each variant's most expensive operators")
    parser.add_argument("--out", type=Path, help="also write the results file here (docs/results/bench_step.json)")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step's timestamp starts the clock)")
    # Lightning's banners (accelerator, tips, the skipped validation loop) say nothing about the timing.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    started = time.perf_counter()
    per_vocab: Dict[str, Dict[str, Any]] = {}

    tokenizer = build_char_tokenizer()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer.save_pretrained(tokenizer_dir)
        for vocab in args.vocabs:
            config = model_config(args, vocab)
            batches = make_batches(args, vocab)
            variants = {
                "bare": lambda p=False: run_bare(args, config, tokenizer, batches, p),
                "sft": lambda p=False: run_lightning(args, config, tokenizer_dir, batches, SFTGate(), profile=p),
                "eaft": lambda p=False: run_lightning(args, config, tokenizer_dir, batches, EAFTGate(), profile=p),
            }
            if args.chunk_size:
                variants["eaft_chunked"] = lambda p=False: run_lightning(
                    args, config, tokenizer_dir, batches, EAFTGate(), args.chunk_size, profile=p
                )
            runs: Dict[str, List[Dict]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, run in variants.items():
                    runs[name].append(run())
            measured: Dict[str, Any] = {}
            for name, results in runs.items():
                measured[name] = {
                    "steps_per_s": round(statistics.median(r["steps_per_s"] for r in results), 3),
                    "rounds": [round(r["steps_per_s"], 3) for r in results],
                    "first_loss": results[0]["first_loss"],
                }
                emit({"vocab": vocab, "variant": name, **measured[name], "tokens_per_step": args.batch * args.seq})

            def ratio(slow: str, fast: str) -> float:
                """Median over rounds of time per step of ``slow`` over ``fast`` (1.10 = 10% slower)."""
                per_round = [f["steps_per_s"] / s["steps_per_s"] for s, f in zip(runs[slow], runs[fast])]
                return round(statistics.median(per_round), 3)

            ratios = {"sft_vs_bare": ratio("sft", "bare"), "eaft_vs_sft": ratio("eaft", "sft"), "eaft_vs_bare": ratio("eaft", "bare")}
            if "eaft_chunked" in runs:
                ratios["eaft_chunked_vs_eaft"] = ratio("eaft_chunked", "eaft")
            emit({"vocab": vocab, "ratios": ratios})
            per_vocab[str(vocab)] = {"variants": measured, "ratios": ratios}
            if args.profile:
                for name, run in variants.items():
                    emit({"vocab": vocab, "variant": name, "top_ops": run(True)["top_ops"]})
    results = {
        "settings": {k: getattr(args, k) for k in ("vocabs", "hidden", "layers", "heads", "batch", "seq", "warmup", "steps", "rounds", "chunk_size", "lr", "seed")},
        "vocabs": per_vocab,
        "table": step_table(per_vocab, args.chunk_size),
    }
    finish("scripts/bench_step.py", results, started, args.out, argv)
    return results


def step_table(per_vocab: Dict[str, Dict[str, Any]], chunk_size: int) -> str:
    """The docs' table: steps per second of every variant (median over rounds) and the ratios of time
    per step (median over rounds of the per-round ratio), one row per vocabulary."""
    names = [n for n in LABELS if n != "eaft_chunked" or chunk_size]
    head = ["vocabulary", *(LABELS[n].format(chunk=chunk_size) + " (steps/s)" for n in names), "SFT vs bare (target ≤ 1.10)", "EAFT vs SFT (target ≤ 1.05)"]
    if chunk_size:
        head.append("EAFT chunked vs EAFT")
    rows = []
    for vocab, entry in per_vocab.items():
        r = entry["ratios"]
        row = [f"{int(vocab):,}", *(f"{entry['variants'][n]['steps_per_s']:.2f}" for n in names), f"**{r['sft_vs_bare']:.3f}**", f"**{r['eaft_vs_sft']:.3f}**"]
        if chunk_size:
            row.append(f"{r['eaft_chunked_vs_eaft']:.3f}")
        rows.append(row)
    return markdown_table(head, rows)


if __name__ == "__main__":
    main()
