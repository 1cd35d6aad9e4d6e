"""Write the quickstart's chat JSONL files (data/quickstart/{train,val}.jsonl), deterministically.

A small assistant that answers arithmetic questions with a worked sentence, in both accepted
layouts (``messages``, some multi-turn with a system prompt, and ``prompt``/``response``), so the
quickstart exercises every path of the JSONL reader and the multi-turn masking.

    python scripts/make_quickstart_data.py [--out data/quickstart] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
QUESTIONS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"]
SYSTEM = "You are a careful calculator."


def qa(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(sorted(OPS))
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    question = rng.choice(QUESTIONS).format(a=a, op=op, b=b)
    return question, f"{a} {op} {b} = {OPS[op](a, b)}. The answer is {OPS[op](a, b)}."


def example(rng: random.Random) -> dict:
    kind = rng.random()
    if kind < 0.4:
        q, r = qa(rng)
        return {"prompt": q, "response": r}
    messages = [{"role": "system", "content": SYSTEM}] if kind < 0.7 else []
    for _ in range(rng.choice([1, 2])):
        q, r = qa(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return {"messages": messages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/quickstart")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--val", type=int, default=64)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("val", args.val)):
        with (out / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                f.write(json.dumps(example(rng)) + "\n")
    print(json.dumps({"out": str(out), "train": args.train, "val": args.val, "seed": args.seed}))


if __name__ == "__main__":
    main()
