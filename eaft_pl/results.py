"""Results files: what a command measured, stamped with where, when and how it was measured.

Every ``docs/results/*.json`` is ``{"meta": {...}, ...results...}``; the docs pages and the README
show only what such a file holds (``scripts/render_results.py`` writes their marked blocks). The
stamp (``meta``) makes a number traceable: the exact command, the commit (``-dirty`` when the tree
had uncommitted changes), the UTC date, the wall time and the machine (CPU count, torch's thread
count, the device and the versions that change numbers).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

from eaft_pl.fileio import atomic_write

__all__ = [
    "stamp", "write_results", "read_results", "git_commit", "machine", "command_line", "markdown_table", "emit", "finish",
]  # fmt: skip

#: The keys every stamp holds; :func:`read_results` refuses a file that lacks one.
META_KEYS = ("command", "commit", "date", "wall_s", "machine")


def git_commit(cwd: Optional[str] = None) -> str:
    """``git rev-parse HEAD`` of the checkout at ``cwd`` (default: this package's), with ``-dirty``
    appended when tracked or untracked files differ from it; ``"unknown"`` outside a git checkout
    (an installed wheel), so a stamp never fails for lack of git. ``docs/results/`` itself is left
    out of the check: the results files are what a command writes, not what it runs."""
    where = cwd or str(Path(__file__).resolve().parents[1])
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!docs/results"], cwd=where, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> Dict[str, Any]:
    """The facts of this machine that can change a number: CPU count, torch's intra-op thread count
    (it orders float reductions), the device, the versions of Python and the numeric stack, and the
    1-minute load average when the stamp was made (on a shared machine it says how much other work
    competed with the measurement; ``None`` where the OS has no load average)."""
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = "cpu"
    return {
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "transformers": _version("transformers"),
        "platform": platform.platform(),
        "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def stamp(command: str, wall_s: float) -> Dict[str, Any]:
    """The ``meta`` block of a results file written now by ``command`` after ``wall_s`` seconds.

    Args:
        command: The exact command line that produced the results, as a user would type it.
        wall_s: Its wall time in seconds.
    """
    if not isinstance(command, str) or not command.strip():
        raise ValueError("stamp: command must be the non-empty command line that produced the results")
    if wall_s < 0:
        raise ValueError(f"stamp: wall_s must be >= 0, got {wall_s}")
    return {
        "command": command,
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(float(wall_s), 1),
        "machine": machine(),
    }


def command_line(script: str, argv: Optional[list] = None) -> str:
    """``python <script> <args>`` for the running process: the command a stamp records."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", script, *args])  # quoted, so it can be pasted back into a shell


def write_results(path: "str | Path", results: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write ``{"meta": meta, **results}`` to ``path`` as indented JSON, atomically (a reader never
    sees half a file, and a failed write keeps the previous one)."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"write_results: meta lacks {missing}; build it with stamp(command, wall_s)")
    if "meta" in results:
        raise ValueError("write_results: results must not have a 'meta' key of their own")
    text = json.dumps({"meta": dict(meta), **results}, indent=2, sort_keys=False) + "\n"
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def read_results(path: "str | Path") -> Dict[str, Any]:
    """Read a results file, checking that it carries a complete stamp."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
        raise ValueError(f"{path} has no complete 'meta' stamp ({', '.join(META_KEYS)}); regenerate it with the command that wrote it")
    return data


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table of ``head`` and ``rows`` (each cell ``str()``-ed): the text a results file stores
    under a key so that a docs page can render a whole table with one block."""
    rows = [list(row) for row in rows]
    bad = [row for row in rows if len(row) != len(head)]
    if bad:
        raise ValueError(f"markdown_table: a row has {len(bad[0])} cells, the head {len(head)}: {bad[0]}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(record: Mapping[str, Any]) -> None:
    """Print one measured unit as one JSON line, flushed (a benchmark's stdout is JSON lines, one per
    unit of work, so a reader can follow a long run and parse it line by line)."""
    print(json.dumps(dict(record)), flush=True)


def finish(script: str, results: Mapping[str, Any], started: float, out: "Optional[str | Path]", argv: Optional[list] = None) -> Dict[str, Any]:
    """End a benchmark: stamp ``results`` with the running command (``python <script> <argv>``) and the
    wall time since ``started`` (a ``time.perf_counter()`` value), print them as the last JSON line
    (``{"summary": true, "meta": ..., **results}``) and, when ``out`` is given, write them there as a
    results file. Returns the stamp."""
    meta = stamp(command_line(script, argv), time.perf_counter() - started)
    emit({"summary": True, "meta": meta, **results})
    if out is not None:
        write_results(out, results, meta)
    return meta
