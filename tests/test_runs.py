"""``eaft-pl runs``: the newest runs of an experiment, as a table or JSON, through the console entry point."""

from __future__ import annotations

import json
import time

import pytest
from mlflow import MlflowClient

from eaft_pl import cli
from eaft_pl.analysis.runs import format_runs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating one costs seconds): three runs of ``quickstart``
    (the last has no ``train/ce``) and an empty ``toyworld``."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('runs')}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("quickstart")
    client.create_experiment("toyworld")
    ids = []
    for i, method in enumerate(["sft", "eaft", "dft"]):
        run = client.create_run(exp, run_name=f"{method}-run", tags={"method": method, "stage": "fit"})
        client.log_metric(run.info.run_id, "val/domain/ce", 1.0 + i / 8, step=1)
        client.log_metric(run.info.run_id, "val/domain/ce", 0.5 + i / 8, step=2)  # the last value is shown
        if method != "dft":
            client.log_metric(run.info.run_id, "train/ce", 2.0 + i)
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
        time.sleep(0.01)  # distinct start times: the order is by start time
    return uri, ids


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr("sys.argv", ["eaft-pl", "runs", *args])
    cli.main()
    return capsys.readouterr().out


def test_json_rows_newest_first_with_last_values(monkeypatch, capsys, store):
    uri, ids = store
    out = run_cli(monkeypatch, capsys, "--experiment", "quickstart", "--tracking_uri", uri,
                  "--metrics", "val/domain/ce", "train/ce", "--limit", "2", "--json")  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["run_id"] for r in rows] == [ids[2], ids[1]]
    assert [r["method"] for r in rows] == ["dft", "eaft"]
    assert rows[0]["val/domain/ce"] == pytest.approx(0.75) and rows[0]["train/ce"] is None
    assert rows[1]["val/domain/ce"] == pytest.approx(0.625) and rows[1]["train/ce"] == pytest.approx(3.0)
    assert rows[1]["status"] == "FINISHED" and rows[1]["stage"] == "fit" and rows[1]["name"] == "eaft-run"


def test_table_has_a_row_per_run_and_blank_missing_metrics(monkeypatch, capsys, store):
    uri, ids = store
    out = run_cli(monkeypatch, capsys, "--experiment", "quickstart", "--tracking_uri", uri, "--metrics", "train/ce")
    lines = out.strip().splitlines()
    assert lines[0] == "| name | method | stage | status | train/ce | run_id |"
    assert len(lines) == 2 + 3
    assert lines[2] == f"| dft-run | dft | fit | FINISHED |  | {ids[2]} |"
    assert lines[4] == f"| sft-run | sft | fit | FINISHED | 2.0000 | {ids[0]} |"


def test_unknown_experiment_names_the_known_ones(monkeypatch, capsys, store):
    uri, _ = store
    with pytest.raises(SystemExit) as exc:
        run_cli(monkeypatch, capsys, "--experiment", "quickstrat", "--tracking_uri", uri)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no experiment 'quickstrat'" in err and "'quickstart'" in err and "'toyworld'" in err and uri in err


def test_limit_must_be_positive(monkeypatch, capsys, store):
    with pytest.raises(SystemExit) as exc:
        run_cli(monkeypatch, capsys, "--experiment", "quickstart", "--tracking_uri", store[0], "--limit", "0")
    assert exc.value.code == 2 and "--limit must be at least 1" in capsys.readouterr().err


def test_format_runs_without_rows_is_the_header():
    assert format_runs([], ["a"]).splitlines() == ["| name | method | stage | status | a | run_id |", "|---|---|---|---|---|---|"]
