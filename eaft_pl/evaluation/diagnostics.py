"""Training diagnostics at every evaluation: CE of low- and high-entropy tokens (the paper's Fig. 4),
the (p, H) histogram and the gradient landscape (Fig. 1b, Fig. 3), logged to MLflow or
into the log folder of TensorBoard and CSV loggers."""

from __future__ import annotations

import math
from typing import Any, Dict, List

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from eaft_pl.analysis.statistics import PlaneAccumulator, PlaneGrid
from eaft_pl.tracking import log_figure, log_json

__all__ = ["DiagnosticsCallback"]


class DiagnosticsCallback(Callback):
    """Per-token diagnostics of every validation and test pass, per evaluation set.

    Logged as metrics (``<stage>/<name>/...``, e.g. ``val/domain/ce_high_entropy``), at each
    evaluation, over the supervised tokens of the whole set:

    - ``ce_low_entropy`` / ``ce_high_entropy``: unweighted CE of the tokens with top-K entropy at most
      ``low_entropy_max`` / at least ``high_entropy_min`` nats (Fig. 4), and ``share_low_entropy`` /
      ``share_high_entropy``, their share of the tokens; ``ce_conflict`` for the confident conflicts
      (the module's ``conflict_max_*`` thresholds);
    - ``grad_norm_<region>`` and ``grad_norm_weighted_<region>`` for the regions ``all``,
      ``conflict``, ``low_entropy``, ``high_entropy``: the mean norm of the CE gradient on the logits,
      ``||softmax(z) - onehot(y)||``, unweighted (what SFT would apply) and multiplied by the active
      gate's weight (what this run applies): a cheap proxy of Fig. 3's gradient magnitude.

    Logged as MLflow artifacts (files in the ``log_dir`` of other loggers) under
    ``diagnostics/<stage>_<name>/``: ``step_<N>.json`` (the (p, H) histogram, the per-bin mean gradient norms, the thresholds and the metrics) and, with
    ``figures: true``, ``step_<N>.png`` (token density and the weighted-gradient landscape).

    It switches on the module's ``eval_grad_norm`` (one more pass over the evaluation logits); the
    training steps are untouched. Its measured cost is in the README ("Seeing the conflicts").

    Args:
        enabled: Set to false to switch the diagnostics off.
        low_entropy_max: Tokens with top-K entropy at or below this many nats are "low entropy" (0.5
            in the paper's Fig. 4).
        high_entropy_min: Tokens at or above this many nats are "high entropy" (2.0 in Fig. 4; top-20
            entropy is at most ln 20 = 3.0).
        p_bins: Histogram bins of label probability on [0, 1].
        h_bins: Histogram bins of top-K entropy on [0, ln K].
        figures: Also render a PNG per evaluation and set (the JSON is always written).
    """

    def __init__(
        self,
        enabled: bool = True,
        low_entropy_max: float = 0.5,
        high_entropy_min: float = 2.0,
        p_bins: int = 20,
        h_bins: int = 20,
        figures: bool = True,
    ) -> None:
        if low_entropy_max > high_entropy_min:
            raise ValueError(
                f"diagnostics.low_entropy_max ({low_entropy_max}) must not exceed diagnostics.high_entropy_min ({high_entropy_min})"
            )
        if p_bins < 1 or h_bins < 1:
            raise ValueError(f"diagnostics.p_bins and diagnostics.h_bins must be >= 1, got {p_bins} and {h_bins}")
        self.enabled = enabled
        self.low_entropy_max = low_entropy_max
        self.high_entropy_min = high_entropy_min
        self.p_bins = p_bins
        self.h_bins = h_bins
        self.figures = figures
        self._acc: Dict[str, PlaneAccumulator] = {}
        #: One record per evaluation and set: ``{"stage", "name", "step", **PlaneAccumulator.summary()}``.
        self.history: List[Dict[str, Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        if not hasattr(pl_module, "eval_grad_norm"):
            raise ValueError(
                f"DiagnosticsCallback reads the token statistics of an EAFTModule; {type(pl_module).__name__} is "
                "not one. Set diagnostics.enabled: false"
            )
        pl_module.eval_grad_norm = True

    # ---- accumulation ----------------------------------------------------------------------------

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        stats, weights, name = outputs["stats"], outputs["weights"], outputs["name"]
        if stats.logit_grad_norm is None:
            raise ValueError("DiagnosticsCallback needs the logit-gradient norm: the module's eval_grad_norm was switched off")
        acc = self._acc.get(name)
        if acc is None:
            acc = self._acc[name] = PlaneAccumulator(
                PlaneGrid(math.log(stats.top_k), self.p_bins, self.h_bins),
                low_max=self.low_entropy_max,
                high_min=self.high_entropy_min,
                max_norm_entropy=pl_module.hparams.conflict_max_norm_entropy,
                max_label_prob=pl_module.hparams.conflict_max_label_prob,
            )
        acc.update(stats.label_prob, stats.topk_entropy, stats.norm_entropy, stats.ce, weights, stats.logit_grad_norm)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._update(trainer, pl_module, outputs)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._update(trainer, pl_module, outputs)

    # ---- reporting -------------------------------------------------------------------------------

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        accumulators, self._acc = self._acc, {}
        if not self.enabled or trainer.sanity_checking:
            return
        step = trainer.global_step
        # Sorted: under DDP every rank must reduce the same sets in the same order.
        for name in sorted(accumulators):
            acc = accumulators[name]
            if trainer.world_size > 1:
                flat = trainer.strategy.reduce(acc.state_tensor().to(pl_module.device), reduce_op="sum")
                acc.load_state_tensor(flat)
            metrics = acc.metrics()
            metrics.pop("share_conflict", None)  # the module logs it already, as conflict_share
            pl_module.log_dict({f"{stage}/{name}/{k}": v for k, v in metrics.items()}, add_dataloader_idx=False)
            record = {"stage": stage, "name": name, "step": step, **acc.summary()}
            self.history.append(record)
            if trainer.is_global_zero:
                self._log_artifacts(trainer, record, acc)

    def _log_artifacts(self, trainer: pl.Trainer, record: Dict[str, Any], acc: PlaneAccumulator) -> None:
        if not trainer.loggers:
            return
        stem = f"diagnostics/{record['stage']}_{record['name']}/step_{record['step']:06d}"
        log_json(trainer, record, f"{stem}.json")
        if self.figures:
            log_figure(trainer, self._figure(record, acc), f"{stem}.png")

    @staticmethod
    def _figure(record: Dict[str, Any], acc: PlaneAccumulator) -> Any:
        from eaft_pl.analysis.plots import plane_figure  # matplotlib only when a figure is drawn

        counts = [[c or None for c in row] for row in record["counts"]]
        return plane_figure(
            [
                ("tokens", counts, "tokens per bin", True),
                ("mean weighted gradient w·||softmax − onehot||", record["mean_grad_norm_weighted"], "mean w·g", False),
            ],
            record["p_edges"],
            record["h_edges"],
            title=f"{record['stage']}/{record['name']}, step {record['step']}",
            conflict_box=(acc.max_label_prob, acc.max_norm_entropy * acc.grid.h_max),
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, "test")

