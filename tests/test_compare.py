"""eaft-pl compare on an MLflow store of hand-made runs: grouping by seed-stripped names, base and
final scores, means and standard deviations, the Markdown/CSV outputs, the Pareto front and errors.
(`tests/test_toyworld.py` runs it on the runs the embedded experiment makes.)"""

import csv
import statistics

import pytest
from mlflow import MlflowClient

from eaft_pl.fileio import atomic_write
from eaft_pl.analysis.compare import RunScores, format_markdown, group_runs, load_runs, main, pareto_points
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
    with pytest.raises(ValueError, match="--group-by entries"):
        load_runs(MlflowClient(uri), "toy", group_by=["method"])


def test_the_command_writes_and_logs_table_csv_and_plot(store, capsys):
    uri, tmp_path = store
    out = tmp_path / "cmp"
    table = main(["--experiment", "toy", "--tracking-uri", uri, "--out", str(out)])
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
        main(["--experiment", "nope", "--tracking-uri", uri, "--no-log"])
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
        main(["--experiment", "gaps", "--tracking-uri", uri, "--no-log"])
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
        main(["--experiment", "toy", "--tracking-uri", uri])
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
