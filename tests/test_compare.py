"""eaft-pl compare on an MLflow store of hand-made runs: grouping by seed-stripped names, base and
final scores, means and standard deviations, the Markdown/CSV outputs, the Pareto front and errors.
(`tests/test_toyworld.py` runs it on the runs the embedded experiment makes.)"""

import csv
import json
import statistics

import pytest
from mlflow import MlflowClient

from eaft_pl.fileio import atomic_write
from eaft_pl.analysis.compare import (
    SEED_PART, RunScores, Selection, format_markdown, group_runs, lm_eval_score, load_lm_eval_runs, load_runs, main, pareto_points,
    read_lm_eval_results, read_metrics_csv,
)
from eaft_pl.analysis.plots import pareto_front

# name -> {metric: [value at step 0, 10, 20]}; two seeds per method, the base identical per seed.
RUNS = {
    "sft-lr0.001-seed0": {"val/domain/job/content": [0.1, 0.6, 0.9], "val/general/a/exact": [1.0, 0.5, 0.2], "val/general/b/exact": [0.8, 0.4, 0.0]},
    "sft-lr0.001-seed1": {"val/domain/job/content": [0.2, 0.7, 1.0], "val/general/a/exact": [1.0, 0.6, 0.4], "val/general/b/exact": [0.6, 0.2, 0.2]},
    "eaft-lr0.001-seed0": {"val/domain/job/content": [0.1, 0.5, 0.8], "val/general/a/exact": [1.0, 0.9, 0.7], "val/general/b/exact": [0.8, 0.7, 0.5]},
    "eaft-lr0.001-seed1": {"val/domain/job/content": [0.2, 0.5, 0.7], "val/general/a/exact": [1.0, 0.8, 0.9], "val/general/b/exact": [0.6, 0.6, 0.5]},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("toy", artifact_location=str(tmp_path / "artifacts"))
    for name, metrics in RUNS.items():
        # The base checkpoint, as the experiment tags it: one per seed, shared by the methods.
        tags = {"method": name.split("-")[0], "model": f"outputs/toy/base-{name.rsplit('-', 1)[1]}"}
        run = client.create_run(exp, run_name=name, tags=tags)
        for key, values in metrics.items():
            for step, value in zip((0, 10, 20), values):
                client.log_metric(run.info.run_id, key, value, step=step)
        # Metrics the comparison must ignore: the suite average and a diagnostics name.
        client.log_metric(run.info.run_id, "val/general/avg/exact", -1.0, step=20)
        client.log_metric(run.info.run_id, "val/domain/ce_low_entropy", 5.0, step=20)
        client.set_terminated(run.info.run_id)
    other = client.create_run(exp, run_name="analyze-base")  # no suite metrics: skipped
    client.log_metric(other.info.run_id, "analyze/sft_data/ce", 1.0)
    client.set_terminated(other.info.run_id)
    crashed = client.create_run(exp, run_name="sft-lr0.001-seed2")  # not FINISHED: skipped
    client.log_metric(crashed.info.run_id, "val/domain/job/content", 0.0, step=0)
    client.log_metric(crashed.info.run_id, "val/general/a/exact", 0.0, step=0)
    return uri, tmp_path


def direct(name_prefix, step_index):
    """Per run of a group: domain average and general average at one step, by hand."""
    rows = [m for n, m in RUNS.items() if n.startswith(name_prefix)]
    domain = [m["val/domain/job/content"][step_index] for m in rows]
    general = [(m["val/general/a/exact"][step_index] + m["val/general/b/exact"][step_index]) / 2 for m in rows]
    return domain, general


def test_groups_aggregate_seeds_with_base_final_and_delta(store):
    uri, _ = store
    runs = load_runs(MlflowClient(uri), "toy")
    assert sorted(r.name for r in runs) == sorted(RUNS)
    table = group_runs(runs)
    assert [r["label"] for r in table["rows"]] == ["eaft-lr0.001", "sft-lr0.001"]
    assert table["domain_tasks"] == ["job"] and table["general_tasks"] == ["a", "b"]
    for row in table["rows"]:
        prefix = row["label"]
        domain, general = direct(prefix, 2)
        _, base_general = direct(prefix, 0)
        assert row["n"] == 2
        assert row["domain_avg"]["mean"] == pytest.approx(statistics.fmean(domain))
        assert row["domain_avg"]["std"] == pytest.approx(statistics.stdev(domain))
        assert row["general_avg"]["mean"] == pytest.approx(statistics.fmean(general))
        assert row["general_avg"]["std"] == pytest.approx(statistics.stdev(general))
        deltas = [g - b for g, b in zip(general, base_general)]
        assert row["general_delta"]["mean"] == pytest.approx(statistics.fmean(deltas))
    # The base row: each of the 2 distinct bases once (not once per method), so n and std are theirs.
    base_domain, base_general = direct("sft", 0)  # one run per base
    assert table["base"]["n"] == 2 and table["base"]["bases"] == ["outputs/toy/base-seed0", "outputs/toy/base-seed1"]
    assert table["base"]["general_avg"]["mean"] == pytest.approx(statistics.fmean(base_general))
    assert table["base"]["domain_avg"]["mean"] == pytest.approx(statistics.fmean(base_domain))
    assert table["base"]["domain_avg"]["std"] == pytest.approx(statistics.stdev(base_domain))

    md = format_markdown(table).splitlines()
    assert md[0] == "| name | runs | job | Domain avg | a | b | General avg (Δ base) |"
    # eaft: general (0.7+0.5)/2 = 0.6 and (0.9+0.5)/2 = 0.7 -> 65.0±7.1; base 0.9 and 0.8 -> Δ -0.3, -0.1
    assert md[3] == "| eaft-lr0.001 | 2 | 75.0±7.1 | 75.0±7.1 | 80.0±14.1 | 50.0±0.0 | 65.0±7.1 (-20.0±14.1) |"
    points = pareto_points(table)
    assert points[0] == pytest.approx({"label": "eaft-lr0.001", "x": 65.0, "y": 75.0, "xerr": 7.0710678, "yerr": 7.0710678})


def test_grouping_by_tags_and_params(store):
    uri, _ = store
    table = group_runs(load_runs(MlflowClient(uri), "toy", group_by=["tags.method"]))
    assert [r["group"] for r in table["rows"]] == [{"method": "eaft"}, {"method": "sft"}]
    with pytest.raises(ValueError, match="--group_by entries"):
        load_runs(MlflowClient(uri), "toy", group_by=["method"])


def test_the_command_writes_and_logs_table_csv_and_plot(store, capsys):
    uri, tmp_path = store
    out = tmp_path / "cmp"
    table = main(["--experiment", "toy", "--tracking_uri", uri, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| sft-lr0.001 | 2 |" in printed and "logged to MLflow run" in printed
    assert {p.name for p in out.iterdir()} == {"table.md", "table.csv", "compare.json", "pareto.png"}
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["base", "eaft-lr0.001", "sft-lr0.001"]
    assert float(rows[2]["general_avg_mean"]) == pytest.approx(table["rows"][1]["general_avg"]["mean"])
    assert rows[0]["general_delta_mean"] == ""  # the base has no change against itself
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("toy")
    (logged,) = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'compare'")
    assert {a.path for a in client.list_artifacts(logged.info.run_id, "compare")} == {
        "compare/table.md", "compare/table.csv", "compare/compare.json", "compare/pareto.png"
    }  # fmt: skip
    # The compare run itself is no method: a second comparison reads the same four runs.
    assert len(load_runs(client, "toy")) == 4


def test_errors_name_the_experiment_and_the_metrics_found(store, capsys):
    uri, _ = store
    with pytest.raises(SystemExit) as e:
        main(["--experiment", "nope", "--tracking_uri", uri, "--no_log"])
    assert e.value.code == 2 and "no MLflow experiment named 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"val/general/<task>/acc.*found: val/domain/job/content"):
        load_runs(MlflowClient(uri), "toy", general_metric="acc")


def scores(name, base, domain, general, group="g"):
    return RunScores(run_id=name, name=name, group={"name": group}, domain=domain, general=general, base=base)


def test_runs_missing_a_task_are_refused_by_name():
    full = scores("a-seed0", "b0", {"job": (0.1, 0.5)}, {"x": (1.0, 0.9), "y": (0.5, 0.4)})
    short = scores("a-seed1", "b1", {"job": (0.1, 0.5)}, {"x": (1.0, 0.9)})
    with pytest.raises(ValueError, match=r"run 'a-seed1' \(a-seed1\) has no scores for general/y"):
        group_runs([full, short])
    no_domain = scores("c-seed0", "b0", {}, {"x": (1.0, 0.9), "y": (0.5, 0.4)}, group="c")
    with pytest.raises(ValueError, match="run 'c-seed0'.*domain/job"):
        group_runs([full, no_domain])


def test_the_command_exits_with_the_missing_task(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("gaps", artifact_location=str(tmp_path / "artifacts"))
    for name, keys in (("sft-seed0", ["val/domain/job/content", "val/general/a/exact", "val/general/b/exact"]),
                       ("sft-seed1", ["val/domain/job/content", "val/general/a/exact"])):  # fmt: skip
        run = client.create_run(exp, run_name=name)
        for key in keys:
            client.log_metric(run.info.run_id, key, 0.5, step=0)
        client.set_terminated(run.info.run_id)
    with pytest.raises(SystemExit) as e:
        main(["--experiment", "gaps", "--tracking_uri", uri, "--no_log"])
    assert e.value.code == 2 and "run 'sft-seed1'" in capsys.readouterr().err


def test_bases_disagreeing_or_differing_between_groups_are_warned_about():
    a0 = scores("sft-seed0", "base0", {"job": (0.1, 0.5)}, {"x": (1.0, 0.9)}, group="sft")
    b0 = scores("eaft-seed0", "base0", {"job": (0.3, 0.5)}, {"x": (1.0, 0.9)}, group="eaft")
    with pytest.warns(UserWarning, match="same base 'base0'.*differ on job"):
        table = group_runs([a0, b0])
    assert table["base"]["n"] == 1 and table["base"]["domain"]["job"]["mean"] == pytest.approx(0.1)
    c1 = scores("eaft-seed1", "other", {"job": (0.1, 0.5)}, {"x": (1.0, 0.9)}, group="eaft")
    with pytest.warns(UserWarning, match="fine-tuned from different base models"):
        assert group_runs([a0, c1])["base"]["n"] == 2


def test_a_failed_artifact_upload_ends_the_compare_run_failed(store, monkeypatch):
    uri, tmp_path = store

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MlflowClient, "log_artifacts", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["--experiment", "toy", "--tracking_uri", uri])
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("toy")
    statuses = [r.info.status for r in client.search_runs([exp.experiment_id], filter_string="tags.stage = 'compare'")]
    assert "FAILED" in statuses and "RUNNING" not in statuses


def test_atomic_write_replaces_whole_files_and_a_failed_write_keeps_the_old_one(tmp_path):
    target = tmp_path / "table.md"
    atomic_write(target, lambda p: p.write_text("old\n"))

    def half_then_fail(p):
        p.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]  # no temporary file left behind


def test_pareto_front_keeps_the_undominated_points():
    pts = [(1.0, 5.0), (2.0, 4.0), (1.5, 3.0), (2.0, 4.0), (0.5, 5.0), (3.0, 1.0), (float("nan"), 9.0)]
    assert sorted(set(pareto_front(pts))) == [(1.0, 5.0), (2.0, 4.0), (3.0, 1.0)]


# ---- TensorBoard, CSV and lm-eval sources -----------------------------------------------------------

# The same scores logged as LMEvalCallback names them (metric "acc"): base at step 0, final at step 20.
LOGGED = {
    "sft-seed0": {"val/domain/job/acc": [0.1, 0.9], "val/general/a/acc": [1.0, 0.2], "val/general/b/acc": [0.8, 0.0]},
    "sft-seed1": {"val/domain/job/acc": [0.2, 1.0], "val/general/a/acc": [1.0, 0.4], "val/general/b/acc": [0.6, 0.2]},
}


def write_logs(logger, metrics, hparams):
    """Log ``metrics`` at steps 0 and 20 through a Lightning logger, as a training run would."""
    logger.log_hyperparams(hparams)
    for index, step in enumerate((0, 20)):
        logger.log_metrics({k: v[index] for k, v in metrics.items()}, step=step)
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)  # other metrics are ignored
    logger.save()
    logger.finalize("success")


def lm_eval_file(path, scores, wrapped=False):
    """An lm-eval results file: task -> {"<metric>,<filter>": value, stderr, alias}."""
    results = {"results": {t: {"alias": t, "acc,none": v, "acc_stderr,none": 0.01} for t, v in scores.items()},
               "versions": {t: 1 for t in scores}, "config": {"model": "hf"}}  # fmt: skip
    if wrapped:  # as LMEvalCallback logs it: lm_eval/<suite>/step_<step>.json
        results = {"step": 20, "seconds": 1.0, "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path


def test_compare_reads_tensorboard_csv_and_lm_eval_results_together(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    # sft-seed0 through TensorBoard, sft-seed1 through CSV; Lightning's <save_dir>/<name>/version_0 layout.
    write_logs(TensorBoardLogger(tmp_path / "tb", name="sft-seed0"), LOGGED["sft-seed0"], {"learning_rate": 0.001})
    write_logs(CSVLogger(tmp_path / "csv", name="sft-seed1"), LOGGED["sft-seed1"], {"learning_rate": 0.001})
    # Two fine-tuned models scored by lm-eval (one file in lm-eval's own layout, one as the callback
    # logs it), against the base model's file.
    base = lm_eval_file(tmp_path / "lm" / "base" / "results_2026-01-01.json", {"job": 0.1, "a": 1.0, "b": 0.8})
    first = lm_eval_file(tmp_path / "lm" / "eaft-seed0" / "results_2026-01-02.json", {"job": 0.8, "a": 0.7, "b": 0.5})
    second = lm_eval_file(tmp_path / "lm" / "eaft-seed1.json", {"job": 0.6, "a": 0.9, "b": 0.7}, wrapped=True)
    out = tmp_path / "cmp"
    with pytest.warns(UserWarning, match="different base models"):  # the logs name no base model
        table = main([
            "--tensorboard", str(tmp_path / "tb"), "--csv", str(tmp_path / "csv"),
            "--lm_eval", str(first), str(second), "--lm_eval_base", str(base),
            "--lm_eval_domain_tasks", "job", "--lm_eval_general_tasks", "a", "b",
            "--domain_metric", "acc", "--general_metric", "acc", "--out", str(out),
        ])  # fmt: skip
    assert {p.name for p in out.iterdir()} == {"table.md", "table.csv", "compare.json", "pareto.png"}
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["label"]: r for r in table["rows"]}
    assert set(rows) == {"sft", "eaft"} and rows["sft"]["n"] == 2 and rows["eaft"]["n"] == 2
    # By hand: sft's general average at step 20 is (0.2+0.0)/2 = 0.1 and (0.4+0.2)/2 = 0.3;
    # eaft's is (0.7+0.5)/2 = 0.6 and (0.9+0.7)/2 = 0.8, against the base file's (1.0+0.8)/2 = 0.9.
    assert rows["sft"]["general_avg"]["mean"] == pytest.approx(0.2)
    assert rows["sft"]["domain_avg"]["mean"] == pytest.approx(0.95)
    assert rows["eaft"]["general_avg"]["mean"] == pytest.approx(0.7)
    assert rows["eaft"]["domain_avg"]["std"] == pytest.approx(statistics.stdev([0.8, 0.6]))
    assert rows["eaft"]["general_delta"]["mean"] == pytest.approx(0.7 - 0.9)
    assert rows["sft"]["general_delta"]["mean"] == pytest.approx(statistics.fmean([0.1 - 0.9, 0.3 - 0.8]))
    assert "| sft | 2 | 95.0±7.1 |" in capsys.readouterr().out
    # Grouping by a param of a log folder's hparams.yaml.
    by_lr = main(["--csv", str(tmp_path / "csv"), "--tensorboard", str(tmp_path / "tb"), "--group_by", "params.learning_rate",
                  "--domain_metric", "acc", "--general_metric", "acc"])  # fmt: skip
    assert [r["group"] for r in by_lr["rows"]] == [{"learning_rate": "0.001"}]


def test_log_sources_name_what_is_wrong(tmp_path, capsys):
    from lightning.pytorch.loggers import CSVLogger

    write_logs(CSVLogger(tmp_path / "csv", name="sft-seed0"), LOGGED["sft-seed0"], {})
    with pytest.raises(SystemExit) as e:  # the default metrics are the embedded experiment's, not "acc"
        main(["--csv", str(tmp_path / "csv")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "val/domain/<task>/content" in err and "found: val/domain/job/acc" in err
    with pytest.raises(SystemExit):
        main(["--csv", str(tmp_path / "nothing")])
    assert "--csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--domain_metric", "acc"])  # no source at all
    assert "--experiment, --tensorboard, --csv and/or --lm_eval" in capsys.readouterr().err
    broken = tmp_path / "broken" / "metrics.csv"
    broken.parent.mkdir()
    broken.write_text("step,val/domain/job/acc\n0,0.5\n20,oops\n")
    with pytest.raises(ValueError, match=r"metrics.csv, line 3: could not convert"):
        read_metrics_csv(broken)


def test_lm_eval_files_name_missing_tasks_and_metrics(tmp_path):
    path = lm_eval_file(tmp_path / "r.json", {"job": 0.5})
    table = read_lm_eval_results(path)
    assert lm_eval_score(table, "job", "acc", path) == 0.5 and lm_eval_score(table, "job", "acc,none", path) == 0.5
    with pytest.raises(ValueError, match=r"r.json: no task 'mmlu'; it has job"):
        lm_eval_score(table, "mmlu", "acc", path)
    with pytest.raises(ValueError, match=r"task 'job' has no score 'exact_match'; it has acc,none"):
        lm_eval_score(table, "job", "exact_match", path)
    with pytest.raises(ValueError, match="--lm_eval_general_tasks"):
        load_lm_eval_runs([str(path)], str(path), ["job"], [], Selection())


def test_the_name_key_strips_world_seeds_and_data_orders():
    # The demo names runs <method>-lr<lr>-seed<world>-order<k>: its 3 orders are one row.
    names = ["eaft-lr0.001-seed0-order0", "eaft-lr0.001-seed0-order1", "eaft-lr0.001-seed1", "eaft_lr0.001_order_2"]
    assert {SEED_PART.sub("", n) for n in names} == {"eaft-lr0.001", "eaft_lr0.001"}
    assert SEED_PART.sub("", "border-lr0.001") == "border-lr0.001"  # no number after it: not an order part
