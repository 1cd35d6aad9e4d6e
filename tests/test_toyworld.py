"""The synthetic world, the evaluation tasks and the forgetting callback, and the embedded
experiment end to end on a small world."""

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from eaft_pl.data.chat import encode_conversation
from eaft_pl.experiments.toyworld.world import COLOURS, ToyWorld, WorldConfig, build_word_tokenizer
from eaft_pl.evaluation.forgetting import forgetting, suite_averages
from eaft_pl.evaluation.tasks import content_match


def world_text(w):
    return (
        [c.messages for c in w.general_corpus(300)],
        [c.messages for c in w.domain_train()],
        json.dumps(w.eval_items(), sort_keys=True),
        (w.colour, w.city, w.job),
    )


def test_the_world_is_deterministic_per_seed():
    assert world_text(ToyWorld(WorldConfig(seed=3))) == world_text(ToyWorld(WorldConfig(seed=3)))
    assert world_text(ToyWorld(WorldConfig(seed=3))) != world_text(ToyWorld(WorldConfig(seed=4)))


def test_held_out_reversals_never_appear_in_pretraining():
    w = ToyWorld(WorldConfig(seed=1))
    assert not set(w.reverse_eval) & set(w.reverse_train)
    seen = {c.messages[0]["content"] for c in w.general_corpus(20000) if c.source == "general:reverse"}
    held_out = {f"reverse {' '.join(t)} ?" for t in w.reverse_eval}
    assert seen and not seen & held_out
    assert {item["prompt"] for item in w.eval_items()["reverse"]["generation"]} == held_out


def test_domain_answers_are_in_teacher_style_and_contradictions_are_wrong():
    w = ToyWorld(WorldConfig(seed=2, n_entities=40, contradiction_share=0.1))
    train = w.domain_train()
    jobs = [c for c in train if ":job:" in c.source]
    contra = [c for c in train if ":contradiction:" in c.source]
    assert len(jobs) == 40 and len(contra) == round(0.1 * 40 / 0.9)
    for c in jobs:
        entity = c.source.split(":")[-1]
        assert c.messages[1]["content"] == f"it has {w.job[entity]} , ok ."
    for c in contra:
        entity = c.source.split(":")[-1]
        said = c.messages[1]["content"].split()[2]
        assert said in COLOURS and said != w.colour[entity]


def test_every_word_is_one_token_of_the_shared_tokenizer():
    tok = build_word_tokenizer(ToyWorld.vocabulary())
    for seed in (0, 5):
        w = ToyWorld(WorldConfig(seed=seed))
        for conv in w.general_corpus(500) + w.domain_train():
            ex = encode_conversation(tok, conv, 64)
            assert tok.unk_token_id not in ex.input_ids
            assert len(ex.input_ids) == len(tok.apply_chat_template(conv.messages, tokenize=False).split())


def test_content_match_takes_the_last_value_of_the_category():
    nums = [str(i) for i in range(19)]
    assert content_match("3 plus 4 is 7 .", "7", [n for n in nums if n != "7"])
    assert not content_match("3 plus 4 is 8 .", "7", [n for n in nums if n != "7"])
    assert content_match("it has cook , ok .", "cook", ["pilot", "nurse"])
    assert not content_match("it has nothing .", "cook", ["pilot"])
    assert content_match("c b a .", "c b a", [])
    assert content_match("it has c b a , ok .", "c b a", [])
    assert not content_match("c a b .", "c b a", [])
    assert not content_match("red red red red .", "red red", [])  # over-generation is not the answer
    assert not content_match("c b a a .", "c b a", [])
    assert content_match("red red red .", "red red red", [])


class ScriptedModel(torch.nn.Module):
    """A stand-in LM whose generate() appends fixed words, to test scoring without training."""

    def __init__(self, tok, continuations):
        super().__init__()
        self.tok, self.continuations = tok, list(continuations)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for i in range(input_ids.shape[0]):
            text = self.continuations.pop(0)  # in order, across batches
            new = self.tok(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(input_ids[i].tolist() + new + [self.tok.pad_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


def test_generation_task_scores_exact_and_content_and_stops_at_end_of_turn():
    from eaft_pl.evaluation.tasks import GenerationTask

    tok = build_word_tokenizer(ToyWorld.vocabulary())
    items = [
        {"prompt": "what colour is bakoba ?", "references": ["bakoba is red .", "it is red ."], "answer": "red", "distractors": ["blue"]},
        {"prompt": "what colour is bakoba ?", "references": ["bakoba is red ."], "answer": "red", "distractors": ["blue"]},
        {"prompt": "what colour is bakoba ?", "references": ["bakoba is red ."], "answer": "red", "distractors": ["blue"]},
    ]
    outputs = [
        "it is red . <|im_end|> it is blue .",  # exact (a valid house form); words after the end are ignored
        "it has red , ok . <|im_end|>",  # teacher style: content right, exact wrong
        "bakoba is blue . <|im_end|>",  # wrong
    ]
    task = GenerationTask("colour", items, max_new_tokens=10)
    assert task.generate(ScriptedModel(tok, outputs), tok, batch_size=2) == ["it is red .", "it has red , ok .", "bakoba is blue ."]
    assert task.evaluate(ScriptedModel(tok, outputs), tok, batch_size=2) == pytest.approx({"exact": 1 / 3, "content": 2 / 3})


def test_summary_arithmetic_on_hand_made_histories():
    from eaft_pl.experiments.toyworld.driver import GENERAL_TASKS, summarise

    def entry(step, domain, general):
        scores = {"domain": {"job": {"content": domain, "exact": 0.0}}, "general": {}}
        for t in GENERAL_TASKS:
            scores["general"][t] = {"exact": general, "content": general}
        scores["general"]["colour_mc"] = {"acc": general}
        return {"step": step, "scores": scores}

    runs = [
        {"method": "m", "lr": 1e-3, "seed": 0, "run_id": "a", "wall_s": 1.0,
         "history": [entry(0, 0.1, 1.0), entry(5, 0.95, 0.6), entry(10, 1.0, 0.2)]},
        {"method": "m", "lr": 1e-3, "seed": 1, "run_id": "b", "wall_s": 3.0,
         "history": [entry(0, 0.1, 1.0), entry(5, 0.5, 0.8), entry(10, 0.8, 0.4)]},
    ]  # fmt: skip
    (row,) = summarise(runs).values()
    assert row["domain"]["mean"] == pytest.approx(0.9) and row["domain"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert row["general"]["mean"] == pytest.approx(0.3)
    assert row["forgetting"]["mean"] == pytest.approx(0.7)  # base 1.0 minus final 0.2 and 0.4
    # Matched domain: seed 0 learned it at step 5 (general 0.6 then); seed 1 never did (excluded).
    assert row["general_at_domain_0.9"] == {"mean": pytest.approx(0.6), "std": 0.0, "n": 1}
    assert row["learned_domain_runs"] == 1
    assert row["wall_s"]["mean"] == pytest.approx(2.0)


def test_tasks_score_a_model_as_a_direct_computation_does(tokenizer_dir):
    import torch

    from conftest import TINY_LLAMA
    from eaft_pl.data.chat import Conversation, collate
    from eaft_pl.evaluation.tasks import MultipleChoiceTask, PerplexityTask
    from eaft_pl.models.loading import build_causal_lm, load_tokenizer
    from eaft_pl.loss.stats import token_statistics

    tok = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    model = build_causal_lm(TINY_LLAMA, tok).eval()
    convs = [Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in [("1+1", "2"), ("hi", "hello there")]]
    got = PerplexityTask("t", convs).evaluate(model, tok, batch_size=1)
    with torch.no_grad():
        batch = collate([encode_conversation(tok, c, 64) for c in convs], tok.pad_token_id)
        stats = token_statistics(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert got["ce"] == pytest.approx(stats.ce.mean().item(), rel=1e-5)
    assert got["ppl"] == pytest.approx(torch.exp(stats.ce.mean()).item(), rel=1e-5)
    # Multiple choice picks the choice with the larger summed log-likelihood, computed here directly.
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]

    def loglik(choice):
        ids = tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0], -1)
        return sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(ids))

    choices = ["ab", "zq", "hello"]
    best = max(range(3), key=lambda i: loglik(choices[i]))
    for label in range(3):
        acc = MultipleChoiceTask("m", [{"prompt": "x", "choices": choices, "label": label}]).evaluate(model, tok)["acc"]
        assert acc == float(label == best)


def test_forgetting_signs_and_suite_averages():
    assert forgetting(0.9, 0.6, "exact") == pytest.approx(0.3)
    assert forgetting(1.0, 1.5, "ce") == pytest.approx(0.5)
    scores = {"general": {"a": {"exact": 1.0, "acc": 0.5}, "b": {"exact": 0.5}}}
    assert suite_averages(scores) == {"general": {"exact": 0.75, "acc": 0.5}}


# ---- the embedded experiment on a small world ----------------------------------------------------


@pytest.fixture(scope="module")
def small_experiment(tmp_path_factory):
    # In a subprocess, as a user runs it, so that the test below sees the whole output (Lightning's
    # loggers write to the stream they were created with, which an in-process capture would miss).
    import os
    import subprocess
    import sys

    from conftest import REPO
    from eaft_pl.results import read_results

    out = tmp_path_factory.mktemp("toy")
    uri = f"sqlite:///{out}/mlruns/mlflow.db"
    argv = [
        "--out", str(out), "--tracking_uri", uri, "--seeds", "0", "1", "--methods", "sft", "eaft", "static_mask", "sft_kl",
        "--steps", "8", "--eval_every", "4", "--pretrain_steps", "60", "--pretrain_examples", "4000",
        "--entities", "12",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "scripts/embedded_experiment.py", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out, uri, {**read_results(Path(out) / "results.json"), "output": done.stdout + done.stderr}


def test_the_output_is_one_line_per_run_then_the_table_and_where_to_look(small_experiment):
    # No device banners, model summaries, progress bars or warnings a user cannot act on (--verbose
    # brings Lightning's back): a line per base and per run, the table, the paths, the MLflow command.
    out, uri, result = small_experiment
    output = result["output"]
    lines = output.splitlines()
    for noise in ("GPU available", "| Name", "Loading weights", "it/s]", "Seed set to", "Warning", "site-packages", "Tip:"):
        assert not any(noise in line for line in lines), (noise, output)
    assert sum(line.startswith("[base] world ") for line in lines) == 2
    assert [line.split("]")[0] for line in lines if line.startswith("[") and "/8]" in line] == [f"[{i}/8" for i in range(1, 9)]
    assert result["table"] in output
    assert f"results: {out}/results.json" in lines
    assert lines[-1].endswith(f"ui --backend-store-uri {uri} --host 127.0.0.1 --workers 1")
    assert len(lines) == 2 + 8 + len(result["table"].splitlines()) + 8  # blank lines, conflicts, paths, time, UI


def test_the_experiment_writes_a_results_table(small_experiment):
    out, _, result = small_experiment
    saved = json.loads((Path(out) / "results.json").read_text())
    assert saved["meta"]["machine"]["threads"] == 2  # pinned by the driver, whatever the machine has
    assert set(saved["rows"]) == {"sft@0.001", "eaft@0.001", "static_mask@0.001", "sft_kl@0.001"}
    for row in saved["rows"].values():
        assert row["seeds"] == [0, 1] and len(row["run_ids"]) == 2
        # The conflict cohort's curves: one point per evaluation (start, every 4 steps, end), per seed.
        assert [p[0] for p in row["cohort"]["cohort/conflict/weight"]] == [0, 4, 8]
        assert row["cohort_s"]["n"] == 2 and row["cohort_s"]["mean"] > 0
        for key in ("domain", "general", "forgetting", "general_content", "general_mc"):
            assert row[key]["n"] == 2 and 0 <= row[key]["std"]
    assert (Path(out) / "results-cohort-lr0.001.png").stat().st_size > 0
    rows = saved["rows"]
    # The static mask gives the base's conflicts weight 0 at every evaluation; SFT gives them 1.
    assert all(p[1] == 0 for p in rows["static_mask@0.001"]["cohort"]["cohort/conflict/weight"] if not math.isnan(p[1]))
    assert all(p[1] == 1 for p in rows["sft@0.001"]["cohort"]["cohort/conflict/weight"] if not math.isnan(p[1]))
    assert rows["static_mask@0.001"]["reference_s"]["n"] == 2 and rows["sft@0.001"]["reference_s"]["n"] == 0
    mech = saved["mechanism"]["0"]
    assert 0 < mech["conflict_share"] < 1
    assert set(mech["by_role"]) == {"style", "content", "contradiction"}


def test_the_baseline_is_the_base_model_before_any_update(small_experiment):
    out, _, result = small_experiment
    from eaft_pl.experiments.toyworld.datamodule import ToyWorldDataModule
    from eaft_pl.module import EAFTModule

    module = EAFTModule(model_name_or_path=f"{out}/base-seed0")
    module.configure_model()
    module.eval()
    data = ToyWorldDataModule(part="domain", seed=0, n_entities=12, tokenizer_name_or_path=f"{out}/tokenizer")
    independent = {  # batch 256 as the callback's config, so batches are padded the same way
        suite: {t.name: t.evaluate(module.model, module.tokenizer, 256) for t in tasks} for suite, tasks in data.evaluation_suites().items()
    }
    client = MlflowClient(small_experiment[1])
    (row,) = [r for r in result["rows"].values() if r["method"] == "sft"]
    history = json.loads(Path(client.download_artifacts(row["run_ids"][0], "forgetting/scores.json", str(out))).read_text())["history"]
    assert history[0]["step"] == 0
    flat = lambda scores: {f"{s}/{t}/{m}": v for s, ts in scores.items() for t, ms in ts.items() for m, v in ms.items()}  # noqa: E731
    assert flat(history[0]["scores"]) == pytest.approx(flat(independent))
    assert [h["step"] for h in history] == [0, 4, 8]


def test_logged_forgetting_matches_the_scores_by_hand(small_experiment):
    out, uri, result = small_experiment
    client = MlflowClient(uri)
    for row in result["rows"].values():
        run_id = row["run_ids"][1]
        path = client.download_artifacts(run_id, "forgetting/scores.json", str(out))
        history = json.loads(Path(path).read_text())["history"]
        base = history[0]["scores"]["general"]
        logged = {m.step: m.value for m in client.get_metric_history(run_id, "forgetting/general/exact")}
        gain = {m.step: m.value for m in client.get_metric_history(run_id, "gain/domain/content")}
        for entry in history:
            now = entry["scores"]["general"]
            by_hand = sum(base[t]["exact"] for t in base if "exact" in base[t]) / 5 - sum(
                now[t]["exact"] for t in now if "exact" in now[t]
            ) / 5
            assert logged[entry["step"]] == pytest.approx(by_hand)
            domain = entry["scores"]["domain"]["job"]["content"] - history[0]["scores"]["domain"]["job"]["content"]
            assert gain[entry["step"]] == pytest.approx(domain)


def test_compare_reads_the_runs_the_experiment_makes(small_experiment):
    from eaft_pl.analysis.compare import group_runs, load_runs

    out, uri, result = small_experiment
    client = MlflowClient(uri)
    table = group_runs(load_runs(client, "toyworld"))
    rows = {r["label"]: r for r in table["rows"]}
    assert set(rows) == {"sft-lr0.001", "eaft-lr0.001", "static_mask-lr0.001", "sft_kl-lr0.001"}
    assert table["general_tasks"] == ["arithmetic", "city", "colour", "repeat", "reverse"]
    for row in result["rows"].values():  # the experiment's own summary of the same runs
        mine = rows[f"{row['method']}-lr{row['lr']:g}"]
        assert mine["n"] == 2
        assert mine["domain_avg"]["mean"] == pytest.approx(row["domain"]["mean"])
        assert mine["general_avg"]["mean"] == pytest.approx(row["general"]["mean"])
        assert mine["general_avg"]["std"] == pytest.approx(row["general"]["std"])
        assert -mine["general_delta"]["mean"] == pytest.approx(row["forgetting"]["mean"])


def test_a_cached_base_is_reused_only_for_the_same_recipe(tmp_path, monkeypatch):
    import argparse
    import os

    from eaft_pl.experiments.toyworld import driver as experiment

    calls = []

    def fake_cli(args, verbose=False):  # stands in for pretraining: records the call and writes the folder
        calls.append(args)
        os.makedirs(tmp_path / "base-seed0", exist_ok=True)

    monkeypatch.setattr(experiment, "_cli", fake_cli)
    opts = argparse.Namespace(out=str(tmp_path), entities=12, tracking_uri="sqlite://", pretrain_steps=10, pretrain_examples=100, threads=2)
    experiment.ensure_base(opts, 0)
    experiment.ensure_base(opts, 0)
    assert len(calls) == 1  # the second call found the marker of the same recipe
    opts.pretrain_steps = 20
    experiment.ensure_base(opts, 0)
    assert len(calls) == 2  # a different recipe retrains
    opts.threads = 1
    experiment.ensure_base(opts, 0)
    assert len(calls) == 3  # so does another thread count: it orders the float reductions


def test_the_committed_small_results_are_what_the_code_computes(small_experiment):
    # docs/results/toyworld_small.json (shown on docs/toyworld.md) was written by `make results` with
    # this fixture's configuration. Recomputing it here makes CI fail on a results file that the code
    # no longer reproduces, digit for digit as printed (a docs page cannot differ from its file:
    # tests/test_results.py).
    import shlex

    from conftest import REPO
    from eaft_pl.experiments.toyworld.driver import _parser, recomputable
    from eaft_pl.results import read_results

    committed = read_results(REPO / "docs" / "results" / "toyworld_small.json")
    paths = {"out", "tracking_uri", "results", "cohort_figure", "verbose"}
    settings = lambda argv: {k: v for k, v in vars(_parser().parse_args(argv)).items() if k not in paths}  # noqa: E731
    out, uri, result = small_experiment
    assert settings(shlex.split(committed["meta"]["command"])[2:]) == settings(shlex.split(result["meta"]["command"])[2:])
    assert recomputable(result) == recomputable(committed), "docs/results/toyworld_small.json is stale: run `make results`"
