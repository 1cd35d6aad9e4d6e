"""Training throughput with and without sequence packing, side by side on the same data.

A small Llama (random weights) is trained with ``EAFTModule.token_stats`` (the training step's loss,
EAFT gate by default), ``loss = sum(w * CE) / tokens``, backward and ``AdamW.step`` over one epoch of
the same conversations, once as padded batches of ``--batch_size`` conversations (``packing: false``)
and once as batches of ``--batch_size`` packed rows of up to ``--max_length`` tokens (``packing:
true``, :mod:`eaft_pl.data.packing`). The conversations are synthetic token sequences whose lengths
are drawn log-uniformly between ``--min_length`` and ``--max_length`` (long-tailed: most are short,
a few are long, as in chat SFT data); about the first third of each is an unsupervised prompt.

Both variants start from the same weights and optimizer state each round and see the conversations
in the same order (the packed rows in the order they are built). The variants alternate within each
round (A B, then B A) so that a slow spell of the shared machine hits both; the ratio is taken per
round and its median reported. Absolute times on a shared machine mean little; the ratio does.

Usage::

    python scripts/bench_packing.py                 # hidden 256, 4 layers, vocab 2048, 64 conversations
    python scripts/bench_packing.py --rounds 5 --examples 128
    python scripts/bench_packing.py --out docs/results/bench_packing.json   # what docs/data.md shows

Prints a ``setup`` line, one JSON line per (round, variant) and a last ``summary`` line: supervised
tokens per second, optimizer steps per second, the padding share of each variant, the packed/unpacked
ratios, the table the docs show and the stamp of :mod:`eaft_pl.results`; ``--out`` writes it as a
results file.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's eaft_pl when run as a script

from eaft_pl.data.chat import EncodedExample, collate  # noqa: E402
from eaft_pl.data.packing import PackingStats, collate_packed, pack_examples, packing_stats  # noqa: E402
from eaft_pl.loss.gates import EAFTGate, SFTGate  # noqa: E402
from eaft_pl.models.char_tokenizer import build_char_tokenizer  # noqa: E402
from eaft_pl.module import EAFTModule  # noqa: E402
from eaft_pl.results import emit, finish, markdown_table  # noqa: E402


def synthetic_examples(n: int, min_length: int, max_length: int, vocab: int, seed: int) -> List[EncodedExample]:
    """``n`` conversations with log-uniform lengths; the first third of each is an unsupervised prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(round(math.exp(rng.uniform(math.log(min_length), math.log(max_length)))))
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        prompt = max(1, length // 3)
        out.append(EncodedExample(ids, [-100] * prompt + ids[prompt:]))
    return out


def batches(examples: List[EncodedExample], packed: bool, batch_size: int, max_length: int) -> List[Dict[str, torch.Tensor]]:
    """The epoch's batches: ``batch_size`` padded conversations, or ``batch_size`` packed rows."""
    if packed:
        rows = pack_examples(examples, max_length)
        return [collate_packed(rows[i : i + batch_size], pad_token_id=0) for i in range(0, len(rows), batch_size)]
    return [collate(examples[i : i + batch_size], pad_token_id=0) for i in range(0, len(examples), batch_size)]


def run_epoch(module: EAFTModule, initial: Dict[str, torch.Tensor], data: List[Dict[str, torch.Tensor]], lr: float) -> Dict[str, float]:
    """Train one epoch from ``initial`` weights; return its wall time, steps and token counts."""
    module.model.load_state_dict(initial)
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=lr)
    supervised = 0
    start = time.perf_counter()
    for batch in data:
        stats, _, total = module.token_stats(batch)
        loss = total / max(stats.num_tokens, 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        supervised += stats.num_tokens
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 3),
        "steps": len(data),
        "supervised_tokens": supervised,
        "slots": sum(b["input_ids"].numel() for b in data),  # token positions computed, padding included
        "tokens_per_s": round(supervised / seconds, 1),
        "steps_per_s": round(len(data) / seconds, 4),
    }


def packing_table(results: Dict[str, List[Dict[str, float]]], packing: PackingStats, examples: int, ratios: Dict[str, Any]) -> str:
    """The docs' table: the epoch's shape, its padding, and the two rates with their packed/unpacked ratios."""
    u, p = results["unpacked"][0], results["packed"][0]
    rounds = ", ".join(f"{x:.2f}" for x in ratios["tokens_per_s_by_round"])
    rates = {v: {k: statistics.median(x[k] for x in results[v]) for k in ("tokens_per_s", "steps_per_s")} for v in results}
    return markdown_table(
        ["", "unpacked", "packed", "packed / unpacked"],
        [
            ["rows (steps) per epoch", f"{examples} conversations ({u['steps']} steps)", f"{packing.rows} rows, fill ratio {packing.fill_ratio:.1%} ({p['steps']} steps)", ""],
            ["token positions computed per epoch", f"{u['slots']:,}", f"{p['slots']:,}", f"{p['slots'] / u['slots']:.2f}×"],
            ["padding share of the computed positions", f"{ratios['padding_share']['unpacked']:.1%}", f"{ratios['padding_share']['packed']:.1%}", ""],
            ["supervised tokens per second (median)", f"{rates['unpacked']['tokens_per_s']:.1f}", f"{rates['packed']['tokens_per_s']:.1f}", f"**{ratios['median_ratio_tokens_per_s']:.2f}×** (rounds: {rounds})"],
            ["optimizer steps per second (median)", f"{rates['unpacked']['steps_per_s']:.3f}", f"{rates['packed']['steps_per_s']:.3f}", f"{ratios['median_ratio_steps_per_s']:.2f}× (a packed step holds more tokens)"],
        ],
    )  # fmt: skip


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train the epoch both ways in alternating rounds; return the results (also printed, and written to ``--out``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--min_length", type=int, default=20)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8, help="conversations (unpacked) or rows (packed) per step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gate", choices=["eaft", "sft"], default="eaft")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa or eager)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the results file here (docs/results/bench_packing.json)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = {
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 8 // 3,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "max_position_embeddings": args.max_length,
        "vocab_size": args.vocab,
        "attn_implementation": args.attn,
    }
    with tempfile.TemporaryDirectory() as tok_dir:
        build_char_tokenizer().save_pretrained(tok_dir)
        torch.manual_seed(args.seed)
        module = EAFTModule(model_config=config, tokenizer_name_or_path=tok_dir, gate=EAFTGate() if args.gate == "eaft" else SFTGate())
        module.configure_model()
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    examples = synthetic_examples(args.examples, args.min_length, args.max_length, args.vocab, args.seed)
    packing = packing_stats(pack_examples(examples, args.max_length), args.max_length)
    data = {variant: batches(examples, variant == "packed", args.batch_size, args.max_length) for variant in ("unpacked", "packed")}
    settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "threads": torch.get_num_threads()}
    emit({"setup": {**settings, "packing": packing.as_dict()}})

    for variant in data:  # warm-up: one step of each (allocator, kernels), not timed
        run_epoch(module, initial, data[variant][:1], lr=1e-4)
    results: Dict[str, List[Dict[str, float]]] = {"unpacked": [], "packed": []}
    for r in range(args.rounds):
        for variant in (("unpacked", "packed") if r % 2 == 0 else ("packed", "unpacked")):
            record = run_epoch(module, initial, data[variant], lr=1e-4)
            results[variant].append(record)
            emit({"round": r, "variant": variant, **record})

    def ratio(key: str) -> float:
        return statistics.median(p[key] / u[key] for p, u in zip(results["packed"], results["unpacked"]))

    summary = {
        "median_ratio_tokens_per_s": round(ratio("tokens_per_s"), 3),
        "tokens_per_s_by_round": [round(p["tokens_per_s"] / u["tokens_per_s"], 3) for p, u in zip(results["packed"], results["unpacked"])],
        "median_ratio_steps_per_s": round(ratio("steps_per_s"), 3),
        "epoch_time_ratio_unpacked_over_packed": round(1 / ratio("seconds"), 3),
        "positions_ratio_unpacked_over_packed": round(results["unpacked"][0]["slots"] / results["packed"][0]["slots"], 3),
        "padding_share": {
            v: round(1 - packing.tokens / results[v][0]["slots"], 4) for v in ("unpacked", "packed")
        },
        "steps_per_epoch": {v: results[v][0]["steps"] for v in ("unpacked", "packed")},
        "median_tokens_per_s": {v: statistics.median(x["tokens_per_s"] for x in results[v]) for v in ("unpacked", "packed")},
    }
    out = {"settings": settings, "packing": packing.as_dict(), "rounds": results, **summary}
    out["table"] = packing_table(results, packing, args.examples, summary)
    finish("scripts/bench_packing.py", out, started, args.out, argv)
    return out


if __name__ == "__main__":
    main()
