"""The lm-evaluation-harness callback: local task YAMLs (offline) scored inside a real Trainer.fit and
compared with lm-eval's own simple_evaluate on the same weights; the metric names, the primary metric
and the suite average as pure functions; the errors a user can run into."""

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import MLFlowLogger

from conftest import REPO, TINY_LLAMA
from eaft_pl import ChatJsonlDataModule, EAFTModule
from eaft_pl.evaluation import ForgettingCallback, LMEvalCallback
from eaft_pl.evaluation.scores import forgetting
from eaft_pl.evaluation.harness import scores_record
from eaft_pl.evaluation.harness_results import (
    lower_is_better,
    metric_name,
    parse_metric_key,
    primary_metric,
    primary_scores,
    safe_name,
    task_scores,
    top_level,
)
from eaft_pl.loss.gates import SFTGate
from lm_eval_tasks import GEN_YAML, GROUP_YAML, MC_YAML

lm_eval = pytest.importorskip("lm_eval")  # the dev extra installs it; the package itself does not need it

SUMS = [(2, 2), (1, 3), (3, 1), (0, 4), (4, 0), (5, 1)]  # all make 4 except the last: a model can learn "4"

@pytest.fixture(autouse=True)
def no_environment_report(monkeypatch):
    """lm-eval appends torch's collect_env report (it runs pip and nvidia-smi) to every results dict:
    seconds per evaluation on a busy machine, nothing to do with the scores. Tests skip it."""
    monkeypatch.setattr("torch.utils.collect_env.get_pretty_env_info", lambda: "skipped in tests")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two local lm-eval tasks: multiple choice by log-likelihood, and generation with exact match."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    choices = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)], "label": 0} for a, b in SUMS]
    write_jsonl(folder / "mc.jsonl", choices)
    write_jsonl(folder / "gen.jsonl", [{"question": f"{a}+{b}", "answer": str(a + b)} for a, b in SUMS])
    (folder / "mc.yaml").write_text(MC_YAML.format(folder=folder))
    (folder / "gen.yaml").write_text(GEN_YAML.format(folder=folder))
    # A group with an aggregate score over two multiple-choice tasks (the shape of mmlu).
    (folder / "mc2.yaml").write_text(MC_YAML.format(folder=folder).replace("task: tiny_mc", "task: tiny_mc2"))
    (folder / "group.yaml").write_text(GROUP_YAML)
    return folder


# ---- pure functions -----------------------------------------------------------------------------


def test_metric_keys_become_mlflow_safe_names_without_stderr():
    assert parse_metric_key("acc,none") == ("acc", "none")
    assert parse_metric_key("exact_match,strict-match") == ("exact_match", "strict-match")
    assert parse_metric_key("acc_stderr,none") is None and parse_metric_key("alias") is None
    assert metric_name("acc", "none") == "acc"
    assert metric_name("exact_match", "strict-match") == "exact_match_strict-match"
    assert metric_name("exact_match", "flexible/extract v2") == "exact_match_flexible_extract_v2"
    assert safe_name("mmlu_abstract_algebra") == "mmlu_abstract_algebra" and safe_name("a/b:c") == "a_b_c"
    entry = {"alias": "gsm8k", "sample_len": 5, "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A",
             "exact_match,flexible-extract": 0.5, "acc_stderr,none": 0.1, "sample_count": {"acc,none": 4}}  # fmt: skip
    assert task_scores(entry) == {
        "exact_match_strict-match": (0.25, "exact_match"),
        "exact_match_flexible-extract": (0.5, "exact_match"),
    }


def test_primary_metric_prefers_acc_norm_then_acc_then_the_first():
    assert primary_metric(["acc", "acc_norm"]) == "acc_norm"
    assert primary_metric(["exact_match_strict-match", "acc"]) == "acc"
    assert primary_metric(["prompt_level_strict_acc", "inst_level_strict_acc"]) == "prompt_level_strict_acc"
    assert primary_metric([]) is None


def test_direction_from_the_results_table_else_from_the_known_names():
    results = {"higher_is_better": {"t": {"score": False, "acc": True}}}
    assert lower_is_better(results, "t", "score") and not lower_is_better(results, "t", "acc")
    assert lower_is_better(results, "wikitext", "word_perplexity") and not lower_is_better(results, "other", "f1")
    assert forgetting(0.6, 0.4, "acc") == pytest.approx(0.2)
    assert forgetting(10.0, 12.0, "word_perplexity") == pytest.approx(2.0)
    assert forgetting(10.0, 12.0, "score", lower_is_better=True) == pytest.approx(2.0)


def test_suite_average_counts_each_requested_benchmark_once():
    # The shape of lm-eval's results for [mmlu-like group with an aggregate, a group without one, a perplexity task].
    results = {
        "results": {
            "g": {"acc,none": 0.5, "acc_stderr,none": "N/A"}, "g_a": {"acc,none": 0.4}, "g_b": {"acc,none": 0.6},
            "plain": {"alias": "plain"}, "p_a": {"acc,none": 0.2, "acc_norm,none": 0.3}, "p_b": {"exact_match,strict-match": 0.5},
            "wiki": {"word_perplexity,none": 30.0, "bits_per_byte,none": 1.2},
        },
        "group_subtasks": {"g": ["g_a", "g_b"], "plain": ["p_a", "p_b"], "wiki": []},
        "higher_is_better": {"wiki": {"word_perplexity": False, "bits_per_byte": False}},
    }  # fmt: skip
    assert top_level(results) == ["g", "plain", "wiki"]
    assert primary_scores(results) == {
        "g": ("acc", 0.5, False),
        "plain": ("mean_of_members", pytest.approx(0.4), False),  # acc_norm of p_a, exact match of p_b
        "wiki": ("word_perplexity", 30.0, True),
    }
    record = scores_record(results)
    assert record["avg"] == pytest.approx((0.5 + 0.4) / 2)  # the perplexity is not averaged with accuracies
    assert "plain" not in record["scores"] and record["scores"]["p_a"] == {"acc": 0.2, "acc_norm": 0.3}
    assert record["lower_is_better"]["wiki"] == {"word_perplexity": True, "bits_per_byte": True}


# ---- configuration errors -----------------------------------------------------------------------


def test_missing_lm_eval_says_how_to_install(monkeypatch, task_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra sees
    with pytest.raises(ImportError, match=r"pip install 'eaft-pl\[lmeval\]'"):
        LMEvalCallback(tasks=["tiny_mc"], include_path=str(task_dir))


def test_bad_options_name_the_key(tmp_path, task_dir):
    with pytest.raises(ValueError, match="tasks"):
        LMEvalCallback(tasks=[])
    with pytest.raises(ValueError, match="include_path"):
        LMEvalCallback(tasks=["tiny_mc"], include_default_tasks=False)
    with pytest.raises(ValueError, match="include_path"):
        LMEvalCallback(tasks=["tiny_mc"], include_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="limit"):
        LMEvalCallback(tasks=["tiny_mc"], limit=0)
    with pytest.raises(ValueError, match="hflm_kwargs.*batch_size"):
        LMEvalCallback(tasks=["tiny_mc"], hflm_kwargs={"batch_size": 2})
    # Both rank-zero evaluators share the refusal of the sharded models the gather cannot serve
    # (PeriodicEvaluation._check_base_run); FSDP and FSDP2 are gathered (tests/test_sharded.py).
    for callback in (LMEvalCallback(tasks=["tiny_mc"], include_path=str(task_dir)), ForgettingCallback()):
        name = type(callback).__name__
        for strategy in ("DeepSpeedStrategy",):
            fake = SimpleNamespace(strategy=type(strategy, (), {})(), global_step=0)
            with pytest.raises(ValueError, match=f"{name} needs the whole model on rank zero and cannot gather it under {strategy}"):
                callback.on_train_start(fake, None)


def test_unknown_task_stops_training_before_it_starts(tmp_path, tokenizer_dir, task_dir):
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), gate=SFTGate())
    callback = LMEvalCallback(tasks=["tiny_mc", "tiny_mcq"], include_path=str(task_dir), include_default_tasks=False)
    with pytest.raises(ValueError, match=r"tasks: lm-eval knows no task.*\['tiny_mcq'\]"):
        make_trainer(tmp_path, [callback], steps=1).fit(module, datamodule=make_data(tmp_path, tokenizer_dir))


def test_cli_config_with_the_callback_parses(tmp_path, task_dir):
    from eaft_pl.cli import cli_main

    config = tmp_path / "lmeval.yaml"
    callback = {"class_path": "eaft_pl.evaluation.LMEvalCallback",
                "init_args": {"tasks": ["tiny_mc", "tiny_gen"], "limit": 4, "every_n_steps": 50, "include_path": str(task_dir),
                              "include_default_tasks": False, "gen_kwargs": {"max_gen_toks": 8}}}  # fmt: skip
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    cli = cli_main(["--config", str(REPO / "configs" / "setup" / "quickstart.yaml"), "--config", str(config)], run=False)
    (found,) = [c for c in cli.trainer.callbacks if isinstance(c, LMEvalCallback)]
    assert (found.tasks, found.limit, found.every_n_steps, found.gen_kwargs) == (["tiny_mc", "tiny_gen"], 4, 50, {"max_gen_toks": 8})


def test_a_group_counts_once_and_the_evaluation_leaves_model_tokenizer_and_rng_as_they_were(tokenizer_dir, task_dir):
    import random

    import numpy as np
    from transformers import AutoTokenizer

    from eaft_pl.models.loading import build_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "right"
    torch.manual_seed(0)
    model = build_causal_lm(TINY_LLAMA, tokenizer, None).train()
    def settings():
        return model.device, model.dtype, model.config.use_cache, model.generation_config.to_dict(), tokenizer.padding_side, len(tokenizer)

    before = settings()
    callback = LMEvalCallback(tasks=["tiny_group"], limit=3, include_path=str(task_dir), include_default_tasks=False, seed=7)

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    results = callback.run(model, tokenizer)
    assert draws() == expected  # lm-eval seeded the generators; training's random state is back
    assert all(m.training for m in model.modules())
    assert settings() == before
    assert results["config"]["fewshot_seed"] == 7

    record = scores_record(results)
    group = results["results"]["tiny_group"]["acc,none"]
    assert record["primary"] == {"tiny_group": {"metric": "acc", "value": group, "lower_is_better": False}}
    assert record["avg"] == group  # the group, not its two members, is the benchmark
    assert set(record["scores"]) == {"tiny_group", "tiny_mc", "tiny_mc2"}
    assert group == pytest.approx((record["scores"]["tiny_mc"]["acc"] + record["scores"]["tiny_mc2"]["acc"]) / 2)


# ---- a real run ---------------------------------------------------------------------------------


def make_data(tmp_path, tokenizer_dir):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in SUMS])
    return ChatJsonlDataModule(train_file=str(path), val_file=str(path), tokenizer_name_or_path=str(tokenizer_dir), batch_size=6)


def make_trainer(tmp_path, callbacks, steps, logger=False):
    return pl.Trainer(
        max_steps=steps, logger=logger, callbacks=callbacks, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(tmp_path),
    )  # fmt: skip


class ModeProbe(pl.Callback):
    """Records, at every training batch, the train/eval mode of every submodule, whether gradients are
    on, the tokenizer's settings and the model's device, dtype and generation settings."""

    def __init__(self):
        self.seen = []

    @staticmethod
    def state(module):
        model, tok = module.model, module.tokenizer
        return {
            "modes": [m.training for m in module.modules()],
            "grad": torch.is_grad_enabled(),
            "tokenizer": (tok.padding_side, tok.pad_token, len(tok)),
            "model": (model.device, model.dtype, model.config.use_cache, model.generation_config.to_dict()),
        }

    def on_train_start(self, trainer, module):
        self.start = self.state(module)

    def on_train_batch_start(self, trainer, module, *args):
        self.seen.append((trainer.global_step, self.state(module)))


def reference_scores(model, tokenizer, task_dir, limit):
    """lm-eval's own scores on ``model``, called directly as its documentation shows."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(lm, tasks=["tiny_mc", "tiny_gen"], task_manager=tm, limit=limit, bootstrap_iters=0, apply_chat_template=True)


@pytest.mark.filterwarnings("ignore:Found 1 module.*in eval mode")  # the norm, on purpose
def test_callback_scores_equal_lm_eval_on_the_same_weights_and_training_goes_on(tmp_path, tokenizer_dir, task_dir):
    pl.seed_everything(0)
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), gate=SFTGate(),
                        learning_rate=3e-2, warmup_ratio=0.0)  # fmt: skip
    module.configure_model()
    module.model.model.norm.eval()  # a submodule kept in eval mode on purpose must stay so
    base_state = copy.deepcopy(module.model.state_dict())
    callback = LMEvalCallback(tasks=["tiny_mc", "tiny_gen"], limit=5, batch_size=4, every_n_steps=2, include_path=str(task_dir),
                              include_default_tasks=False, apply_chat_template=True, log_samples=True)  # fmt: skip
    probe = ModeProbe()
    logger = MLFlowLogger(experiment_name="lmeval", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [probe, callback], steps=3, logger=logger)
    trainer.fit(module, datamodule=make_data(tmp_path, tokenizer_dir))

    # Evaluated before the first update, at the every-2 point and at the end (3, not an every-2 point).
    assert [r["step"] for r in callback.history] == [0, 2, 3]
    assert trainer.global_step == 3
    # Training went on after each evaluation with the modes, gradients, tokenizer and model it had.
    assert [step for step, _ in probe.seen] == [0, 1, 2]
    assert probe.start["modes"].count(False) == 1  # the norm alone is in eval mode
    for _, state in probe.seen:
        assert state == probe.start
    assert module.training and not module.model.model.norm.training

    client = logger.experiment
    names = [f"{task}/{m}" for task, ms in (("tiny_mc", ("acc", "acc_norm")), ("tiny_gen", ("exact_match_strict-match",))) for m in ms]
    logged = {}
    for name in [*names, "avg"]:
        for prefix in ("val", "forgetting"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(logger.run_id, f"{prefix}/general/{name}"))
            assert [step for step, _ in history] == [0, 2, 3], (prefix, name)
            logged[f"{prefix}/{name}"] = dict(history)
            if prefix == "val":
                assert all(0.0 <= v <= 1.0 for _, v in history)
            else:
                assert history[0][1] == 0.0  # no forgetting against itself
    metrics = client.get_run(logger.run_id).data.metrics
    assert not [k for k in metrics if "stderr" in k]
    expected = {f"{p}/general/{n}" for p in ("val", "forgetting") for n in [*names, "avg"]}
    assert {k for k in metrics if k.startswith(("val/general", "forgetting/general"))} == expected

    # The same scores as lm-eval itself gives on the base weights and on the final weights.
    limit = 5
    final_run = reference_scores(module.model, copy.deepcopy(module.tokenizer), task_dir, limit)
    module.model.load_state_dict(base_state)
    base, final = reference_scores(module.model, copy.deepcopy(module.tokenizer), task_dir, limit)["results"], final_run["results"]
    for step, ref in ((0, base), (3, final)):
        for name, (task, key) in {"tiny_mc/acc": ("tiny_mc", "acc,none"), "tiny_mc/acc_norm": ("tiny_mc", "acc_norm,none"),
                                  "tiny_gen/exact_match_strict-match": ("tiny_gen", "exact_match,strict-match")}.items():  # fmt: skip
            assert logged[f"val/{name}"][step] == pytest.approx(ref[task][key], abs=1e-12), (step, name)
            assert logged[f"forgetting/{name}"][step] == pytest.approx(base[task][key] - ref[task][key], abs=1e-12)
        avg = (ref["tiny_mc"]["acc_norm,none"] + ref["tiny_gen"]["exact_match,strict-match"]) / 2
        assert logged["val/avg"][step] == pytest.approx(avg, abs=1e-12)
    # Training changed the scores (otherwise the comparison above would say little).
    assert any(logged[f"val/{n}"][0] != logged[f"val/{n}"][3] for n in names)

    # The full results of each evaluation and a reproducibility record on the run.
    artifacts = {a.path for a in client.list_artifacts(logger.run_id, "lm_eval/general")}
    per_step = [f"lm_eval/general/{kind}_{s:06d}.json" for s in (0, 2, 3) for kind in ("step", "samples_step")]
    assert artifacts == {"lm_eval/general/config.json", *per_step}

    def artifact(name):
        return json.loads(Path(client.download_artifacts(logger.run_id, f"lm_eval/general/{name}", str(tmp_path))).read_text())

    config = artifact("config.json")
    assert config["versions"] == {"tiny_gen": 2.0, "tiny_mc": 1.0} and config["n-shot"] == {"tiny_gen": 0, "tiny_mc": 0}
    assert config["options"]["limit"] == 5 and config["packages"]["lm_eval"] == lm_eval.__version__
    assert config["primary"] == {"tiny_mc": "acc_norm", "tiny_gen": "exact_match_strict-match"}
    last = artifact("step_000003.json")
    assert last["step"] == 3 and last["results"]["results"]["tiny_mc"]["acc,none"] == logged["val/tiny_mc/acc"][3]
    assert client.get_run(logger.run_id).data.tags["lm_eval_version"] == lm_eval.__version__
    # log_samples: the very answers lm-eval generates on the final weights.
    def answers(samples):
        return [(s["doc_id"], s["resps"], s["filtered_resps"]) for s in samples["tiny_gen"]]

    logged_answers = answers(artifact("samples_step_000003.json"))
    assert len(logged_answers) == limit and logged_answers == answers(final_run["samples"])


class RankLog(LMEvalCallback):
    """Writes, on every rank, the steps at which this rank ran lm-eval, those it logged, and the last."""

    def run(self, model, tokenizer, **kwargs):
        import torch.utils.collect_env

        torch.utils.collect_env.get_pretty_env_info = lambda: "skipped in tests"  # in a spawned rank: no fixture here
        self.ran.append(self.trainer_step)
        return super().run(model, tokenizer, **kwargs)

    def _evaluate(self, trainer, pl_module):
        self.trainer_step = trainer.global_step
        super()._evaluate(trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        self.ran = []
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        out = {"ran": self.ran, "steps": [r["step"] for r in self.history], "final": trainer.global_step}
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_under_ddp_rank_zero_evaluates_and_the_other_rank_waits(tmp_path, tokenizer_dir, task_dir):
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), gate=SFTGate())
    callback = RankLog(tasks=["tiny_mc"], limit=2, include_path=str(task_dir), include_default_tasks=False)
    callback.out_dir = str(tmp_path)  # an instance attribute travels to the spawned ranks
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, datamodule=make_data(tmp_path, tokenizer_dir))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == {"ran": [0, 1], "steps": [0, 1], "final": 1}
    assert ranks[1] == {"ran": [], "steps": [], "final": 1}  # it waited at the barriers and trained on


def test_quiet_requests_binds_disable_tqdm_on_every_request_type():
    from eaft_pl.evaluation.harness import REQUEST_TYPES, quiet_requests

    class FakeLM:
        def __init__(self):
            self.calls = []

        def loglikelihood(self, requests, disable_tqdm=False):
            self.calls.append(("loglikelihood", disable_tqdm))

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            self.calls.append(("loglikelihood_rolling", disable_tqdm))

        def generate_until(self, requests, disable_tqdm=False):
            self.calls.append(("generate_until", disable_tqdm))

    lm = quiet_requests(FakeLM())
    for name in REQUEST_TYPES:
        getattr(lm, name)([])  # as lm-eval's evaluator calls them: requests only
    assert lm.calls == [(name, True) for name in REQUEST_TYPES]
