"""The conflict cohort: where the gate reopens.

At the start of training (the base model) a fixed sample of the domain data is scored and its
supervised tokens are split in two cohorts: the **confident conflicts** (the base is sure of another
token) and the **rest**. During training the same tokens are scored again with the current model, and
for each cohort the callback logs what the gate would do to them now. Under EAFT the conflict
cohort's weight starts near 0; if it climbs while its label probability climbs, the gate has
reopened and the conflicts are being learned (the synthetic world's study 2). A static gate keeps
the cohort's weight where the base put it.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from eaft_pl.analysis.statistics import quantile_threshold
from eaft_pl.evaluation.periodic import PeriodicEvaluation
from eaft_pl.progress import progress, trainer_progress
from eaft_pl.training.lora import AdapterDisabled
from eaft_pl.loss.conflict import confident_conflict_mask
from eaft_pl.data.chat import batch_to, collate
from eaft_pl.training.sharded import gather_full_model, refuse_unsupported_sharding

__all__ = ["tied_quantile_threshold", "CohortThresholds", "cohort_means", "ConflictCohortCallback"]

COHORTS = ("conflict", "rest")


def tied_quantile_threshold(values: Tensor, q: float, tie_tolerance: float) -> float:
    """The q-quantile of ``values`` (the k-th smallest, k = ceil(q n)) raised to at least
    ``tie_tolerance``.

    With ``value <= threshold`` as the rule, every value within ``tie_tolerance`` of 0 counts as tied at
    the bottom and is selected together: when half of the tokens have entropy ~0, a plain bottom-15%
    cut takes an arbitrary 15% of those ties (in the synthetic world it kept 0.9% of the tokens, all one
    symbol, and missed the conflicts); this takes all of them, so the selected share can exceed q.
    """
    if values.numel() == 0 or q == 0:
        return tie_tolerance
    return max(quantile_threshold(values.cpu(), q), tie_tolerance)


@dataclass(frozen=True)
class CohortThresholds:
    """A token is a confident conflict when its normalised top-K entropy is at most
    ``max_norm_entropy`` and its label probability at most ``max_label_prob``."""

    max_norm_entropy: float
    max_label_prob: float

    def mask(self, norm_entropy: Tensor, label_prob: Tensor) -> Tensor:
        return confident_conflict_mask(norm_entropy, label_prob, self.max_norm_entropy, self.max_label_prob)


def cohort_means(conflict: Tensor, values: Dict[str, Tensor]) -> Dict[str, float]:
    """``cohort/<conflict|rest>/<name>`` means of each ``(N,)`` vector over the two cohorts given by
    the boolean ``conflict`` mask (NaN for an empty cohort), plus each cohort's token count."""
    out: Dict[str, float] = {}
    for cohort, member in (("conflict", conflict), ("rest", ~conflict)):
        n = int(member.sum())
        out[f"cohort/{cohort}/tokens"] = float(n)
        for name, value in values.items():
            out[f"cohort/{cohort}/{name}"] = float(value[member].double().mean()) if n else float("nan")
    return out


@contextmanager
def scoring_with(pl_module: Any, model: Any) -> Iterator[None]:
    """Let ``pl_module.token_stats`` run ``model`` (a gathered copy of ``pl_module.model``) in place of
    the module's own model, and the LoRA reference (the adapters switched off) on the copy too."""
    if model is pl_module.model:
        yield
        return
    own_model, own_frozen = pl_module.model, getattr(pl_module, "_frozen", None)
    pl_module.model = model
    if own_frozen and isinstance(own_frozen[0], AdapterDisabled):
        pl_module._frozen = [AdapterDisabled(model)]
    try:
        yield
    finally:
        pl_module.model = own_model
        if own_frozen is not None:
            pl_module._frozen = own_frozen


class ConflictCohortCallback(PeriodicEvaluation):
    """Tracks the base model's confident conflicts (and the other tokens) through training.

    At the start of training, before any optimizer step, ``sample_size`` examples of each of
    ``splits`` (a fixed random sample) are scored by the model, which is then the base, and each
    supervised token is put in the ``conflict`` or the ``rest`` cohort. Every ``every_n_steps``
    optimizer steps and at the end, the same tokens are scored by the current model and, per cohort,
    logged to every logger (MLflow: one curve per metric, the optimizer step on the x axis):

    - ``cohort/<c>/weight``: mean weight the run's gate gives those tokens now;
    - ``cohort/<c>/label_prob``: mean probability of the label;
    - ``cohort/<c>/norm_entropy``: mean normalised top-K entropy (EAFT's weight);
    - ``cohort/<c>/share_in_conflict``: share still a confident conflict under the thresholds fixed
      at the start;
    - ``cohort/<c>/tokens``: the cohort's size.

    The records are also kept in :attr:`history`, and the callback's own wall time in :attr:`seconds`
    (the README quotes it against the training time). Scoring runs on rank zero; under FSDP every rank
    first helps gather the full weights into a copy there (:func:`eaft_pl.training.sharded.gather_full_model`).

    Args:
        enabled: Set to false to switch the tracking off.
        sample_size: Examples drawn from each split (all of them when the split is smaller).
        splits: The DataModule's encoded splits to draw from (``train``, ``val`` = the first
            validation set, the domain one in the synthetic world).
        every_n_steps: Score the cohorts every this many optimizer steps (0: only start and end).
        rule: ``absolute`` uses the thresholds below (default: the module's ``conflict_max_*``);
            ``quantile`` uses the ``*_quantile`` of the sample's tokens at the start, with ties at 0
            (within ``tie_tolerance``) selected together (:func:`tied_quantile_threshold`).
        max_norm_entropy: Absolute "confident" threshold; ``None``: the module's.
        max_label_prob: Absolute "conflict" threshold; ``None``: the module's.
        entropy_quantile: Quantile rule: share of lowest-entropy tokens called confident.
        prob_quantile: Quantile rule: share of lowest-probability tokens called conflicting.
        tie_tolerance: Quantile rule: values at or below this count as tied at zero.
        seed: Seed of the sample.
    """

    def __init__(
        self,
        enabled: bool = True,
        sample_size: int = 64,
        splits: Sequence[str] = ("train", "val"),
        every_n_steps: int = 25,
        rule: Literal["absolute", "quantile"] = "absolute",
        max_norm_entropy: Optional[float] = None,
        max_label_prob: Optional[float] = None,
        entropy_quantile: float = 0.15,
        prob_quantile: float = 0.15,
        tie_tolerance: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps, key="cohort.every_n_steps")
        if sample_size < 1:
            raise ValueError(f"cohort.sample_size must be >= 1, got {sample_size}")
        if rule not in ("absolute", "quantile"):
            raise ValueError(f"cohort.rule must be 'absolute' or 'quantile', got {rule!r}")
        for name, q in (("entropy_quantile", entropy_quantile), ("prob_quantile", prob_quantile)):
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"cohort.{name} must lie in [0, 1], got {q!r}")
        if tie_tolerance < 0:
            raise ValueError(f"cohort.tie_tolerance must be >= 0, got {tie_tolerance!r}")
        self.enabled = enabled
        self.sample_size = sample_size
        self.splits = list(splits)
        self.rule = rule
        self.max_norm_entropy = max_norm_entropy
        self.max_label_prob = max_label_prob
        self.entropy_quantile = entropy_quantile
        self.prob_quantile = prob_quantile
        self.tie_tolerance = tie_tolerance
        self.seed = seed
        self.history: List[Dict[str, Any]] = []
        self.seconds = 0.0
        self.thresholds: Optional[CohortThresholds] = None
        self._batches: List[Dict[str, Tensor]] = []
        self._conflict: Optional[Tensor] = None

    # ---- the cohort --------------------------------------------------------------------------------

    def _sample(self, datamodule: Any) -> List[Any]:
        datasets = getattr(datamodule, "datasets", None) or {}
        missing = [s for s in self.splits if s not in datasets]
        if missing:
            raise ValueError(
                f"cohort.splits {missing} are not among the DataModule's splits {sorted(datasets)}; "
                "choose from those, or set cohort.enabled: false"
            )
        rng = random.Random(self.seed)
        examples = []
        for split in self.splits:
            pool = list(datasets[split])
            examples += pool if len(pool) <= self.sample_size else rng.sample(pool, self.sample_size)
        return examples

    def _score(self, pl_module: pl.LightningModule, progress_bar: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        """``(weight, label_prob, norm_entropy)`` of every cohort token under the current model."""
        was_training = pl_module.training
        pl_module.eval()
        parts: List[Tuple[Tensor, Tensor, Tensor]] = []
        try:
            with torch.no_grad():
                for batch in progress(self._batches, "conflict cohort", progress_bar, len(self._batches)):
                    batch = batch_to(batch, pl_module.device)
                    stats, weights, _ = pl_module.token_stats(batch)
                    parts.append((weights.float().cpu(), stats.label_prob.float().cpu(), stats.norm_entropy.float().cpu()))
        finally:
            pl_module.train(was_training)
        return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]

    def _fix_thresholds(self, pl_module: pl.LightningModule, label_prob: Tensor, norm_entropy: Tensor) -> CohortThresholds:
        if self.rule == "quantile":
            return CohortThresholds(
                tied_quantile_threshold(norm_entropy, self.entropy_quantile, self.tie_tolerance),
                tied_quantile_threshold(label_prob, self.prob_quantile, self.tie_tolerance),
            )
        hp = pl_module.hparams
        return CohortThresholds(
            self.max_norm_entropy if self.max_norm_entropy is not None else hp.conflict_max_norm_entropy,
            self.max_label_prob if self.max_label_prob is not None else hp.conflict_max_label_prob,
        )

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not self.enabled or not self._new_step(step):
            return
        start = time.perf_counter()
        model = gather_full_model(trainer.strategy, pl_module.model)  # every rank: a collective under FSDP
        if model is not None:
            with scoring_with(pl_module, model):
                weight, label_prob, norm_entropy = self._score(pl_module, trainer_progress(trainer))
            del model
            if self._conflict is None:  # the base: fix the thresholds and the cohorts once
                self.thresholds = self._fix_thresholds(pl_module, label_prob, norm_entropy)
                self._conflict = self.thresholds.mask(norm_entropy, label_prob)
            assert self.thresholds is not None
            in_conflict = self.thresholds.mask(norm_entropy, label_prob).float()
            metrics = cohort_means(
                self._conflict,
                {"weight": weight, "label_prob": label_prob, "norm_entropy": norm_entropy, "share_in_conflict": in_conflict},
            )
            self.seconds += time.perf_counter() - start
            self.history.append({"step": step, **metrics})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        trainer.strategy.barrier("cohort_eval")

    # ---- hooks ---------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        if not hasattr(pl_module, "token_stats"):
            raise ValueError(f"ConflictCohortCallback scores tokens with EAFTModule.token_stats; {type(pl_module).__name__} has none")
        refuse_unsupported_sharding(trainer.strategy, "ConflictCohortCallback")
        if trainer.global_step > 0:
            rank_zero_warn(
                f"ConflictCohortCallback: training resumes at step {trainer.global_step}, so the cohorts are fixed "
                "from the checkpoint, not from the base model"
            )
        datamodule = trainer.datamodule
        examples = self._sample(datamodule)
        pad = partial(collate, pad_token_id=datamodule.pad_token_id)
        size = getattr(datamodule, "eval_batch_size", 64)
        self._batches = [pad(examples[i : i + size]) for i in range(0, len(examples), size)]
        self.history, self.seconds, self._conflict, self._last_step = [], 0.0, None, None
        self._evaluate(trainer, pl_module)
