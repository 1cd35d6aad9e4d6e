"""The loss family as pure tensor functions: token statistics, gates, reduction, the chunked path.

Nothing here imports Lightning: plain training loops and other trainers use it on its own.

- :mod:`~eaft_pl.loss.stats`: per-token statistics of the supervised tokens and the reduction;
- :mod:`~eaft_pl.loss.gates`: gates computed from the model being trained (SFT, EAFT, ..., DFT);
- :mod:`~eaft_pl.loss.reference_gates`: gates computed from the base model (static EAFT, FLOW, ...);
- :mod:`~eaft_pl.loss.conflict`: the one confident-conflict rule and its thresholds;
- :mod:`~eaft_pl.loss.functional`: ``sft_loss``, ``eaft_loss``, ``dft_loss``, ``gated_loss``;
- :mod:`~eaft_pl.loss.chunked`: the same statistics from hidden states and the LM head, chunk by chunk;
- :mod:`~eaft_pl.loss.metrics`: torchmetrics ``Metric``\\ s over the statistics (imported on its own).
"""

from eaft_pl.loss.chunked import LogitTransform, chunked_gated_loss, chunked_token_statistics
from eaft_pl.loss.conflict import CONFLICT_MAX_LABEL_PROB, CONFLICT_MAX_NORM_ENTROPY, confident_conflict_mask
from eaft_pl.loss.functional import dft_loss, eaft_loss, gated_loss, sft_loss
from eaft_pl.loss.gates import ConflictMaskGate, DFTGate, EAFTGate, EntropyMaskGate, Gate, SFTGate, SigmoidGate
from eaft_pl.loss.reference_gates import EAFTStaticMaskGate, FLOWGate, StaticConflictMaskGate, StaticEAFTGate
from eaft_pl.loss.stats import IGNORE_INDEX, TokenStats, reduce_weighted, token_statistics

__all__ = [
    "CONFLICT_MAX_LABEL_PROB",
    "CONFLICT_MAX_NORM_ENTROPY",
    "IGNORE_INDEX",
    "ConflictMaskGate",
    "DFTGate",
    "EAFTGate",
    "EAFTStaticMaskGate",
    "EntropyMaskGate",
    "FLOWGate",
    "Gate",
    "LogitTransform",
    "SFTGate",
    "SigmoidGate",
    "StaticConflictMaskGate",
    "StaticEAFTGate",
    "TokenStats",
    "chunked_gated_loss",
    "chunked_token_statistics",
    "confident_conflict_mask",
    "dft_loss",
    "eaft_loss",
    "gated_loss",
    "reduce_weighted",
    "sft_loss",
    "token_statistics",
]
