"""``eaft-pl analyze``: where the training data falls in the (label probability, entropy) plane under
the base model, against the model's own responses to the same prompts (the paper's Fig. 1b).

    eaft-pl analyze --config configs/setup/toy_finetune.yaml --config configs/method/eaft.yaml [--max_examples 500]

It reads the same YAML configs as ``fit``: the model (before any training) and the DataModule's
training split. For every supervised token it computes the label probability p, the top-K entropy H
(and, on request, the full entropy) and the logit-gradient norm, and reports:

- the share of confident conflicts by quantile thresholds (bottom ``quantile`` of both H and p, tie
  rule in :mod:`eaft_pl.analysis.statistics`) and by the model's absolute thresholds;
- a (p, H) heatmap (``plane.png``), the gradient landscape of SFT against EAFT (``gradient.png``) and
  the distribution of EAFT weights (``weights.png``: how much of the SFT signal EAFT keeps);
- the most frequent confident-conflict tokens and the conversations holding most of them (the
  paper's word clouds, as tables);
- the same statistics for the model's own greedy or sampled answers to the same prompts.

Everything goes to an MLflow run (metrics ``analyze/<source>/...``, artifacts under ``analyze/``,
``summary.json`` among them) and the headline numbers are printed as a table.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import SaveConfigCallback
from torch import Tensor

from eaft_pl.data.chat import DataError, EncodedExample, batch_to, collate, pad_token_id, special_token_ids
from eaft_pl.analysis.statistics import PlaneAccumulator, PlaneGrid, conflict_shares, top_counts, weight_summary
from eaft_pl.fileio import atomic_write
from eaft_pl.loss.stats import IGNORE_INDEX, token_statistics
from eaft_pl.loss.conflict import confident_conflict_mask
from eaft_pl.progress import progress as with_progress  # the functions below take a `progress` flag
from eaft_pl.tracking import log_files, mlflow_loggers, run_tags, set_tags

__all__ = ["run_analysis", "TokenTable", "score_examples", "on_policy_examples", "summarise_tokens", "format_summary"]


@dataclass
class TokenTable:
    """Per-token statistics of one pass, all ``(N,)`` CPU tensors in example order.

    Attributes:
        label_prob: Probability of the label.
        topk_entropy: Top-K entropy (nats).
        norm_entropy: ``topk_entropy / ln K``, EAFT's weight.
        ce: Cross-entropy (nats).
        gate_weight: Weight of the model's configured gate.
        grad_norm: ``||softmax(z) - onehot(y)||``, the unweighted CE gradient norm on the logits.
        token_id: The label token.
        example: Index of the token's example in the scored list.
        top_k: The K of the entropy.
        full_entropy: Full-vocabulary entropy (nats), or None when not computed.
    """

    label_prob: Tensor
    topk_entropy: Tensor
    norm_entropy: Tensor
    ce: Tensor
    gate_weight: Tensor
    grad_norm: Tensor
    token_id: Tensor
    example: Tensor
    top_k: int
    full_entropy: Optional[Tensor] = None


@torch.no_grad()
def score_examples(
    module: Any,
    examples: List[EncodedExample],
    *,
    batch_size: int,
    device: torch.device,
    full_entropy: bool = False,
    forward_context: Any = None,
    progress: bool = False,
    desc: str = "scoring",
) -> TokenTable:
    """Run ``module`` (an :class:`~eaft_pl.EAFTModule` with its model built) over ``examples`` and
    return the statistics of every supervised token."""
    pad = pad_token_id(module.tokenizer)
    parts: Dict[str, List[Tensor]] = {}
    top_k = module.hparams.top_k
    starts = range(0, len(examples), batch_size)
    for start in with_progress(starts, desc, progress, len(starts)):
        batch = batch_to(collate(examples[start : start + batch_size], pad), device)
        if forward_context is None:
            logits = module(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
        else:
            with forward_context():
                logits = module(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
        stats = token_statistics(
            logits,
            batch["labels"],
            top_k=module.hparams.top_k,
            compute_full_entropy=full_entropy or module.gate.needs_full_entropy,
            compute_grad_norm=True,
        )
        top_k = stats.top_k
        labels = batch["labels"][:, 1:]  # (B, T-1): the positions token_statistics kept, in this order
        mask = labels != IGNORE_INDEX
        columns = {
            "label_prob": stats.label_prob,
            "topk_entropy": stats.topk_entropy,
            "norm_entropy": stats.norm_entropy,
            "ce": stats.ce.detach(),
            "gate_weight": module.gate(stats),
            "grad_norm": stats.logit_grad_norm,
            "token_id": labels[mask],
            "example": torch.nonzero(mask, as_tuple=True)[0] + start,
        }
        if full_entropy:
            columns["full_entropy"] = stats.full_entropy
        for key, value in columns.items():
            parts.setdefault(key, []).append(value.detach().cpu())
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return TokenTable(**cat, top_k=top_k)  # type: ignore[arg-type]


@torch.no_grad()
def on_policy_examples(
    module: Any,
    examples: List[EncodedExample],
    *,
    mode: Literal["greedy", "sample"],
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    progress: bool = False,
    max_length: Optional[int] = None,
) -> List[EncodedExample]:
    """The model's own answers to the prompts of ``examples``: each prompt is the conversation up to
    its first supervised (assistant) token; the answer runs to the end-of-turn token (kept, as the
    data's answers keep it; see :func:`stop_token_ids`), ``max_new_tokens`` or, when given, until the
    batch's longest prompt plus the answer reach ``max_length``. Returns examples whose labels are the
    answer (empty answers are left out)."""
    tok = module.tokenizer
    pad = pad_token_id(tok)
    stops = stop_token_ids(tok, examples)
    stop_set = set(stops)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out: List[EncodedExample] = []
    starts = range(0, len(examples), batch_size)
    for start in with_progress(starts, f"{mode} answers", progress, len(starts)):
        chunk = examples[start : start + batch_size]
        prompts = [ex.input_ids[: next(i for i, y in enumerate(ex.labels) if y != IGNORE_INDEX)] for ex in chunk]
        length = max(map(len, prompts))
        # Left padding: every prompt ends where its answer starts.
        ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
        kwargs: Dict[str, Any] = {"do_sample": False}
        if mode == "sample":
            # Plain sampling from the model's distribution: no top-k/top-p truncation.
            kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        budget = max_new_tokens if max_length is None else max(1, min(max_new_tokens, max_length - length))
        generated = module.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=budget, pad_token_id=pad, eos_token_id=stops, **kwargs
        )
        for ex, prompt, row in zip(chunk, prompts, generated[:, length:].tolist()):
            end = next((i for i, t in enumerate(row) if t in stop_set), None)
            answer = row if end is None else row[: end + 1]
            if not answer:
                continue
            out.append(EncodedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, ex.source))
    return out


def stop_token_ids(tokenizer: Any, examples: List[EncodedExample]) -> List[int]:
    """The tokens that end a generated answer: ``eos`` and the chat template's end-of-turn token(s),
    i.e. the special tokens (pad excepted) that the data's supervised answers contain, such as
    ``<|im_end|>`` or ``<|eot_id|>``. Many chat models' eos (``<|endoftext|>``) is not the token that
    ends an assistant turn, so stopping at eos alone would run every answer on into a new turn."""
    special = special_token_ids(tokenizer) - {pad_token_id(tokenizer)}
    ids = {y for ex in examples for y in ex.labels if y != IGNORE_INDEX and y in special}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(
            "the tokenizer has no eos_token_id and the data's answers hold no special end-of-turn token, "
            "so generated answers cannot be ended; set an eos token"
        )
    return sorted(ids)


def summarise_tokens(
    table: TokenTable,
    *,
    quantile: float,
    max_norm_entropy: float,
    max_label_prob: float,
    accumulator: PlaneAccumulator,
    gate_name: str,
) -> Dict[str, Any]:
    """Headline statistics of one pass: means, conflict shares, weight distributions, the
    diagnostics' region metrics (CE and gradient norms of low/high-entropy and conflict tokens)."""
    accumulator.update(table.label_prob, table.topk_entropy, table.norm_entropy, table.ce, table.norm_entropy, table.grad_norm)
    weights = {"eaft": weight_summary(table.norm_entropy, table.ce)}
    if gate_name != "eaft":
        weights[gate_name] = weight_summary(table.gate_weight, table.ce)
    out: Dict[str, Any] = {
        "tokens": int(table.ce.numel()),
        "examples": int(table.example.unique().numel()),
        "label_prob": float(table.label_prob.double().mean()),
        "topk_entropy": float(table.topk_entropy.double().mean()),
        "ce": float(table.ce.double().mean()),
        "conflicts": conflict_shares(
            table.label_prob, table.norm_entropy, quantile=quantile, max_norm_entropy=max_norm_entropy, max_label_prob=max_label_prob
        ),
        "weights": weights,
        # Region metrics with the EAFT weight: grad_norm_eaft_* is the gradient EAFT would apply (named
        # apart from the training callback's grad_norm_weighted_*, which uses the run's active gate).
        "regions": {k.replace("grad_norm_weighted_", "grad_norm_eaft_"): v for k, v in accumulator.metrics().items()},
    }
    if table.full_entropy is not None:
        h_full = table.full_entropy.double()
        pearson = torch.corrcoef(torch.stack([h_full, table.topk_entropy.double()]))[0, 1]
        out["full_entropy"] = {"mean": float(h_full.mean()), "pearson_with_topk": float(pearson)}
    return out


def _table(rows: List[List[str]], head: List[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_summary(summary: Dict[str, Any]) -> str:
    """The printed report: one row per source, then the top conflict tokens and conversations."""
    head = ["source", "tokens", "mean p", "mean H", "conflicts (quantile)", "conflicts (absolute)", "mean EAFT weight", "SFT loss kept by EAFT"]
    rows = []
    for source in ("sft_data", "on_policy"):
        s = summary.get(source)
        if not s:
            continue
        c, w = s["conflicts"], s["weights"]["eaft"]
        rows.append([
            source, str(s["tokens"]), f"{s['label_prob']:.3f}", f"{s['topk_entropy']:.3f}",
            f"{c['quantile_share']:.1%}", f"{c['absolute_share']:.1%}", f"{w['mean']:.3f}", f"{w['ce_kept']:.1%}",
        ])  # fmt: skip
    parts = [_table(rows, head)]
    if summary["top_conflict_tokens"]:
        parts.append(_table(
            [[repr(t["token"]), str(t["conflicts"]), str(t["occurrences"]), f"{t['share_of_conflicts']:.1%}"] for t in summary["top_conflict_tokens"][:10]],
            ["confident-conflict token", "conflicts", "occurrences", "share of all conflicts"],
        ))  # fmt: skip
    if summary["top_conflict_conversations"]:
        parts.append(_table(
            [[c["source"], str(c["conflicts"]), str(c["tokens"]), _cell(c["answer"])] for c in summary["top_conflict_conversations"][:5]],
            ["conversation", "conflicts", "answer tokens", "answer"],
        ))  # fmt: skip
    return "\n\n".join(parts)


def _cell(text: str, width: int = 60) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def run_analysis(trainer: Trainer, model: Any, datamodule: Any, **options: Any) -> Dict[str, Any]:
    """The ``analyze`` subcommand (its options are documented on :meth:`eaft_pl.cli.EAFTTrainer.analyze`):
    statistics of ``datamodule``'s ``split`` under ``model`` before training, printed, logged to the
    trainer's loggers (MLflow artifacts, or files in a TensorBoard or CSV ``log_dir``) and written to
    ``output_dir``. The run ends FAILED if anything raises."""
    quantile, max_examples = options["quantile"], options["max_examples"]
    if not 0 < quantile <= 1:
        raise ValueError(f"analyze: quantile must lie in (0, 1], got {quantile}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"analyze: max_examples must be >= 1 or null, got {max_examples}")
    for logger in mlflow_loggers(trainer):
        logger.experiment  # noqa: B018 (creates the run now, so its duration is the analysis')
    try:
        return _analyze(trainer, model, datamodule, **options)
    except BaseException:
        # Never leave the run RUNNING: it ends FAILED and the error propagates.
        for logger in mlflow_loggers(trainer):
            logger.finalize("failed")
        raise


def _analyze(
    trainer: Trainer, model: Any, datamodule: Any, split: str, max_examples: Optional[int], seed: int, batch_size: Optional[int],
    on_policy: str, max_new_tokens: int, temperature: float, quantile: float, low_entropy_max: float,
    high_entropy_min: float, full_entropy: bool, bins: int, top: int, output_dir: Optional[str], progress_bar: bool,
) -> Dict[str, Any]:
    examples = analysis_examples(datamodule, split, max_examples, seed)
    model.configure_model()
    device = trainer.strategy.root_device
    model.to(device).eval()
    hp = model.hparams
    bs = batch_size or datamodule.eval_batch_size
    ctx = trainer.precision_plugin.forward_context
    tables = {"sft_data": score_examples(
        model, examples, batch_size=bs, device=device, full_entropy=full_entropy, forward_context=ctx,
        progress=progress_bar, desc=f"scoring {split}",
    )}  # fmt: skip
    answers: List[EncodedExample] = []
    if on_policy != "none":
        answers = on_policy_examples(
            model, examples, mode=on_policy, max_new_tokens=max_new_tokens, temperature=temperature,
            batch_size=bs, device=device, seed=seed, progress=progress_bar, max_length=datamodule.max_length,
        )  # fmt: skip
        if answers:
            tables["on_policy"] = score_examples(
                model, answers, batch_size=bs, device=device, full_entropy=full_entropy, forward_context=ctx,
                progress=progress_bar, desc="scoring answers",
            )  # fmt: skip
    top_k = tables["sft_data"].top_k
    accumulators = {
        name: PlaneAccumulator(
            PlaneGrid(math.log(top_k), bins, bins), low_max=low_entropy_max, high_min=high_entropy_min,
            max_norm_entropy=hp.conflict_max_norm_entropy, max_label_prob=hp.conflict_max_label_prob,
        )
        for name in tables
    }  # fmt: skip
    summary: Dict[str, Any] = {
        "split": split,
        "examples_analysed": len(examples),
        "on_policy_mode": on_policy,
        "top_k": top_k,
        "quantile": quantile,
        "gate": repr(model.gate),
    }
    for name, table in tables.items():
        summary[name] = summarise_tokens(
            table, quantile=quantile, max_norm_entropy=hp.conflict_max_norm_entropy,
            max_label_prob=hp.conflict_max_label_prob, accumulator=accumulators[name], gate_name=model.gate.name,
        )  # fmt: skip
        summary[name]["plane"] = accumulators[name].summary()
    summary.update(conflict_tables(model, examples, tables["sft_data"], top))
    print(format_summary(summary))
    log_analysis(trainer, model, datamodule, summary, accumulators, output_dir)
    return summary


def analysis_examples(datamodule: Any, split: str, max_examples: Optional[int], seed: int) -> List[EncodedExample]:
    datamodule.prepare_data()
    # "fit" loads train and validation splits; None loads every split the DataModule has, skipping
    # missing ones, so that a missing split gets the message below.
    datamodule.setup("fit" if split == "train" or split.startswith("val") else None)
    if split not in datamodule.datasets:
        raise DataError(
            f"analyze: the DataModule {type(datamodule).__name__} has no {split!r} split "
            f"(it has {sorted(datamodule.datasets)}); set --split"
        )
    examples = list(datamodule.datasets[split])
    if max_examples is not None and max_examples < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
        examples = [examples[i] for i in keep]
    return examples

def conflict_tables(model: Any, examples: List[EncodedExample], table: TokenTable, top: int) -> Dict[str, Any]:
    hp = model.hparams
    flags = confident_conflict_mask(table.norm_entropy, table.label_prob, hp.conflict_max_norm_entropy, hp.conflict_max_label_prob)
    total = max(int(flags.sum()), 1)
    tok = model.tokenizer
    tokens = [
        {
            "token": tok.convert_ids_to_tokens(r["key"]),
            "token_id": r["key"],
            "conflicts": r["flagged"],
            "occurrences": r["total"],
            "share_of_conflicts": r["flagged"] / total,
        }
        for r in top_counts(table.token_id, flags, top)
    ]
    conversations = []
    for r in top_counts(table.example, flags, top):
        ex = examples[r["key"]]
        answer = [t for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE_INDEX]
        conversations.append({
            "source": ex.source, "conflicts": r["flagged"], "tokens": r["total"],
            "share": r["flagged"] / r["total"], "answer": tok.decode(answer),
        })  # fmt: skip
    return {"top_conflict_tokens": tokens, "top_conflict_conversations": conversations}

def log_analysis(
    trainer: Trainer, model: Any, datamodule: Any, summary: Dict[str, Any], accumulators: Dict[str, PlaneAccumulator], output_dir: Optional[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(output_dir) if output_dir else Path(tmp)
        write_artifacts(summary, accumulators, folder)
        for callback in trainer.callbacks:
            if isinstance(callback, SaveConfigCallback):
                callback.setup(trainer, model, "analyze")  # the config artifact, as `fit` logs it
        set_tags(trainer, run_tags(model, datamodule, "analyze"))
        log_files(trainer, folder, "analyze")
        for logger in trainer.loggers:
            logger.log_metrics(analysis_metrics(summary), step=0)
            logger.finalize("success")


def analysis_metrics(summary: Dict[str, Any]) -> Dict[str, float]:
    """The scalars of an analysis summary as MLflow metrics ``analyze/<source>/<name>``."""
    out: Dict[str, float] = {}
    for source in ("sft_data", "on_policy"):
        s = summary.get(source)
        if not s:
            continue
        values = {
            "tokens": s["tokens"], "label_prob": s["label_prob"], "topk_entropy": s["topk_entropy"], "ce": s["ce"],
            "conflict_share_quantile": s["conflicts"]["quantile_share"],
            "conflict_share_absolute": s["conflicts"]["absolute_share"],
            "eaft_weight_mean": s["weights"]["eaft"]["mean"], "eaft_ce_kept": s["weights"]["eaft"]["ce_kept"],
            **s["regions"],
        }  # fmt: skip
        out.update({f"analyze/{source}/{k}": float(v) for k, v in values.items()})
    return out


def write_artifacts(summary: Dict[str, Any], accumulators: Dict[str, PlaneAccumulator], folder: Path) -> None:
    """Write ``summary.json``, ``report.md`` and the figures (``plane.png``, ``gradient.png``,
    ``weights.png``) of an analysis to ``folder``."""
    from eaft_pl.analysis.plots import plane_figure, save_figure, weights_figure

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    atomic_write(folder / "report.md", lambda p: p.write_text(format_summary(summary) + "\n"))
    data = accumulators["sft_data"]
    box = (data.max_label_prob, data.max_norm_entropy * data.grid.h_max)
    panels = []
    for name, acc in accumulators.items():
        counts = acc.sums["counts"]
        share = (counts / counts.sum().clamp(min=1)).tolist()
        panels.append((f"{name} ({int(counts.sum())} tokens)", share, "share of tokens", True))
    plane = plane_figure(panels, data.grid.p_edges, data.grid.h_edges, title="Tokens on the (p, H) plane under the model", conflict_box=box)
    atomic_write(folder / "plane.png", lambda p: save_figure(plane, p))
    record = data.summary()
    gradient = plane_figure(
            [
                ("SFT: mean ||softmax − onehot||", record["mean_grad_norm"], "mean g", False),
                ("EAFT: mean (H / ln K)·||softmax − onehot||", record["mean_grad_norm_weighted"], "mean w·g", False),
            ],
            data.grid.p_edges, data.grid.h_edges, title="Gradient on the logits over the (p, H) plane (sft_data)", conflict_box=box,
    )  # fmt: skip
    atomic_write(folder / "gradient.png", lambda p: save_figure(gradient, p))
    weights = {name: summary[name]["weights"]["eaft"] for name in accumulators}
    figure = weights_figure(weights)
    atomic_write(folder / "weights.png", lambda p: save_figure(figure, p))

