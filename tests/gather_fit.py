"""The rank-zero work of a fit (``SaveHFModel``, ``ForgettingCallback``, ``ConflictCohortCallback``,
``LMEvalCallback`` on a local lm-eval task)
recorded for the FSDP gather tests: a short fit of the tiny Llama, fully fine-tuned and with LoRA,
evaluated at every optimizer step and exported at the end.

Also a script: ``python tests/gather_fit.py OUT_DIR TOKENIZER_DIR TRAIN_FILE [fsdp|fsdp2]`` runs both fits
under :class:`~eaft_pl.training.strategies.DecoderLayerFSDPStrategy` (``fsdp``, the default) or
:class:`~eaft_pl.training.fsdp2.FSDP2Strategy` (``fsdp2``) on 2 CPU processes (one launch, two fits:
the process start-up is most of the cost).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_fit import RECORDS, InOrderData, recorded_fit  # noqa: E402
from eaft_pl.training.export import SaveHFModel  # noqa: E402
from eaft_pl.evaluation.cohort import ConflictCohortCallback  # noqa: E402
from eaft_pl.data.chat import Conversation  # noqa: E402
from eaft_pl.evaluation.forgetting import ForgettingCallback  # noqa: E402
from eaft_pl.evaluation.harness import LMEvalCallback  # noqa: E402
from eaft_pl.evaluation.tasks import PerplexityTask  # noqa: E402
from lm_eval_tasks import MC_YAML  # noqa: E402

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0}
VARIANTS: Dict[str, Optional[Dict[str, Any]]] = {"full": None, "lora": LORA}


def _conversations(records):
    return [Conversation([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]) for r in records]


class SuiteData(InOrderData):
    """The training chats plus two perplexity suites (a general one and the domain one)."""

    def evaluation_suites(self):
        return {
            "general": [PerplexityTask("first", _conversations(RECORDS[:4]))],
            "domain": [PerplexityTask("second", _conversations(RECORDS[4:]))],
        }


def _write_mc_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"question": r["prompt"], "choices": [r["response"], r["response"][::-1] + "x"], "label": 0} for r in RECORDS]
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "mc.yaml").write_text(MC_YAML.format(folder=folder))
    return folder


def gather_fit(out_dir: Path, tokenizer_dir: Path, train_file: Path, lora: Optional[Dict[str, Any]], **fit: Any) -> Dict[str, Any]:
    """Fit with the four rank-zero callbacks; the HF folder goes to ``out_dir/hf``. Returns (rank
    zero) the fit's record plus ``forgetting``, ``cohort`` and ``lm_eval``, the callbacks' histories."""
    out_dir.mkdir(parents=True, exist_ok=True)
    forgetting = ForgettingCallback(every_n_steps=1, batch_size=2)
    harness = LMEvalCallback(
        tasks=["tiny_mc"], include_path=str(_write_mc_task(out_dir / "tasks")), include_default_tasks=False, every_n_steps=1, batch_size=2
    )
    # The quantile rule: a random tiny model has no confident conflict by the absolute thresholds.
    cohort = ConflictCohortCallback(sample_size=4, splits=["train"], every_n_steps=1, rule="quantile", entropy_quantile=0.5, prob_quantile=0.5)
    export = SaveHFModel(str(out_dir / "hf"), save_adapter=lora is not None)
    record = recorded_fit(
        out_dir / "record.pt", tokenizer_dir, train_file, callbacks=[export, forgetting, cohort, harness], lora=lora, data_class=SuiteData, **fit
    )
    lm_eval = [{"step": h["step"], "scores": h["scores"]} for h in harness.history]
    return {**record, "forgetting": forgetting.history, "cohort": cohort.history, "lm_eval": lm_eval}


if __name__ == "__main__":  # the FSDP and FSDP2 runs of tests/test_sharded.py
    from eaft_pl.training.fsdp2 import FSDP2Strategy
    from eaft_pl.training.strategies import DecoderLayerFSDPStrategy

    # lm-eval appends torch's environment report (pip, nvidia-smi) to every result: seconds, no scores.
    import torch.utils.collect_env

    torch.utils.collect_env.get_pretty_env_info = lambda: "skipped in tests"

    out, tokenizer, train = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    for variant, options in VARIANTS.items():
        strategy = FSDP2Strategy() if sys.argv[4:] == ["fsdp2"] else DecoderLayerFSDPStrategy()
        result = gather_fit(out / variant, tokenizer, train, options, devices=2, strategy=strategy, micro_batch=2)
        if result:  # rank zero
            torch.save(result, out / variant / "result.pt")
