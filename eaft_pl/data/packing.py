"""Sequence packing: several encoded conversations per training row, with no attention or position
crossing between them.

**Rows.** :func:`pack_lengths` puts conversations into rows of at most ``max_length`` tokens by
*best-fit decreasing*: conversations are taken from the longest to the shortest (ties in data order)
and each goes into the open row with the least room that still holds it (ties: the row opened
first), else into a new row. It is a pure function of the lengths, so every run and every rank packs
the same rows; the order of the rows across epochs is the DataLoader's ordinary seeded shuffle. A
conversation is never split: it already fits, since encoding truncates it to ``max_length``.

**Batches.** :func:`collate_packed` concatenates each row's conversations and gives every one
``position_ids`` that restart at 0, and no ``attention_mask``. From such position ids ``transformers``
(>= 4.56) builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``: a new
sequence starts wherever a position is not the previous one plus 1) for the eager and sdpa
implementations; ``flash_attention_2`` reads the same boundaries from the position ids, but only in
a batch of one row (:func:`check_packing_support` tells which case a model is in). Rows are
right-padded to the longest of the batch; the padding is one more sequence (positions from 0,
labels -100), so it neither sees nor is seen by a conversation. A KV cache switches the detection
off, so every forward pass runs with ``use_cache=False``.

**Labels.** The first token of every conversation gets label -100 in the packed row. The loss at
position t predicts ``labels[t + 1]``; in a packed row the position before a conversation's first
token is the previous conversation's last token, which would otherwise be trained to predict it.
Unpacked, a conversation's first token is never a target either (nothing precedes it, the shift
drops it), so with the block-diagonal mask every target, its logits and hence its statistics are
those of the unpacked conversation.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from eaft_pl.data.chat import EncodedExample, padded_batch

__all__ = [
    "PackingStats",
    "pack_lengths",
    "pack_examples",
    "collate_packed",
    "packing_stats",
    "sequence_ids",
    "sequence_spans",
    "check_packing_support",
]


def pack_lengths(lengths: Sequence[int], max_length: int) -> List[List[int]]:
    """Group item indices into rows whose lengths sum to at most ``max_length`` (best-fit decreasing).

    Returns the rows in the order they were opened, each a list of indices in the order they were
    placed (longest first). Every index appears exactly once.

    Raises:
        ValueError: ``max_length`` < 1, or an item is empty or longer than ``max_length``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_length:
            raise ValueError(f"item {i} has length {n}; packing needs 1 <= length <= max_length ({max_length})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: List[List[int]] = []
    # (room left, row index), sorted: the first entry with room >= n is the best fit.
    room: List[Tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(room, (n, -1))
        if j == len(room):
            rows.append([i])
            left, row = max_length - n, len(rows) - 1
        else:
            left, row = room.pop(j)
            rows[row].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, row))
    return rows


def pack_examples(examples: Sequence[EncodedExample], max_length: int) -> List[List[EncodedExample]]:
    """The examples grouped into rows of at most ``max_length`` tokens (see :func:`pack_lengths`)."""
    rows = pack_lengths([len(e.input_ids) for e in examples], max_length)
    return [[examples[i] for i in row] for row in rows]


def collate_packed(
    rows: Sequence[Sequence[EncodedExample]], pad_token_id: int, pad_to_multiple_of: Optional[int] = None
) -> Dict[str, Any]:
    """Concatenate each row's examples and right-pad the rows to the longest.

    Returns ``input_ids``, ``labels`` and ``position_ids``, each ``(B, T)`` long tensors, no
    ``attention_mask`` (its absence is what makes ``transformers`` read the sequence boundaries from
    the position ids), and ``sources``, every packed example's ``file:line``. Position ids restart at 0 for every example and for the padding; the label of
    every example's first token and of the padding is -100.
    """
    input_ids, labels = padded_batch([sum(len(e.input_ids) for e in row) for row in rows], pad_token_id, pad_to_multiple_of)
    length = input_ids.shape[1]
    position_ids = torch.zeros_like(input_ids)
    for b, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[b, start : start + n] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[b, start + 1 : start + n] = torch.tensor(e.labels[1:], dtype=torch.long)
            position_ids[b, start : start + n] = torch.arange(n)
            start += n
        position_ids[b, start:] = torch.arange(length - start)  # the padding: a sequence of its own
    sources = [e.source for row in rows for e in row]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sources": sources}


@dataclass(frozen=True)
class PackingStats:
    """What packing a split did.

    Attributes:
        rows: Packed rows.
        examples: Conversations in them.
        tokens: Their tokens.
        max_length: The rows' capacity.
    """

    rows: int
    examples: int
    tokens: int
    max_length: int

    @property
    def fill_ratio(self) -> float:
        """Real tokens over the rows' capacity, ``tokens / (rows * max_length)``."""
        return self.tokens / max(self.rows * self.max_length, 1)

    def as_dict(self) -> Dict[str, float]:
        return {**vars(self), "fill_ratio": round(self.fill_ratio, 4)}


def packing_stats(rows: Sequence[Sequence[EncodedExample]], max_length: int) -> PackingStats:
    """Count the rows, examples and tokens of a packed split."""
    return PackingStats(
        rows=len(rows),
        examples=sum(len(row) for row in rows),
        tokens=sum(len(e.input_ids) for row in rows for e in row),
        max_length=max_length,
    )


def _starts(position_ids: Tensor) -> Tensor:
    """``(B, T)`` bool: where a sequence starts, by the rule ``transformers`` applies (a position that
    is not the previous one plus 1, and the start of every row)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def sequence_ids(position_ids: Tensor) -> Tensor:
    """``(B, T)`` index of the sequence each token belongs to, numbered 0, 1, ... across the batch
    (row by row), from packed ``position_ids``."""
    return _starts(position_ids).reshape(-1).cumsum(0).view(position_ids.shape) - 1


def sequence_spans(position_ids: Tensor) -> List[List[Tuple[int, int]]]:
    """``[start, end)`` of every sequence of every row, from packed ``position_ids`` (padding included,
    as the last span of a padded row)."""
    length = position_ids.shape[1]
    spans = []
    for row in _starts(position_ids).tolist():
        starts = [t for t, s in enumerate(row) if s]
        spans.append(list(zip(starts, starts[1:] + [length])))
    return spans


def _crossing(model: torch.nn.Module, rows: int, length: int) -> float:
    """How much the logits of a sequence change when another is packed before it, in ``rows`` rows
    of two sequences each, relative to the logits' scale (eval mode, no gradients)."""
    embedding = model.get_input_embeddings().weight
    vocab, device = embedding.shape[0], embedding.device
    steps = torch.arange(length, device=device)
    firsts = torch.stack([(steps * (r + 2) + 1).remainder(vocab) for r in range(rows)])  # (rows, length)
    seconds = torch.stack([(steps * 7 + 3 + r).remainder(vocab) for r in range(rows)])
    positions = steps.expand(rows, length)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # use_cache=False: with a KV cache transformers does not look for packed sequences.
            ids, pos = torch.cat([firsts, seconds], 1), torch.cat([positions, positions], 1)
            packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, length:].float()
            alone = model(input_ids=seconds, position_ids=positions, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    return (packed - alone).abs().max().item() / max(1.0, alone.abs().max().item())


def check_packing_support(model: torch.nn.Module, *, rows: int = 2, length: int = 6) -> None:
    """Refuse a model that lets packed sequences attend to each other.

    Runs ``model`` (in eval mode, restored afterwards, without gradients) on ``rows`` rows of two
    sequences each, with restarting ``position_ids`` and no attention mask, and on the second sequences
    alone, and compares the second ones' logits. Models built on ``transformers.masking_utils`` (Llama,
    Qwen2/2.5/3, Mistral, Gemma, ...) pass with the eager and sdpa implementations;
    ``flash_attention_2`` passes only with one row (transformers reads packed sequences from the
    position ids only in a batch of one); custom code or attention functions that ignore the position
    ids do not pass.

    Raises:
        ValueError: the logits differ, naming ``data.init_args.packing`` and the model class.
    """
    embedding = model.get_input_embeddings().weight
    low_precision = embedding.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(embedding.device.type)
    tol = 1e-2 if low_precision else 1e-4
    err = _crossing(model, rows, length)
    if err <= tol:
        return
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    where = f"data.init_args.packing: {type(model).__name__} (attn_implementation {impl!r})"
    if rows > 1 and _crossing(model, 1, length) <= tol:
        raise ValueError(
            f"{where} keeps packed conversations apart in a batch of one row but not of {rows}; set "
            "data.init_args.batch_size: 1 (one row of max_length tokens per micro-batch; raise "
            "trainer.accumulate_grad_batches for larger steps), or data.init_args.packing: false"
        )
    raise ValueError(
        f"{where} lets packed conversations attend to each other (the logits of a sequence change by "
        f"{err:.3g} of their scale when another is packed before it); use a model and attention implementation "
        "that read sequence boundaries from position_ids (eager or sdpa in a transformers model), or set "
        "data.init_args.packing: false"
    )
