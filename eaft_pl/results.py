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
from typing import Any, Dict, Mapping, Optional

from eaft_pl.fileio import atomic_write

__all__ = ["stamp", "write_results", "read_results", "git_commit", "machine", "command_line", "publish"]

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
    (it orders float reductions), the device, and the versions of Python and the numeric stack."""
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


def publish(script: str, argv: Optional[list], report: Mapping[str, Any], started: float, out: "str | Path | None") -> Dict[str, Any]:
    """A measuring script's last step: stamp ``report`` (the command ``python <script> <argv>``, the
    wall time since ``started``, a ``time.time()``), print it as indented JSON and, when ``out`` is
    given, write it there as a results file. Returns the stamped object that was printed.

    ``argv`` is what the user typed (``None``: this process's ``sys.argv[1:]``), so a script's own
    worker flags, which the parent never sees, stay out of the recorded command."""
    meta = stamp(command_line(script, argv), time.time() - started)
    print(json.dumps({"meta": meta, **report}, indent=2))
    if out is not None:
        write_results(out, report, meta)
    return {"meta": meta, **dict(report)}


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
