"""The MLflow UI in a real browser: after a short `fit` and `analyze`, the UI (on loopback) shows the
run names, a chart of a diagnostics metric and the analysis heatmap. Screenshots are kept under
``outputs/test-artifacts/browser/`` (or ``$EAFT_TEST_ARTIFACTS``).

Needs Debian's ``chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it and sets
``EAFT_REQUIRE_BROWSER=1``, which turns the skip into a failure)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO
from eaft_pl.cli import cli_main
from test_cli import quick_args

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags that let Chromium run headless as root in a container without a GPU or a display; the virtual-time
# budget lets MLflow's single-page app fetch its data and draw the charts before the DOM is read.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--run-all-compositor-stages-before-draw",
    "--window-size=1400,900",
]  # fmt: skip


def _require_chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("EAFT_REQUIRE_BROWSER") == "1":
            pytest.fail("EAFT_REQUIRE_BROWSER=1 but no chromium on PATH (.ci/run installs it with apt-get)")
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium); .ci/run installs it and runs this test")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    """End the process group ``proc`` leads (started with ``start_new_session=True``): SIGTERM, up to
    ``grace`` seconds for the leader, then SIGKILL for whatever of the group is left (the MLflow UI's
    uvicorn and huey workers, Chromium's helpers), so nothing outlives the test."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # the group is gone
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    proc.wait(timeout=10)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the MLflow UI exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the MLflow UI did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _browse(chromium: str, url: str, profile: Path, *, dump: bool = False, screenshot: Path = None, budget_ms: int = 10000) -> str:
    """Open ``url`` in a fresh headless Chromium; return the rendered DOM or write a screenshot."""
    args = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    args += ["--dump-dom"] if dump else [f"--screenshot={screenshot}"]
    browser = subprocess.Popen(
        args + [url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = browser.communicate(timeout=120)
    finally:
        _stop_group(browser, grace=5)
    assert browser.returncode == 0, stderr[-2000:]
    return stdout


def _dom_with(chromium: str, url: str, profile: Path, needles: list) -> str:
    """The DOM once every needle is in it; one retry with a longer budget (a loaded CI machine)."""
    for budget in (10000, 25000):
        dom = _browse(chromium, url, profile, dump=True, budget_ms=budget)
        if all(n in dom for n in needles):
            return dom
    missing = [n for n in needles if n not in dom]
    raise AssertionError(f"{url} never showed {missing}; its DOM ends with:\n{dom[-2000:]}")


def test_the_mlflow_ui_shows_runs_a_metric_chart_and_the_heatmap(tmp_path, monkeypatch):
    chromium = _require_chromium()
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", *quick_args(tmp_path, steps=2, extra=["--trainer.val_check_interval=2", "--trainer.logger.init_args.run_name=e2e-fit"])])
    cli_main([
        "analyze", *quick_args(tmp_path, extra=["--trainer.logger.init_args.run_name=e2e-analyze"]),
        "--max_examples=6", "--max_new_tokens=4", "--progress_bar=false",
    ])  # fmt: skip
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("quickstart")
    found = {r.info.run_name: r.info.run_id for r in client.search_runs([exp.experiment_id])}
    assert set(found) == {"e2e-fit", "e2e-analyze"}

    shots = Path(os.environ.get("EAFT_TEST_ARTIFACTS", REPO / "outputs" / "test-artifacts")) / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow-ui.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
    with open(log, "w") as out:
        server = subprocess.Popen(
            [*command, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_healthy(base, server, log)
        runs_url = f"{base}/#/experiments/{exp.experiment_id}/runs"
        _dom_with(chromium, runs_url, tmp_path / "p1", ["e2e-fit", "e2e-analyze"])
        _browse(chromium, runs_url, tmp_path / "p2", screenshot=shots / "runs.png")

        # The fit run's metric charts: plotly draws those in view, the first section's (train/...);
        # the sections below (val/domain/..., the diagnostics among them) render when scrolled to.
        metrics_url = f"{base}/#/experiments/{exp.experiment_id}/runs/{found['e2e-fit']}/model-metrics"
        dom = _dom_with(chromium, metrics_url, tmp_path / "p3", ["js-plotly-plot", 'title="train/ce"'])
        assert "e2e-fit" in dom
        _browse(chromium, metrics_url, tmp_path / "p4", screenshot=shots / "metrics.png")

        # The analysis heatmap in the artifact viewer, fetched by the UI from the run's artifacts.
        image_url = f"{base}/#/experiments/{exp.experiment_id}/runs/{found['e2e-analyze']}/artifacts/analyze/plane.png"
        _dom_with(chromium, image_url, tmp_path / "p5", ['<img alt="analyze/plane.png" src="blob:'])
        _browse(chromium, image_url, tmp_path / "p6", screenshot=shots / "heatmap.png")
        for name in ("runs.png", "metrics.png", "heatmap.png"):
            assert (shots / name).read_bytes()[:4] == b"\x89PNG", name
    finally:
        _stop_group(server, grace=20)  # the server's group: its uvicorn and huey workers too
