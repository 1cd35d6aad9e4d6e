"""Fill the docs' and the README's marked blocks from the results files in docs/results/.

A page never types a measured number: it marks where one goes, and this script (and the MkDocs hook
that is this same file, see mkdocs.yml ``hooks:``) writes the value a results file holds::

    <!-- results:toyworld_demo table -->
    ...replaced by the string at key "table" of docs/results/toyworld_demo.json...
    <!-- /results -->

    base domain <!-- results:toyworld_demo rows/sft@0.001/base_domain/mean .1% -->18.3%<!-- /results -->

The key is a ``/``-separated path into the JSON (``%20`` stands for a space in a part, since a space
ends the key: ``acc_by_category/element%20symbol/acc``, and ``%2F`` for a slash: ``final/prose%2Fppl``); an optional Python format spec follows it
(``.1%``, ``.0f``); the key ``stamp`` renders the file's ``meta`` (command, commit, date, machine,
wall time) as one sentence. A missing key is an error, never an empty block. A missing file of
:data:`PRODUCERS` (a long study not yet run for the current code) renders as a note naming the
command that writes it; any other missing file is an error.

    python scripts/render_results.py           # rewrite README.md and docs/*.md in place
    python scripts/render_results.py --check   # exit 1 if any of them differs from its files (CI)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
#: The command that writes each results file the docs show.
PRODUCERS = {
    "toyworld_demo": "make results",
    "toyworld_small": "make results",
    "toyworld_study": "make study",
    "toyworld_figures": "make figures",
    "real_demo": "make real-results",
    "real_pilot": "make real-pilot",
    "real_study": "make real-study",
    "real_gemma": "make real-gemma",
    "bench_hf_memory": "python scripts/bench_hf_memory.py --out docs/results/bench_hf_memory.json",
    "bench_loss": "python scripts/bench_loss.py --out docs/results/bench_loss.json",
    "bench_step": "python scripts/bench_step.py --out docs/results/bench_step.json",
    "bench_diagnostics": "python scripts/bench_diagnostics.py --out docs/results/bench_diagnostics.json",
    "bench_packing": "python scripts/bench_packing.py --out docs/results/bench_packing.json",
    "bench_nonfinite_check": "python scripts/bench_nonfinite_check.py --out docs/results/bench_nonfinite_check.json",
    "bench_hf_cache": "python scripts/bench_hf_cache.py --out docs/results/bench_hf_cache.json",
    "real_domains_base": "python scripts/real_domains_base.py --n_test 30 --batch_size 10 --output docs/results/real_domains_base.json",
    "real_base_suites": "python scripts/measure_general_suites.py --output docs/results/real_base_suites.json",
    "gemma_chunked": "python scripts/bench_hf_memory.py --model gemma3-270m --batch 2 --seq 128 --steps 2 --chunk_size 64 --out docs/results/gemma_chunked.json",
    "real_model_load": "python scripts/bench_model_load.py --models smollm2-135m-instruct gemma3-270m --out docs/results/real_model_load.json",
    "real_topk_entropy": "python scripts/real_topk_entropy.py --n_examples 200 --n_greedy 8 --ks 5 10 20 50 --batch_size 16 --out docs/results/real_topk_entropy.json --figure docs/img/real_topk_entropy.png",
}
#: ``<!-- results:NAME KEY [FORMAT] -->old<!-- /results -->``; old may span lines.
BLOCK = re.compile(r"<!-- results:(?P<name>[A-Za-z0-9_.-]+) (?P<key>[^ >]+)(?: (?P<fmt>[^ >]+))? -->(?P<old>.*?)<!-- /results -->", re.S)


def _read(name: str, cache: Dict[str, Any]) -> Dict[str, Any]:
    if name not in cache:
        sys.path.insert(0, str(REPO))  # the checkout's eaft_pl, also when MkDocs loads this file as a hook
        from eaft_pl.results import read_results

        cache[name] = read_results(RESULTS / f"{name}.json")
    return cache[name]


def describe_stamp(meta: Dict[str, Any]) -> str:
    """One sentence saying which command, commit and machine produced a results file."""
    m = meta["machine"]
    # Stamps written before the load average was recorded lack it; their sentence stays as it was.
    load = f", load average {m['load_1min']:.1f}" if m.get("load_1min") is not None else ""
    return (
        f"Written by `{meta['command']}` at commit `{meta['commit'][:12]}` on {meta['date'][:10]} "
        f"in {meta['wall_s']:.0f} s ({m['cpus']} CPUs, {m['threads']} torch threads, {m['device']}, "
        f"torch {m['torch']}, Lightning {m['lightning']}{load})."
    )


def lookup(name: str, key: str, fmt: Optional[str], cache: Dict[str, Any]) -> str:
    """The text of one block: the value at ``key`` of results file ``name``, formatted by ``fmt``."""
    data = _read(name, cache)
    if key == "stamp":
        return describe_stamp(data["meta"])
    value: Any = data
    for part in (p.replace("%20", " ").replace("%2F", "/") for p in key.split("/")):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]  # -1: the last, as a curve's final point
        else:
            raise KeyError(f"docs/results/{name}.json has no key {key!r} (stopped at {part!r})")
    if fmt:
        return format(value, fmt)
    if not isinstance(value, (str, int, float)):
        raise TypeError(f"docs/results/{name}.json key {key!r} is a {type(value).__name__}: point the block at a string or a number")
    return str(value)


def render(text: str, cache: Optional[Dict[str, Any]] = None, where: str = "") -> str:
    """``text`` with every marked block refilled from its results file."""
    cache = {} if cache is None else cache

    def fill(match: "re.Match[str]") -> str:
        name = match["name"]
        if name in PRODUCERS and not (RESULTS / f"{name}.json").is_file():
            # Short inside a sentence or a table cell; a block says which file the command writes.
            value = f"(not measured yet: `{PRODUCERS[name]}`)"
            if "\n" in match["old"]:
                value = f"*Not measured for the current code yet: `{PRODUCERS[name]}` writes `docs/results/{name}.json`.*"
            return _wrap(match, value)
        try:
            value = lookup(name, match["key"], match["fmt"], cache)
        except (KeyError, TypeError, ValueError, FileNotFoundError) as err:
            raise SystemExit(f"{where}: {err}") from err
        return _wrap(match, value)

    return BLOCK.sub(fill, text)


def _wrap(match: "re.Match[str]", value: str) -> str:
    head = match.group(0).split("-->", 1)[0] + "-->"
    # A block that spans lines keeps its own lines (tables); an inline block stays inline.
    body = f"\n{value}\n" if "\n" in match["old"] or "\n" in value else value
    return f"{head}{body}<!-- /results -->"


def targets() -> List[Path]:
    """The files whose blocks this script owns: the README and every docs page."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file's blocks differ from the results files")
    opts = ap.parse_args(argv)
    cache: Dict[str, Any] = {}
    stale = []
    for path in targets():
        text = path.read_text()
        new = render(text, cache, str(path.relative_to(REPO)))
        if new != text:
            stale.append(path.relative_to(REPO))
            if not opts.check:
                path.write_text(new)
    if opts.check and stale:
        print("These files show numbers that are not in docs/results/ (run `python scripts/render_results.py`):", file=sys.stderr)
        for path in stale:
            print(f"  {path}", file=sys.stderr)
        return 1
    print(("stale: " if opts.check else "rewrote: ") + (", ".join(map(str, stale)) or "nothing"))
    return 0


# ---- the MkDocs hook (mkdocs.yml: hooks: [scripts/render_results.py]) ----------------------------


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Fill the page's blocks at build time, so the site shows the results files even where a page's
    committed text is stale (CI's ``--check`` catches that)."""
    return render(markdown, where=str(getattr(page.file, "src_path", page)))


if __name__ == "__main__":
    sys.exit(main())
