"""The real-model driver's summary arithmetic and run cache (scripts/real_experiment.py). Its end-to-end
run on a small model with SmolLM2's tokenizer is in test_gguf.py, next to the converted model."""

import argparse
import json

import pytest

from eaft_pl.experiments.realmodel import driver


def entry(step, domain, facts, ppl=20.0, agree=1.0, kl=0.0, style=0.0):
    return {
        "step": step,
        "scores": {
            "domain": {"math": {"accuracy": domain, "answered": 1.0, "style": style}},
            "general": {"prose": {"ce": 3.0, "ppl": ppl}, "facts": {"acc": facts}, "agreement": {"agree": agree, "token_agree": agree, "kl": kl}},
        },
    }


def run(method, seed, final_domain, final_facts, kl=0.1, base_facts=0.5):
    return {
        "method": method, "lr": 5e-5, "seed": seed, "run_id": f"{method}{seed}", "wall_s": 10.0, "cached": False,
        "history": [entry(0, 0.0, base_facts), entry(10, final_domain / 2, (base_facts + final_facts) / 2, kl=kl / 2),
                    entry(20, final_domain, final_facts, ppl=25.0, agree=0.5, kl=kl, style=1.0)],
        "cohort": [{"step": 0, "cohort/conflict/weight": 0.1}, {"step": 20, "cohort/conflict/weight": 0.3 + seed / 10}],
    }  # fmt: skip


def test_scores_average_the_scored_general_suites_only():
    s = driver.scores(entry(0, 0.25, 0.5, ppl=30.0, agree=0.75, kl=0.2))
    assert s["domain"] == 0.25 and s["facts/acc"] == 0.5 and s["prose/ppl"] == 30.0
    # perplexity, agreement and KL are continuous: they are columns, not part of the average
    assert s["general"] == 0.5
    both = entry(0, 0.0, 0.5)
    both["scores"]["general"]["instructions"] = {"acc": 0.25}
    assert driver.scores(both)["general"] == pytest.approx(0.375)


def test_summary_means_and_spreads_over_seeds():
    rows = driver.summarise([run("sft", 0, 0.5, 0.25), run("sft", 1, 0.7, 0.375), run("eaft", 0, 0.5, 0.5)])
    sft = rows["sft@5e-05"]
    assert sft["seeds"] == [0, 1]
    assert sft["final"]["domain"]["mean"] == pytest.approx(0.6) and sft["final"]["domain"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert sft["general_delta"]["mean"] == pytest.approx(((0.25 - 0.5) + (0.375 - 0.5)) / 2)
    assert sft["drop_over_std"] == pytest.approx(0.1875 / 0.0884, abs=1e-3)  # the drop in seed spreads, as the pilot's rule reads it
    assert sft["base"]["general"]["mean"] == 0.5
    # forgetting curves: every evaluation step, mean over the seeds
    assert [p[0] for p in sft["curves"]["facts/acc"]] == [0, 10, 20]
    assert sft["curves"]["agreement/kl"][-1][1] == pytest.approx(0.1)
    assert sft["cohort"]["cohort/conflict/weight"][-1] == [20, pytest.approx(0.35), pytest.approx(0.0707, abs=1e-4)]
    assert rows["eaft@5e-05"]["general_delta"] == {"mean": 0.0, "std": 0.0, "n": 1}


def test_the_table_has_the_paper_layout():
    table = driver.format_table(driver.summarise([run("sft", 0, 0.5, 0.25), run("sft", 1, 0.7, 0.375), run("eaft", 0, 0.5, 0.5)]))
    lines = table.splitlines()
    assert lines[0] == "| method | lr | Domain | Teacher style | Facts | Prose ppl | Agree | Token agree | KL to base | General avg (Δ base) |"
    # the base row: the first row's seeds (the same base under every method of a seed)
    assert lines[2] == "| base |  | 0.0±0.0 | 0.0±0.0 | 50.0±0.0 | 20.00±0.00 | 100.0±0.0 | 100.0±0.0 | 0.000±0.000 | 50.0±0.0 |"
    assert lines[3] == "| sft | 5e-05 | 60.0±14.1 | 100.0±0.0 | 31.2±8.8 | 25.00±0.00 | 50.0±0.0 | 50.0±0.0 | 0.100±0.000 | 31.2±8.8 (-18.8±8.8) |"
    assert lines[4].endswith("| 50.0 (+0.0) |")  # no forgetting is +0.0, a gain would be +


def test_methods_are_compared_with_sft_seed_by_seed():
    runs = [run("sft", 0, 0.5, 0.25), run("sft", 1, 0.7, 0.375), run("eaft", 0, 0.5, 0.5), run("eaft", 1, 0.6, 0.5), run("dft", 2, 0.1, 0.5)]
    comparisons = driver.paired(runs)
    eaft = comparisons["eaft@5e-05"]
    assert eaft["seeds"] == [0, 1] and eaft["reference"] == "sft@5e-05"
    # per seed: general +0.25 and +0.125, domain 0.0 and -0.1; the mean and spread of those differences
    assert eaft["general"]["mean"] == pytest.approx(0.1875) and eaft["general"]["std"] == pytest.approx(0.0884, abs=1e-4)
    assert eaft["domain"]["mean"] == pytest.approx(-0.05) and eaft["domain"]["std"] == pytest.approx(0.0707, abs=1e-4)
    assert eaft["agreement/kl"]["mean"] == pytest.approx(0.0)
    # a method with no seed in common with SFT has nothing to be paired with; SFT is the reference, not a row
    assert set(comparisons) == {"eaft@5e-05"}
    table = driver.format_paired(comparisons).splitlines()
    assert table[0] == "| method | lr | seeds | Domain − SFT | General avg − SFT | Prose ppl − SFT | KL to base − SFT |"
    assert table[2] == "| eaft | 5e-05 | 2 | -5.0±7.1 | +18.8±8.8 | +0.00±0.00 | +0.000±0.000 |"
    assert driver.format_paired({}) == ""


def test_the_pareto_figure_has_a_point_per_method_and_the_base():
    rows = driver.summarise([run("sft", 0, 0.5, 0.25), run("sft", 1, 0.7, 0.375), run("eaft", 0, 0.5, 0.5)])
    ax = driver.pareto_figure(rows, 5e-5).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "sft" in labels and "eaft" in labels
    assert any(t.get_text() == "base" for t in ax.texts)


def test_the_conflict_line_contrasts_teacher_and_own_answers():
    analyses = {"0": {"sft_data": {"conflict_share": 0.2, "tokens": 100}, "on_policy": {"conflict_share": 0.01, "tokens": 90}}}
    line = driver.conflicts_line(analyses)
    assert "teacher's answers 20.0% of 100 tokens" in line and "own greedy answers 1.0% of 90 tokens" in line


def _opts(**changes):
    opts = driver._parser().parse_args([])
    return argparse.Namespace(**{**vars(opts), **changes})


def test_a_run_is_reused_only_under_the_same_key(tmp_path):
    config = tmp_path / "method.yaml"
    config.write_text("a: 1\n")
    key = driver.run_key(_opts(), "sft", 5e-5, 0, configs=[config])
    # where it writes, how it prints and the rest of the grid do not change a run ...
    assert driver.run_key(_opts(out="elsewhere", verbose=True, seeds=[0, 1, 2], methods=["dft"]), "sft", 5e-5, 0, configs=[config]) == key
    # ... what it computes does
    assert driver.run_key(_opts(steps=41), "sft", 5e-5, 0, configs=[config]) != key
    assert driver.run_key(_opts(), "sft", 5e-5, 1, configs=[config]) != key
    # the analysis of the base depends on the data and the model, not on the training length
    analysis = driver.run_key(_opts(), "analyze", 0, keyed=driver._KEYED_ANALYSIS)
    assert driver.run_key(_opts(steps=41, batch_size=8), "analyze", 0, keyed=driver._KEYED_ANALYSIS) == analysis
    assert driver.run_key(_opts(domain="math"), "analyze", 0, keyed=driver._KEYED_ANALYSIS) != analysis
    config.write_text("a: 2\n")
    assert driver.run_key(_opts(), "sft", 5e-5, 0, configs=[config]) != key

    path = tmp_path / "runs" / "sft.json"
    driver._store(path, "k1", {"wall_s": 3.0})
    assert driver._cached(path, "k1") == {"wall_s": 3.0}
    assert driver._cached(path, "k2") is None  # another recipe: run again
    path.write_text(json.dumps({"key": "k1", "result": {}})[:10])  # torn by a killed process
    assert driver._cached(path, "k1") is None


def test_bad_options_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        driver.main(["--methods", "sft", "nope"])
    assert "unknown methods ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        driver.main(["--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_the_study_takes_the_rates_and_length_from_the_pilots_results(tmp_path, capsys):
    from eaft_pl.results import stamp, write_results

    path = tmp_path / "pilot.json"
    write_results(path, {"choice": {"lrs": [0.0003], "steps": 40, "first_step": {"0.0003": 40}}}, stamp("pilot", 1.0))
    assert driver.pilot_choice(str(path)) == ([3e-4], 40)
    with pytest.raises(SystemExit):  # both the pilot and a hand-picked rate: which one?
        driver.main(["--pilot", str(path), "--lrs", "1e-4"])
    assert "--pilot sets the learning rates and the length" in capsys.readouterr().err
    write_results(path, {"choice": {"lrs": [], "steps": None}}, stamp("pilot", 1.0))
    with pytest.raises(SystemExit, match="no learning rate at which SFT forgets measurably"):
        driver.pilot_choice(str(path))
    write_results(path, {"table": ""}, stamp("demo", 1.0))
    with pytest.raises(SystemExit, match="has no pilot 'choice'"):
        driver.pilot_choice(str(path))


def test_the_pilot_finds_where_sft_forgets_beyond_the_seed_spread():
    from eaft_pl.experiments.realmodel import pilot

    def history(facts_by_step, base=0.5):
        return [entry(0, 0.0, base)] + [entry(step, 0.5, facts, kl=step / 100) for step, facts in facts_by_step]

    # lr 1e-4: both seeds drop 0.125 by step 20 (std 0): measurable at 20 (and still at 40)
    # lr 3e-5: seed drops 0.0 and 0.125 at step 20 (mean below its 3 std); 0.125 and 0.1875 at 40
    table = {
        1e-4: pilot.drops({0: history([(20, 0.375), (40, 0.25)]), 1: history([(20, 0.375), (40, 0.25)])}),
        3e-5: pilot.drops({0: history([(20, 0.5), (40, 0.375)]), 1: history([(20, 0.375), (40, 0.3125)])}),
        1e-5: pilot.drops({0: history([(20, 0.5), (40, 0.5)]), 1: history([(20, 0.5), (40, 0.5)])}),
    }
    assert [p["step"] for p in table[1e-4]] == [20, 40]  # the base (step 0) is the reference, not a row
    assert table[3e-5][1]["drop"]["mean"] == pytest.approx(0.15625) and table[1e-4][0]["kl"] == pytest.approx(0.2)
    choice = pilot.choose(table, ratio=3.0, min_drop=0.0625)
    assert choice["first_step"] == {"3e-05": 40, "0.0001": 20}
    assert choice["lrs"] == [3e-5, 1e-4] and choice["steps"] == 40  # every chosen rate forgets by step 40
    text = pilot.format_pilot(table, choice, 3.0, 0.0625)
    assert "| 3e-05 | 20 | 6.2±8.8 | no |" in text and "| 0.0001 | 20 | 12.5±0.0 | yes |" in text
    assert text.endswith("SFT forgets measurably at lr 3e-05, 0.0001; the study trains 40 steps.")
    # one seed has no spread to compare with: never measurable; no forgetting at all is said so
    assert pilot.choose({1e-5: table[1e-5]}, 3.0, 0.0625) == {"lrs": [], "first_step": {}, "steps": None, "rule": choice["rule"]}
    assert "No learning rate and length in this pilot made SFT forget measurably" in pilot.format_pilot({1e-5: table[1e-5]}, pilot.choose({1e-5: table[1e-5]}, 3.0, 0.0625), 3.0, 0.0625)
