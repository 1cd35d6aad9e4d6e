"""Writing files so that a crash never leaves a half-written one where a reader looks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write"]


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write`` on a temporary file next to ``path`` (same suffix, so matplotlib picks the
    format) and rename it onto ``path``: a reader never sees a half-written file, and a failed write
    leaves the previous file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
