"""Writing files so that a crash never leaves a half-written one where a reader looks."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_directory"]


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


def atomic_directory(path: Path, write: Callable[[Path], Any], replace: bool = True) -> Path:
    """Call ``write`` on an empty temporary folder next to ``path`` and rename it onto ``path``: a
    reader never sees a half-written folder, and a failed or killed write leaves only a hidden
    ``.<name>.*`` folder that no reader looks at.

    Args:
        path: The folder to create.
        write: Fills the temporary folder it is given.
        replace: Remove a folder already at ``path`` first. With ``False`` a folder that appeared
            there meanwhile (another process finishing the same work) wins and this one is dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        # mkdtemp makes the folder private (0700); give it the mode a plain mkdir would have, so that a
        # shared cache or an exported model is readable by whoever may read its parent.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        if replace:
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            if replace or not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # the other writer's folder is as good as ours
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
