"""Results files and the docs' generated blocks: a page shows only what a results file holds, every
results file carries its stamp, and a page whose numbers differ from its files fails the check."""

import importlib.util
import json
import re

import pytest

from conftest import REPO
from eaft_pl.results import read_results, stamp, write_results

spec = importlib.util.spec_from_file_location("render_results", REPO / "scripts" / "render_results.py")
render_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_results)


def test_a_stamp_says_command_commit_date_and_machine():
    meta = stamp("python scripts/x.py --a 1", 12.345)
    assert meta["command"] == "python scripts/x.py --a 1" and meta["wall_s"] == 12.3
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", meta["commit"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", meta["date"])
    import torch

    assert meta["machine"]["threads"] == torch.get_num_threads()
    assert meta["machine"]["torch"] == torch.__version__
    assert set(meta["machine"]) == {"cpus", "threads", "device", "python", "torch", "lightning", "transformers", "platform", "load_1min"}
    assert meta["machine"]["load_1min"] is None or meta["machine"]["load_1min"] >= 0
    with pytest.raises(ValueError, match="command"):
        stamp("", 1.0)
    with pytest.raises(ValueError, match="wall_s"):
        stamp("python x.py", -1.0)


def test_results_round_trip_and_refuse_a_file_without_a_stamp(tmp_path):
    path = tmp_path / "r.json"
    meta = stamp("python x.py", 1.0)
    write_results(path, {"rows": {"a": 1}}, meta)
    assert read_results(path) == {"meta": meta, "rows": {"a": 1}}
    with pytest.raises(ValueError, match="meta lacks"):
        write_results(path, {"rows": {}}, {"command": "x"})
    path.write_text(json.dumps({"rows": {}}))
    with pytest.raises(ValueError, match="no complete 'meta' stamp"):
        read_results(path)
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path / "missing.json")


def test_every_committed_results_file_is_stamped():
    files = sorted((REPO / "docs" / "results").glob("*.json"))
    assert files, "docs/results/ holds no results file"
    for path in files:
        meta = read_results(path)["meta"]
        assert meta["command"].startswith(("python ", "make ")), path
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", meta["commit"]), path


def _fake_results(monkeypatch, tmp_path, value):
    rows = {"sft@0.001": {"domain": {"mean": value}, "curve": [[0, 0.1], [20, 0.3]]}, "element symbol": {"acc": 0.8}, "a/b": {"acc": 0.5}}
    write_results(tmp_path / "demo.json", {"table": "| a |\n|---|\n| 1 |", "rows": rows}, stamp("python d.py", 3.0))
    monkeypatch.setattr(render_results, "RESULTS", tmp_path)


def test_blocks_are_filled_from_the_file_inline_and_as_tables(monkeypatch, tmp_path):
    _fake_results(monkeypatch, tmp_path, 0.183)
    page = (
        "Domain <!-- results:demo rows/sft@0.001/domain/mean .1% -->99.9%<!-- /results --> today.\n"
        "<!-- results:demo table -->\nstale\n<!-- /results -->\n<!-- results:demo stamp --><!-- /results -->"
    )
    out = render_results.render(page)
    assert "Domain <!-- results:demo rows/sft@0.001/domain/mean .1% -->18.3%<!-- /results --> today." in out
    assert "<!-- results:demo table -->\n| a |\n|---|\n| 1 |\n<!-- /results -->" in out
    assert "Written by `python d.py` at commit" in out and "in 3 s" in out


def test_a_key_part_with_a_space_is_written_with_percent_20(monkeypatch, tmp_path):
    _fake_results(monkeypatch, tmp_path, 0.183)
    out = render_results.render("<!-- results:demo rows/element%20symbol/acc .2f -->?<!-- /results -->")
    assert out == "<!-- results:demo rows/element%20symbol/acc .2f -->0.80<!-- /results -->"
    out = render_results.render("<!-- results:demo rows/a%2Fb/acc .2f -->?<!-- /results -->")  # a slash inside a key
    assert out == "<!-- results:demo rows/a%2Fb/acc .2f -->0.50<!-- /results -->"
    assert render_results.render(out) == out  # filling twice changes nothing
    # a list is indexed from the start or, negative, from the end (a curve's last point)
    assert render_results.render("<!-- results:demo rows/sft@0.001/curve/-1/1 -->?<!-- /results -->").endswith("-->0.3<!-- /results -->")
    assert render_results.render("<!-- results:demo rows/sft@0.001/curve/0/0 -->?<!-- /results -->").endswith("-->0<!-- /results -->")
    with pytest.raises(SystemExit, match="stopped at '-3'"):
        render_results.render("<!-- results:demo rows/sft@0.001/curve/-3/1 -->?<!-- /results -->")


def test_a_missing_key_or_file_is_an_error_not_an_empty_block(monkeypatch, tmp_path):
    _fake_results(monkeypatch, tmp_path, 0.5)
    with pytest.raises(SystemExit, match="no key 'rows/dft"):
        render_results.render("<!-- results:demo rows/dft -->x<!-- /results -->", where="p.md")
    with pytest.raises(SystemExit, match="is a dict"):
        render_results.render("<!-- results:demo rows -->x<!-- /results -->", where="p.md")
    with pytest.raises(SystemExit, match="no results file"):
        render_results.render("<!-- results:nope table -->x<!-- /results -->", where="p.md")
    # A known study whose file is not there yet says which command writes it.
    out = render_results.render("<!-- results:toyworld_study table -->\n<!-- /results -->")
    assert "*Not measured for the current code yet: `make study` writes `docs/results/toyworld_study.json`.*" in out
    out = render_results.render("| <!-- results:toyworld_study rows/sft@0.001/domain/mean .1% --><!-- /results --> |")
    assert out.endswith("-->(not measured yet: `make study`)<!-- /results --> |")


def test_the_check_fails_on_an_edited_number_and_passes_once_regenerated(monkeypatch, tmp_path):
    _fake_results(monkeypatch, tmp_path, 0.183)
    page = tmp_path / "page.md"
    page.write_text("base <!-- results:demo rows/sft@0.001/domain/mean .1% -->11.7%<!-- /results -->\n")
    monkeypatch.setattr(render_results, "targets", lambda: [page])
    monkeypatch.setattr(render_results, "REPO", tmp_path)
    assert render_results.main(["--check"]) == 1  # the typed-in 11.7% is not what the file holds
    assert "11.7%" in page.read_text()  # --check changes nothing
    assert render_results.main([]) == 0
    assert "18.3%" in page.read_text()
    assert render_results.main(["--check"]) == 0


def test_the_repository_pages_show_what_their_results_files_hold():
    # CI's check of every committed page and the README (the same as `scripts/render_results.py --check`).
    stale = []
    for path in render_results.targets():
        text = path.read_text()
        if render_results.render(text, where=str(path)) != text:
            stale.append(str(path.relative_to(REPO)))
    assert not stale, f"pages differ from docs/results/ (run python scripts/render_results.py): {stale}"


def test_markdown_table_renders_head_and_rows_and_refuses_a_ragged_row():
    from eaft_pl.results import markdown_table

    assert markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | y |"
    with pytest.raises(ValueError, match="a row has 1 cells, the head 2"):
        markdown_table(["a", "b"], [[1]])


def test_finish_prints_the_stamped_summary_last_and_writes_the_file(tmp_path, capsys):
    import time

    from eaft_pl.results import emit, finish

    emit({"variant": "a", "seconds": 1.5})
    meta = finish("scripts/bench_x.py", {"ratios": {"a_over_b": 0.5}}, time.perf_counter() - 2.0, tmp_path / "r.json", ["--out", "r.json"])
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines[:1]] == [{"variant": "a", "seconds": 1.5}]  # one unit, one line
    last = json.loads(lines[-1])
    assert last["summary"] is True and last["ratios"] == {"a_over_b": 0.5} and last["meta"] == meta
    assert meta["command"] == "python scripts/bench_x.py --out r.json" and meta["wall_s"] >= 2.0
    assert read_results(tmp_path / "r.json") == {"meta": meta, "ratios": {"a_over_b": 0.5}}
    finish("scripts/bench_x.py", {"r": 1}, time.perf_counter(), None, [])  # no --out: prints only
    assert json.loads(capsys.readouterr().out)["r"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_every_benchmark_the_docs_show_has_its_producer_and_make_target():
    """Each bench_* results file a page shows is written by its script's --out, which PRODUCERS and
    `make benchmarks` both name, so the pages say which command refreshes their numbers."""
    makefile = (REPO / "Makefile").read_text()
    listed = re.search(r"^BENCHMARKS := (.+)$", makefile, re.M).group(1).split()
    shown = {m for path in render_results.targets() for m in re.findall(r"<!-- results:(bench_[a-z_]+) ", path.read_text())}
    assert shown, "no page shows a benchmark"
    for name in sorted(shown):
        assert render_results.PRODUCERS[name] == f"python scripts/{name}.py --out docs/results/{name}.json", name
        assert name.removeprefix("bench_") in listed, f"`make benchmarks` does not run scripts/{name}.py"
        assert "--out" in (REPO / "scripts" / f"{name}.py").read_text(), name


def test_the_hf_cache_benchmark_writes_a_stamped_file_with_one_line_per_setup(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "bench_hf_cache.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "scripts/bench_hf_cache.py", "--rows", "40", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]  # every stdout line is JSON
    assert [line.get("measure") for line in lines[:-1]] == ["hf_first_setup", "hf_cached_setup", "jsonl_setup"]
    data = read_results(out)
    assert data["meta"]["command"] == f"python scripts/bench_hf_cache.py --rows 40 --out {out}"
    first, cached = (data["measures"][k]["seconds"] for k in ("hf_first_setup", "hf_cached_setup"))
    assert data["ratios"]["cached_over_first"] == round(cached / first, 4)
    assert {m["examples"] for m in data["measures"].values()} == {40}
