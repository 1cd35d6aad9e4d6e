"""The reference (base) model's per-token statistics: one pass before training, cached on disk.

Base-model gates (:mod:`eaft_pl.loss.reference_gates`) and FLOW need, for every supervised token of the
data, what the model *before* fine-tuning thought of it: its top-K entropy and label probability, and
per example its mean CE. Two sources, chosen with ``model.init_args.reference_source``:

- ``cache`` (default): one no-grad pass over every split of the DataModule (training and evaluation
  sets, so evaluation-time gate weights are defined too) when the model is built, stored in a
  :class:`ReferenceTable` keyed by a hash of each example's token ids and labels, and written to
  ``<cache_dir>/<key>.pt``. The file's key hashes the model (config and every parameter's bytes), the
  tokenizer (vocabulary, special tokens, chat template), the data (every example's ids and labels)
  and K, so a changed model, tokenizer or dataset never reuses a stale file. Written atomically
  (temporary file, then rename).
- ``frozen``: a frozen copy of the base held in memory runs on every batch (twice the weights'
  memory and one more forward per step). Needed by the KL baselines (SFT-KL, ASFT), which need the
  reference's full distribution, not just statistics.

Both give the same statistics (a test checks it). Nothing here imports Lightning.
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from eaft_pl.data.chat import batch_to, collate
from eaft_pl.data.packing import sequence_ids, sequence_spans
from eaft_pl.fileio import atomic_write
from eaft_pl.loss.stats import IGNORE_INDEX, TokenStats, token_statistics
from eaft_pl.progress import progress

__all__ = [
    "REFERENCE_FIELDS",
    "KLDirection",
    "example_key",
    "model_fingerprint",
    "tokenizer_fingerprint",
    "data_fingerprint",
    "cache_key",
    "ReferenceTable",
    "compute_reference_table",
    "load_or_compute_reference",
    "reference_for_datamodule",
    "frozen_copy",
    "frozen_reference",
    "token_kl",
]

#: Per-token reference vectors a batch carries (``TokenStats.reference``).
REFERENCE_FIELDS = ("topk_entropy", "label_prob", "sample_ce")
#: Bump when the stored format or the statistics change: old files then miss.
CACHE_VERSION = 1

KLDirection = Literal["policy_ref", "ref_policy"]


# ---- fingerprints -------------------------------------------------------------------------------


def example_key(input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """A stable id of an example: a hash of its token ids and labels (not of its position in a file,
    so shuffling, batching, padding and packing do not change it).

    The first label is hashed as -100 whatever it is: it is never a target (labels are shifted by
    one), and a packed row sets it to -100 (:mod:`eaft_pl.data.packing`).
    """
    h = hashlib.sha1()
    h.update(torch.tensor(list(input_ids), dtype=torch.int64).numpy().tobytes())
    h.update(b"|")
    h.update(torch.tensor([IGNORE_INDEX, *list(labels)[1:]] if len(labels) else [], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the model's config (when it has one) and of every parameter and buffer: name, dtype,
    shape and bytes. Reads all the weights once (seconds for billions of parameters)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's class, vocabulary, special tokens and chat template."""
    payload = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(splits: Dict[str, Sequence[Any]]) -> str:
    """Hash of every split's examples (objects with ``input_ids`` and ``labels``), in order."""
    h = hashlib.sha256()
    for split in sorted(splits):
        h.update(f"[{split}:{len(splits[split])}]".encode())
        for ex in splits[split]:
            h.update(example_key(ex.input_ids, ex.labels).encode())
    return h.hexdigest()


def cache_key(model_fp: str, tokenizer_fp: str, data_fp: str, top_k: int) -> str:
    """The cache file's name: all three fingerprints, K and the format version."""
    payload = json.dumps({"model": model_fp, "tokenizer": tokenizer_fp, "data": data_fp, "top_k": top_k, "v": CACHE_VERSION})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# ---- the table -------------------------------------------------------------------------------------


@dataclass
class ReferenceTable:
    """The reference model's statistics of every example, by :func:`example_key`.

    Attributes:
        top_k: K of the stored top-K entropies.
        entries: ``key -> {"topk_entropy", "label_prob"}``, ``(n,)`` fp32 vectors over the example's
            supervised tokens (label-shifted, in order), and ``"sample_ce"``, a 0-d mean CE.
        train_keys: Keys of the training examples (FLOW's median is over these).
        seconds: Wall time of the pass that computed it (0 when it was loaded).
    """

    top_k: int
    entries: Dict[str, Dict[str, Tensor]] = field(default_factory=dict)
    train_keys: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def median_sample_ce(self) -> float:
        """Median over the training examples of the base model's mean token CE (FLOW's tau)."""
        keys = self.train_keys or list(self.entries)
        if not keys:
            raise ValueError("the reference table holds no training example, so FLOW's tau (their median loss) is undefined")
        return float(statistics.median(float(self.entries[k]["sample_ce"]) for k in keys))

    def batch_reference(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``name -> (B, T)`` tensors aligned with ``batch["labels"]`` (NaN where not supervised), for
        :func:`eaft_pl.loss.stats.token_statistics`' ``reference`` argument.

        A row is one example up to its attention mask, or, in a packed batch (``position_ids`` and no
        mask), one example per sequence; a sequence without a supervised token (the padding) needs no
        entry.
        """
        ids, labels = batch["input_ids"], batch["labels"]
        ids_rows, label_rows = ids.tolist(), labels.tolist()
        out = {name: torch.full(labels.shape, float("nan")) for name in REFERENCE_FIELDS}
        out["sample_ce_median"] = torch.full(labels.shape, float("nan"))
        median = self.median_sample_ce if self.train_keys else float("nan")
        for b, spans in enumerate(_example_spans(batch)):
            for s, e in spans:
                positions = [t for t in range(s + 1, e) if label_rows[b][t] != IGNORE_INDEX]
                if not positions:
                    continue
                entry = self.entries.get(example_key(ids_rows[b][s:e], label_rows[b][s:e]))
                if entry is None:
                    where = f"the example at tokens {s}:{e} of row {b}" if len(spans) > 1 else f"example {b}"
                    raise KeyError(
                        f"{where} of the batch is not in the reference table (it holds the DataModule's splits at "
                        "the start of training); data seen later, e.g. by predict on another file, needs "
                        "model.init_args.reference_source: frozen"
                    )
                pos = torch.tensor(positions, dtype=torch.long)
                out["topk_entropy"][b, pos] = entry["topk_entropy"]
                out["label_prob"][b, pos] = entry["label_prob"]
                out["sample_ce"][b, pos] = float(entry["sample_ce"])
                out["sample_ce_median"][b, pos] = median
        return {name: value.to(labels.device) for name, value in out.items()}

    def state(self) -> Dict[str, Any]:
        return {"top_k": self.top_k, "entries": self.entries, "train_keys": self.train_keys, "version": CACHE_VERSION}

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "ReferenceTable":
        return cls(top_k=int(state["top_k"]), entries=state["entries"], train_keys=list(state["train_keys"]))


def _example_spans(batch: Dict[str, Tensor]) -> List[List[Tuple[int, int]]]:
    """``[start, end)`` of every example of every row: the packed sequences when the batch has
    ``position_ids`` and no ``attention_mask``, else one per row, up to its attention mask."""
    labels = batch["labels"]
    mask = batch.get("attention_mask")
    if mask is None and "position_ids" in batch:
        return sequence_spans(batch["position_ids"])
    lengths = mask.sum(1).tolist() if mask is not None else [labels.shape[1]] * labels.shape[0]
    return [[(0, n)] for n in lengths]


def _per_row(stats: TokenStats, labels: Tensor) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Split ``(N,)`` statistics into each row's ``(topk_entropy, label_prob, ce)``."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()
    ce = stats.ce.detach()
    return list(zip(stats.topk_entropy.split(counts), stats.label_prob.split(counts), ce.split(counts)))


def compute_reference_table(
    model: torch.nn.Module,
    splits: Dict[str, Sequence[Any]],
    top_k: int,
    collate_fn: Any,
    batch_size: int = 32,
    progress_bar: bool = False,
) -> ReferenceTable:
    """One no-grad pass of ``model`` (in eval mode, restored after) over every example of ``splits``.

    Args:
        model: A causal LM returning ``.logits``.
        splits: ``split -> examples`` (``input_ids``, ``labels``); ``"train"`` sets FLOW's median.
        top_k: K of the top-K entropy.
        collate_fn: Turns a list of examples into a batch dict (``input_ids``, ``attention_mask``, ``labels``).
        batch_size: Examples per forward pass.
        progress_bar: Draw a progress bar per split on stderr (see :func:`eaft_pl.progress.trainer_progress`).
    """
    start = time.perf_counter()
    table = ReferenceTable(top_k=top_k)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for split in sorted(splits):
                examples = list(splits[split])
                starts = range(0, len(examples), batch_size)
                for i in progress(starts, f"reference pass: {split}", progress_bar, len(starts)):
                    chunk = examples[i : i + batch_size]
                    batch = batch_to(collate_fn(chunk), device)
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
                    stats = token_statistics(logits, batch["labels"], top_k=top_k)
                    for ex, (h, p, ce) in zip(chunk, _per_row(stats, batch["labels"])):
                        key = example_key(ex.input_ids, ex.labels)
                        table.entries[key] = {
                            "topk_entropy": h.float().cpu(),
                            "label_prob": p.float().cpu(),
                            "sample_ce": ce.float().mean().cpu() if ce.numel() else torch.tensor(0.0),
                        }
                        if split == "train":
                            table.train_keys.append(key)
    finally:
        model.train(was_training)
    table.seconds = time.perf_counter() - start
    return table


def load_or_compute_reference(
    model: torch.nn.Module,
    tokenizer: Any,
    splits: Dict[str, Sequence[Any]],
    top_k: int,
    collate_fn: Any,
    cache_dir: Optional[str],
    batch_size: int = 32,
    progress_bar: bool = False,
) -> Tuple[ReferenceTable, Optional[Path], bool]:
    """The reference table of ``model`` on ``splits``, from ``<cache_dir>/<key>.pt`` when a file with
    the same key exists, else computed (and written when ``cache_dir`` is set).

    Returns:
        ``(table, path, hit)``: the table, the cache file (``None`` without a cache dir) and whether
        it was read from disk.
    """
    path = None
    if cache_dir is not None:
        key = cache_key(model_fingerprint(model), tokenizer_fingerprint(tokenizer), data_fingerprint(splits), top_k)
        path = Path(cache_dir) / f"{key}.pt"
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("version") == CACHE_VERSION:
                return ReferenceTable.from_state(state), path, True
    table = compute_reference_table(model, splits, top_k, collate_fn, batch_size, progress_bar)
    if path is not None:
        # Temporary file + rename: a concurrent reader (another rank) never sees half a file.
        atomic_write(path, lambda tmp: torch.save(table.state(), tmp))
    return table, path, False


def reference_for_datamodule(
    model: torch.nn.Module,
    tokenizer: Any,
    datamodule: Any,
    top_k: int,
    cache_dir: Optional[str],
    owner: str,
    progress_bar: bool = False,
) -> Tuple[ReferenceTable, Optional[Path], bool]:
    """:func:`load_or_compute_reference` over every encoded split of a ChatDataModule
    (``datamodule.datasets``), batched with its padding; ``owner`` names what needs the pass in the
    error raised when the DataModule has no splits set up."""
    datasets = getattr(datamodule, "datasets", None)
    if not datasets:
        raise ValueError(
            f"{owner}: the reference pass reads the DataModule's encoded splits (datamodule.datasets); "
            "none are set up. Use a ChatDataModule, or model.init_args.reference_source: frozen"
        )
    return load_or_compute_reference(
        model,
        tokenizer,
        {split: list(examples) for split, examples in datasets.items()},
        top_k,
        partial(collate, pad_token_id=datamodule.pad_token_id),
        cache_dir,
        batch_size=getattr(datamodule, "eval_batch_size", 32),
        progress_bar=progress_bar,
    )


# ---- the frozen copy -------------------------------------------------------------------------------


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in eval mode with no parameter requiring gradient: the reference of the
    KL baselines and of ``reference_source: frozen`` (twice the weights' memory)."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def frozen_reference(ref_model: torch.nn.Module, batch: Dict[str, Tensor], top_k: int) -> Tuple[Dict[str, Tensor], Tensor]:
    """Run the frozen reference on a batch: its statistics as ``name -> (B, T)`` aligned with the
    labels (as :meth:`ReferenceTable.batch_reference` returns them) and its logits ``(B, T, V)``.

    ``sample_ce`` is each example's mean CE (each row's, or each sequence's in a packed batch with
    ``position_ids``); ``sample_ce_median`` is not available from one batch (FLOW's median needs the
    whole training set) and is left out.
    """
    labels = batch["labels"]
    position_ids = batch.get("position_ids")
    with torch.no_grad():
        logits = ref_model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=position_ids, use_cache=False
        ).logits
        stats = token_statistics(logits, labels, top_k=top_k)
        shift = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        index = torch.nonzero(shift != IGNORE_INDEX).squeeze(1) + 1  # the label positions of the N tokens
        packed = position_ids is not None and batch.get("attention_mask") is None
        example = sequence_ids(position_ids.expand(labels.shape)).reshape(-1) if packed else None
        owner = example[index] if example is not None else index // labels.shape[1]  # (N,) example of each token
        groups = labels.numel() if example is not None else labels.shape[0]
        ce = stats.ce.detach()
        sums = torch.zeros(groups, device=ce.device).index_add_(0, owner, ce)
        counts = torch.zeros(groups, device=ce.device).index_add_(0, owner, torch.ones_like(ce))
        values = {"topk_entropy": stats.topk_entropy, "label_prob": stats.label_prob, "sample_ce": (sums / counts.clamp(min=1))[owner]}
        out = {}
        for name, value in values.items():
            flat = torch.full((labels.numel(),), float("nan"), device=labels.device)
            flat[index] = value.float()
            out[name] = flat.view(labels.shape)
    return out, logits


def token_kl(
    logits: Tensor, ref_logits: Tensor, labels: Tensor, direction: KLDirection = "policy_ref", ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Exact per-token KL divergence over the whole vocabulary between the current model and the
    frozen reference, at the supervised (label-shifted) positions, in the order of ``token_statistics``.

    ``direction="policy_ref"``: ``KL(p_theta || p_ref) = sum_v p_theta (log p_theta - log p_ref)`` (the
    reverse KL of RL-style regularisers; our SFT-KL). ``"ref_policy"``: ``KL(p_ref || p_theta)``
    (LLaMA-Factory's ASFT, ``F.kl_div(log p_theta, p_ref)``). Differentiable in ``logits``; copies the
    supervised rows of both logits to fp32, so use it on the plain path only.

    Returns:
        ``(N,)`` fp32 KL values in nats.
    """
    if direction not in ("policy_ref", "ref_policy"):
        raise ValueError(f"the KL direction must be 'policy_ref' or 'ref_policy', got {direction!r}")
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and reference logits {tuple(ref_logits.shape)} differ")
    vocab = logits.shape[-1]
    shift = F.pad(labels[..., 1:], (0, 1), value=ignore_index).reshape(-1)
    index = torch.nonzero(shift != ignore_index).squeeze(1)
    logp = torch.log_softmax(logits.reshape(-1, vocab)[index].float(), dim=-1)  # (N, V)
    logq = torch.log_softmax(ref_logits.reshape(-1, vocab)[index].detach().float(), dim=-1)  # (N, V)
    if direction == "policy_ref":
        return (logp.exp() * (logp - logq)).sum(-1)
    return (logq.exp() * (logq - logp)).sum(-1)

