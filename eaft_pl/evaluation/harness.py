"""lm-evaluation-harness benchmarks (MMLU, IFEval, GSM8K, ARC, HellaSwag, ... or local task YAMLs)
scored on the model in memory during training: the general suite of a forgetting study.

The module is named ``harness`` so that it does not shadow the ``lm_eval`` package, which is imported
only when the callback is built: ``eaft_pl`` imports without it.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from importlib.metadata import version
from typing import Any, Dict, List, Optional, Tuple, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.seed import isolate_rng

from eaft_pl.evaluation.forgetting import forgetting
from eaft_pl.evaluation.harness_results import lower_is_better, primary_scores, safe_name, task_scores
from eaft_pl.evaluation.periodic import PeriodicEvaluation, kept_modes
from eaft_pl.progress import trainer_progress
from eaft_pl.training.sharded import gather_full_model
from eaft_pl.tracking import log_json, set_tags

__all__ = ["INSTALL_HINT", "LMEvalCallback", "import_harness", "quiet_requests", "scores_record"]

INSTALL_HINT = "pip install 'eaft-pl[lmeval]'"

# HFLM arguments the callback sets itself; `hflm_kwargs` may not override them.
_OWN_HFLM_ARGS = frozenset({"pretrained", "tokenizer", "batch_size", "max_length"})


def import_harness() -> Tuple[Any, Any, Any]:
    """``(simple_evaluate, HFLM, TaskManager)`` from lm-eval, or an ImportError that says what to
    install (HFLM also needs ``accelerate``, which the extra brings)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(
            f"LMEvalCallback needs lm-evaluation-harness and its Hugging Face backend, which could not be imported "
            f"({err}); install them with: {INSTALL_HINT}"
        ) from err
    return simple_evaluate, HFLM, TaskManager


#: The request types of lm-eval's model interface; HFLM draws a bar over each unless told not to.
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def quiet_requests(lm: Any) -> Any:
    """Turn off the progress bars ``lm`` (an lm-eval ``HFLM``) draws over the requests it scores:
    lm-eval's evaluator calls these methods without their ``disable_tqdm`` argument, so it is bound here."""
    for name in REQUEST_TYPES:
        setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))
    return lm


def scores_record(results: Dict[str, Any]) -> Dict[str, Any]:
    """What the callback keeps of one lm-eval results dict: every score of every task and group
    (``scores[task][metric]``, MLflow-safe names), whether lower is better for each, the primary
    metric of each requested benchmark and the suite average ``avg`` over the primaries where higher
    is better (None when there is none; perplexities are logged per task but not averaged with
    accuracies)."""
    scores: Dict[str, Dict[str, float]] = {}
    lower: Dict[str, Dict[str, bool]] = {}
    for task, entry in results["results"].items():
        parsed = task_scores(entry)
        if parsed:
            scores[safe_name(task)] = {name: value for name, (value, _) in parsed.items()}
            lower[safe_name(task)] = {name: lower_is_better(results, task, lm) for name, (_, lm) in parsed.items()}
    primary = {
        name: {"metric": metric, "value": value, "lower_is_better": low}
        for name, (metric, value, low) in primary_scores(results).items()
    }
    averaged = [p["value"] for p in primary.values() if not p["lower_is_better"]]
    return {
        "scores": scores,
        "lower_is_better": lower,
        "primary": primary,
        "avg": sum(averaged) / len(averaged) if averaged else None,
    }


class LMEvalCallback(PeriodicEvaluation):
    """Scores lm-evaluation-harness tasks on the model being trained, in memory, to measure forgetting.

    The tasks run through lm-eval's ``simple_evaluate`` on ``HFLM(pretrained=pl_module.model,
    tokenizer=pl_module.tokenizer)`` at the start of training (before any optimizer step: the base
    scores), every ``every_n_steps`` optimizer steps and at the end. The LightningModule must hold the
    Hugging Face model as ``model`` and its tokenizer as ``tokenizer`` (``EAFTModule`` does). Add it
    to a config under ``trainer.callbacks``::

        trainer:
          callbacks:
            - class_path: eaft_pl.evaluation.LMEvalCallback
              init_args: {tasks: [mmlu, ifeval], limit: 200, every_n_steps: 500, apply_chat_template: true}

    Logged with the optimizer step as the step (``<task>`` covers groups and their subtasks, so
    ``mmlu``, ``mmlu_humanities`` and ``mmlu_anatomy`` each get their own):

    - ``val/<suite>/<task>/<metric>``: every score; lm-eval's ``acc,none`` is logged as ``acc`` and
      ``exact_match,strict-match`` as ``exact_match_strict-match``; standard errors are not logged;
    - ``forgetting/<suite>/<task>/<metric>``: base minus current (current minus base where lower is
      better, e.g. perplexities); positive = forgot, 0 at the start;
    - ``val/<suite>/avg`` and ``forgetting/<suite>/avg``: the mean over the requested benchmarks
      (a group counts once) of their primary metric: ``acc_norm`` if the task reports it, else
      ``acc``, else lm-eval's first metric (IFEval: ``prompt_level_strict_acc``, GSM8K:
      ``exact_match_strict-match``); lower-is-better primaries are left out of the average.

    On the run (MLflow artifacts, or files in the ``log_dir`` of TensorBoard and CSV loggers):
    ``lm_eval/<suite>/step_<step>.json`` (lm-eval's full results dict of each evaluation, with task versions, n-shot, sample counts and task configs),
    ``lm_eval/<suite>/config.json`` (the options, package versions and primary metrics, once),
    ``lm_eval/<suite>/samples_step_<step>.json`` with ``log_samples``, and the tag
    ``lm_eval_version``. Everything is also kept in :attr:`history`.

    Evaluation runs on rank zero while the other ranks wait at a barrier (raise DDP's process-group
    timeout for long suites). Under FSDP every rank first helps gather the whole model into a copy
    on rank zero's device (:func:`eaft_pl.training.sharded.gather_full_model`), which lm-eval then scores;
    FSDP2 gathers the same way; DeepSpeed is refused. The
    model is given back in the train/eval mode each submodule had, the training tokenizer is left
    untouched (HFLM works on a copy), and the random state of Python, NumPy and torch is restored
    after lm-eval seeds it, so training goes on as it would have without the evaluation.

    Args:
        tasks: lm-eval task, group or tag names (``mmlu``, ``ifeval``, ``gsm8k``, ``arc_easy``,
            ``hellaswag``, ...) or names of tasks defined under ``include_path``.
        num_fewshot: Few-shot examples per prompt for every task (None: each task's own default;
            tasks whose config fixes 0 keep 0).
        limit: Documents per task: a count (``100``), or a fraction of each task below 1.0 (``0.1``);
            None: all. lm-eval's meaning; scores on a limit are for tracking, not for reporting.
        batch_size: Batch size of the lm-eval forward passes (an int, or ``auto``).
        every_n_steps: Evaluate every this many optimizer steps (0: only at the start and the end).
        include_path: Folder of local task YAMLs (e.g. ``dataset_path: json`` with
            ``dataset_kwargs.data_files``), added to lm-eval's task index.
        include_default_tasks: Index lm-eval's built-in tasks; False skips indexing them (faster and
            offline-safe when only ``include_path`` tasks are used).
        apply_chat_template: Render prompts with the tokenizer's chat template (instruct models).
        fewshot_as_multiturn: With ``apply_chat_template``, give few-shot examples as earlier turns.
        gen_kwargs: Generation arguments that update every generate_until task's own
            (``{max_gen_toks: 512, do_sample: false}``).
        max_length: Longest context in tokens (None: lm-eval takes it from the model config).
        suite: The suite name in the metric names (``val/<suite>/...``).
        bootstrap_iters: Bootstrap resamples for the standard errors (0: none, the fastest).
        seed: Seed of lm-eval's Python, NumPy, torch and few-shot sampling (None: lm-eval's defaults).
        log_samples: Also log every prompt, response and per-sample score as an artifact.
        hflm_kwargs: Further ``HFLM`` arguments (``think_end_token``, ``enable_thinking``,
            ``mixed_precision_dtype``, ``add_bos_token``, ...).
    """

    def __init__(
        self,
        tasks: List[str],
        num_fewshot: Optional[int] = None,
        limit: Optional[Union[int, float]] = None,
        batch_size: Union[int, str] = 8,
        every_n_steps: int = 0,
        include_path: Optional[str] = None,
        include_default_tasks: bool = True,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool = True,
        gen_kwargs: Optional[Dict[str, Any]] = None,
        max_length: Optional[int] = None,
        suite: str = "general",
        bootstrap_iters: int = 0,
        seed: Optional[int] = None,
        log_samples: bool = False,
        hflm_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(every_n_steps)
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"LMEvalCallback tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
        if not include_default_tasks and include_path is None:
            raise ValueError("LMEvalCallback include_default_tasks: false needs include_path (a folder of task YAMLs)")
        if include_path is not None and not os.path.isdir(include_path):
            raise ValueError(f"LMEvalCallback include_path {include_path!r} is not a folder")
        if limit is not None and limit <= 0:
            raise ValueError(f"LMEvalCallback limit must be > 0 (a count, or a fraction below 1.0), got {limit}")
        if bootstrap_iters < 0:
            raise ValueError(f"LMEvalCallback bootstrap_iters must be >= 0, got {bootstrap_iters}")
        if not suite or safe_name(suite) != suite:
            raise ValueError(f"LMEvalCallback suite must be a non-empty name of letters, digits, _ - and ., got {suite!r}")
        clash = _OWN_HFLM_ARGS & set(hflm_kwargs or {})
        if clash:
            raise ValueError(f"LMEvalCallback hflm_kwargs may not set {sorted(clash)}: use the callback's own options")
        import_harness()  # fail when the callback is configured, not after the model is loaded
        self.tasks = list(tasks)
        self.num_fewshot = num_fewshot
        self.limit = limit
        self.batch_size = batch_size
        self.include_path = include_path
        self.include_default_tasks = include_default_tasks
        self.apply_chat_template = apply_chat_template
        self.fewshot_as_multiturn = fewshot_as_multiturn
        self.gen_kwargs = dict(gen_kwargs) if gen_kwargs else None
        self.max_length = max_length
        self.suite = suite
        self.bootstrap_iters = bootstrap_iters
        self.seed = seed
        self.log_samples = log_samples
        self.hflm_kwargs = dict(hflm_kwargs or {})
        #: One record per evaluation: step, seconds, and :func:`scores_record` of lm-eval's results.
        self.history: List[Dict[str, Any]] = []
        self._task_manager: Any = None

    # ---- running lm-eval -----------------------------------------------------------------------

    def options(self) -> Dict[str, Any]:
        """The settings that decide the scores (logged in ``config.json``)."""
        names = ["tasks", "num_fewshot", "limit", "batch_size", "include_path", "include_default_tasks",
                 "apply_chat_template", "fewshot_as_multiturn", "gen_kwargs", "max_length", "bootstrap_iters",
                 "seed", "hflm_kwargs"]  # fmt: skip
        return {name: getattr(self, name) for name in names}

    def task_manager(self) -> Any:
        """lm-eval's task index over ``include_path`` (and the built-in tasks unless
        ``include_default_tasks`` is false), built once: indexing the built-in tasks takes seconds."""
        if self._task_manager is None:
            _, _, TaskManager = import_harness()
            self._task_manager = TaskManager(include_path=self.include_path, include_defaults=self.include_default_tasks)
        return self._task_manager

    def _seeds(self) -> Dict[str, int]:
        if self.seed is None:
            return {}
        return {key: self.seed for key in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")}

    def run(self, model: torch.nn.Module, tokenizer: Any, progress_bar: bool = True) -> Dict[str, Any]:
        """lm-eval's results dict for ``model`` as it is now; the model keeps its modes, the tokenizer
        and the global random state are left as they were. ``progress_bar=False`` turns off lm-eval's
        bars over the requests it scores (its short bar while it builds them stays)."""
        simple_evaluate, HFLM, _ = import_harness()
        task_manager = self.task_manager()
        with kept_modes(model), isolate_rng(), torch.no_grad():
            # HFLM sets the tokenizer's padding side per batch and may add a pad token: give it a copy.
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=self.batch_size,
                      max_length=self.max_length, **self.hflm_kwargs)  # fmt: skip
            if not progress_bar:
                quiet_requests(lm)
            return simple_evaluate(
                lm,
                tasks=list(self.tasks),
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                bootstrap_iters=self.bootstrap_iters,
                log_samples=self.log_samples,
                apply_chat_template=self.apply_chat_template,
                fewshot_as_multiturn=self.fewshot_as_multiturn and self.apply_chat_template,
                gen_kwargs=self.gen_kwargs,
                task_manager=task_manager,
                **self._seeds(),
            )

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not self._new_step(step):  # every rank keeps the counter, so every rank reaches the barrier
            return
        # Under FSDP every rank helps gather the whole model into a copy on rank zero; elsewhere this is
        # the training model itself on rank zero and None on the other ranks.
        model = gather_full_model(trainer.strategy, pl_module.model)
        if model is not None:
            start = time.perf_counter()
            results = self.run(model, pl_module.tokenizer, progress_bar=trainer_progress(trainer))
            del model  # the FSDP copy: free it before training goes on
            record = {"step": step, "seconds": time.perf_counter() - start, **scores_record(results)}
            self.history.append(record)
            self._log(trainer, record, results)
        trainer.strategy.barrier("lm_eval")

    # ---- logging -------------------------------------------------------------------------------

    def metrics(self, record: Dict[str, Any]) -> Dict[str, float]:
        """The metrics of one evaluation record, forgetting measured against the first record."""
        base, suite = self.history[0], self.suite
        out: Dict[str, float] = {}
        for task, values in record["scores"].items():
            for metric, value in values.items():
                out[f"val/{suite}/{task}/{metric}"] = value
                reference = base["scores"].get(task, {}).get(metric)
                if reference is not None:
                    low = record["lower_is_better"][task][metric]
                    out[f"forgetting/{suite}/{task}/{metric}"] = forgetting(reference, value, metric, low)
        if record["avg"] is not None:
            out[f"val/{suite}/avg"] = record["avg"]
            if base["avg"] is not None:
                out[f"forgetting/{suite}/avg"] = forgetting(base["avg"], record["avg"], "avg", False)
        return out

    def _log(self, trainer: pl.Trainer, record: Dict[str, Any], results: Dict[str, Any]) -> None:
        step = record["step"]
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics(record), step=step)
        from lm_eval.utils import handle_non_serializable

        samples = results.pop("samples", None)
        folder = f"lm_eval/{self.suite}"
        if len(self.history) == 1:
            log_json(trainer, self._config(results), f"{folder}/config.json", default=handle_non_serializable)
            set_tags(trainer, {"lm_eval_version": version("lm_eval")})
        step_record = {"step": step, "seconds": record["seconds"], "results": results}
        log_json(trainer, step_record, f"{folder}/step_{step:06d}.json", default=handle_non_serializable)
        if samples is not None:
            log_json(trainer, samples, f"{folder}/samples_step_{step:06d}.json", default=handle_non_serializable)

    def _config(self, results: Dict[str, Any]) -> Dict[str, Any]:
        """What a rerun needs besides the model: options, package versions, task versions and n-shot."""
        return {
            "options": self.options(),
            "packages": {name: version(name) for name in ("lm_eval", "transformers", "torch", "datasets")},
            "versions": results.get("versions"),
            "n-shot": results.get("n-shot"),
            "n-samples": results.get("n-samples"),
            "primary": {name: p["metric"] for name, p in self.history[0]["primary"].items()},
            "lm_eval_config": results.get("config"),
        }

    # ---- hooks ---------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_base_run(trainer)
        for attribute in ("model", "tokenizer"):
            if getattr(pl_module, attribute, None) is None:
                raise ValueError(
                    f"LMEvalCallback scores pl_module.{attribute} (a Hugging Face model and its tokenizer, as "
                    f"EAFTModule holds them); {type(pl_module).__name__} has none"
                )
        # Every rank checks the names, so a typo stops all of them instead of leaving the others at the barrier.
        known = set(self.task_manager().all_tasks)
        unknown = [name for name in self.tasks if name not in known]
        if unknown:
            where = f"include_path={self.include_path!r}, include_default_tasks={self.include_default_tasks}"
            raise ValueError(f"LMEvalCallback tasks: lm-eval knows no task, group or tag {unknown} ({where})")
        self.history = []
        self._last_step = None
        self._evaluate(trainer, pl_module)  # the base model: no optimizer step has run yet
