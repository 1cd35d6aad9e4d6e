"""When to draw progress bars, and drawing them: on when a person watches stderr (a terminal), off in
logs and pipes, and off wherever the trainer's own progress bar is off (``--trainer.enable_progress_bar=false``,
as the toy-world driver's one-line-per-run display sets it)."""

from __future__ import annotations

import sys
from typing import Any, Iterable, Optional, TextIO, TypeVar

__all__ = ["interactive", "progress", "trainer_progress"]

T = TypeVar("T")


def interactive(stream: Optional[TextIO] = None) -> bool:
    """Whether ``stream`` (stderr by default, where the bars go) is a terminal; a closed or replaced
    stream without ``isatty`` counts as not one."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def trainer_progress(trainer: Any, stream: Optional[TextIO] = None) -> bool:
    """Whether a callback or pass run by ``trainer`` draws a bar: only on rank zero, only when the
    trainer shows its own progress bar (Lightning keeps ``progress_bar_callback`` None when it is
    disabled), and only on a terminal."""
    if trainer is None or not getattr(trainer, "is_global_zero", True):
        return False
    return getattr(trainer, "progress_bar_callback", None) is not None and interactive(stream)


def progress(iterable: Iterable[T], desc: str, enabled: bool, total: Optional[int] = None) -> Iterable[T]:
    """``iterable`` itself, or wrapped in a tqdm bar on stderr that disappears when done."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # only when a bar is drawn

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
