"""Seeded train/validation/held-out splits of a problem generator, disjoint by construction."""

from __future__ import annotations

import random
from typing import Callable, Dict, Hashable, List, Mapping, Sequence, TypeVar

__all__ = ["SPLIT_ORDER", "disjoint_splits", "pick"]

T = TypeVar("T")

#: The order splits are drawn in: each split skips what the earlier ones hold, so the held-out
#: problems depend only on the seed and ``n_test``, not on how much training data is asked for.
SPLIT_ORDER = ("test", "val", "train")

# Draws per wanted problem before giving up: a generator whose space is too small for the sizes
# asked for must fail with a clear error, not loop for ever.
_MAX_DRAWS_PER_ITEM = 50


def disjoint_splits(
    draw: Callable[[random.Random, int], T],
    key: Callable[[T], Hashable],
    seed: int,
    sizes: Mapping[str, int],
    domain: str,
) -> Dict[str, List[T]]:
    """Draw ``sizes[split]`` problems per split with ``draw(rng, index)``, no two with the same ``key``
    within or across splits.

    Each split has its own random stream (``domain``, ``seed`` and the split's name), drawn in
    :data:`SPLIT_ORDER`.

    Raises:
        ValueError: a size is negative or unknown, or the generator cannot supply that many distinct
            problems.
    """
    unknown = sorted(set(sizes) - set(SPLIT_ORDER))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; splits are {list(SPLIT_ORDER)}")
    taken: set = set()
    splits: Dict[str, List[T]] = {}
    for split in SPLIT_ORDER:
        n = sizes.get(split, 0)
        if n < 0:
            raise ValueError(f"data.init_args.n_{split} must be >= 0, got {n}")
        rng = random.Random(f"{domain}:{seed}:{split}")
        problems: List[T] = []
        draws = 0
        while len(problems) < n:
            if draws >= _MAX_DRAWS_PER_ITEM * max(n, 1):
                raise ValueError(
                    f"{domain}: found only {len(problems)} distinct {split} problems of {n} asked for after {draws} "
                    f"draws; lower data.init_args.n_{split} (or the other split sizes)"
                )
            problem = draw(rng, len(problems))
            draws += 1
            if key(problem) not in taken:
                taken.add(key(problem))
                problems.append(problem)
        splits[split] = problems
    return splits


def pick(rng: random.Random, options: Sequence[T]) -> T:
    """One of ``options``, uniformly (``rng.choice`` spelt once, so every generator draws the same way)."""
    return options[rng.randrange(len(options))]
