"""Peak memory of EAFT training in ``transformers.Trainer``: the lean path against the full logits.

Both variants train the same tiny Llama (random weights, a large vocabulary so that the logits
dominate, untied LM head), or with ``--model`` a real pretrained model (a short name such as
``gemma3-270m``, a GGUF file or a Hugging Face folder, loaded in float32), for ``--steps`` AdamW
steps on the same random batch:

- ``full``: ``Trainer(compute_loss_func=EAFTLoss())``, the model builds the ``(tokens, vocab)`` logits;
- ``lean``: ``EAFTTrainer(eaft_loss=EAFTLoss(chunk_size=...))``, the loss from the hidden states and the
  LM head, ``--chunk_size`` tokens at a time.

Each variant runs in a fresh process, so one's peak cannot hide in another's. On CPU the peak is the
process's maximum resident set (``ru_maxrss``); ``above_start_mb`` subtracts the resident set after the
model and the data were built (what any method holds; the optimizer state comes on top in both). On
a GPU it is ``torch.cuda.max_memory_allocated`` over the training. The first step's loss of both is
reported too: the two paths compute the same loss.

Usage::

    python scripts/bench_hf_memory.py                       # V=151,936, 4 x 256 tokens, CPU
    python scripts/bench_hf_memory.py --out docs/results/bench_hf_memory.json
    python scripts/bench_hf_memory.py --model gemma3-270m --batch 2 --seq 128 --chunk_size 64 \
        --out docs/results/gemma_chunked.json   # Gemma 3 270M, vocabulary 262,144

With ``--model`` the report also gives the training time's ratio (``train_seconds_full_over_lean``)
and the model's vocabulary and parameter count; the model is resolved (a GGUF converted into the
cache) once before the variants start, so no variant's peak holds a conversion.

Prints one JSON object: the stamp of :mod:`eaft_pl.results` (command, commit, date, wall time, machine),
each variant's peak and the ratios; ``--out`` writes it as a results file.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's eaft_pl when run as a script

from eaft_pl.results import finish  # noqa: E402
VARIANTS = ("full", "lean")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(args):
    """The model (the tiny Llama, or ``--model`` in float32) and a random batch of ``batch`` rows of
    token ids below its vocabulary size, the first third of each masked as prompt."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.model is not None:
        from eaft_pl.models.loading import load_causal_lm

        model = load_causal_lm(args.model, torch_dtype="float32")
        with torch.no_grad():  # read every weight once: from_pretrained maps the file lazily, and a
            for param in model.parameters():  # start measured before the weights are paged in would
                param.sum()  # count them as training's memory
        return model, random_rows(args, model.get_output_embeddings().weight.shape[0])
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config), random_rows(args, args.vocab)


def random_rows(args, vocab: int) -> list:
    """``batch`` rows of ``seq`` random token ids below ``vocab``, the first third masked as prompt."""
    import torch

    ids = torch.randint(0, vocab, (args.batch, args.seq))
    labels = ids.clone()
    labels[:, : args.seq // 3] = -100
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]
    return rows


def worker(args) -> dict:
    """Train one variant in this process; its peak memory and first loss."""
    import torch
    from transformers import Trainer, TrainingArguments

    from eaft_pl.integrations.transformers import EAFTLoss, EAFTTrainer

    model, rows = build(args)
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
    start = rss_mb()
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
            dataloader_pin_memory=False, seed=args.seed,
        )  # fmt: skip
        common = dict(model=model, args=training, train_dataset=rows, data_collator=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})
        if args.variant == "full":
            trainer = Trainer(**common, compute_loss_func=EAFTLoss())
        else:
            trainer = EAFTTrainer(**common, eaft_loss=EAFTLoss(chunk_size=args.chunk_size))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - began
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {"variant": args.variant, "first_loss": losses[0], "train_seconds": round(seconds, 2)}
    if args.model is not None:
        result.update(vocab=model.get_output_embeddings().weight.shape[0], parameters=sum(p.numel() for p in model.parameters()))
    if cuda:
        result["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        result.update(peak_rss_mb=round(peak_rss_mb(), 1), start_rss_mb=round(start, 1), above_start_mb=round(peak_rss_mb() - start, 1))
    return result


def run_variant(args, variant: str) -> dict:
    """One variant in a fresh process (the same options, plus ``--variant``)."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)  # one line per variant as it finishes
    return result


def summarise(args, results: dict) -> dict:
    key = "peak_cuda_allocated_mb" if "peak_cuda_allocated_mb" in results["full"] else "peak_rss_mb"
    ratios = {f"{key}_full_over_lean": round(results["full"][key] / results["lean"][key], 2)}
    if key == "peak_rss_mb":
        ratios["above_start_full_over_lean"] = round(results["full"]["above_start_mb"] / results["lean"]["above_start_mb"], 2)
    vocab = results["full"].get("vocab", args.vocab)  # a real model's own, else --vocab
    setup = {"vocab": vocab, "hidden": args.hidden, "batch": args.batch, "seq": args.seq, "steps": args.steps,
             "chunk_size": args.chunk_size, "fp32_logits_mb": round(args.batch * args.seq * vocab * 4 / 2**20, 1)}  # fmt: skip
    if args.model is not None:  # the default report keeps its keys (docs/huggingface.md reads them)
        del setup["hidden"]
        setup.update(model=args.model, parameters=results["full"]["parameters"])
        ratios["train_seconds_full_over_lean"] = round(results["full"]["train_seconds"] / results["lean"]["train_seconds"], 2)
    first = results["full"]["first_loss"], results["lean"]["first_loss"]
    return {
        "setup": setup,
        "variants": results,
        "ratios": ratios,
        "same_first_loss": abs(first[0] - first[1]) <= 1e-4 * abs(first[0]),
    }


def parse_args(argv=None) -> argparse.Namespace:
    """The options (``argv``, default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a pretrained causal LM (short name, .gguf, folder) instead of the tiny Llama")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunk_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the worker process
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant is not None:
        print(json.dumps(worker(args)), flush=True)
        return
    started = time.perf_counter()
    if args.model is not None:
        from eaft_pl.models.gguf import resolve_model_path

        resolve_model_path(args.model)  # convert a GGUF here, once, not inside a measured variant
    report = summarise(args, {v: run_variant(args, v) for v in VARIANTS})
    finish("scripts/bench_hf_memory.py", report, started, args.out, argv)


if __name__ == "__main__":
    main()
