"""When progress bars are drawn: the trainer's bar by default only on a terminal (an explicit
--trainer.enable_progress_bar wins), and the bars of the reference pass and the evaluation
callbacks only where the trainer's own bar is on, on rank zero, on a terminal."""

import io
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest

from eaft_pl.cli import cli_main
from eaft_pl.progress import interactive, progress, trainer_progress
from test_cli import quick_args


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_only_a_terminal_is_interactive(tmp_path):
    assert interactive(Terminal()) and not interactive(io.StringIO())
    closed = open(tmp_path / "log", "w")
    closed.close()
    assert not interactive(closed)  # isatty on a closed file raises ValueError
    assert not interactive(object())  # a replaced stream without isatty


@pytest.mark.parametrize("enable, stream, rank_zero, drawn", [
    (True, Terminal(), True, True),
    (False, Terminal(), True, False),    # the trainer's bar is off: so are the callbacks'
    (True, io.StringIO(), True, False),  # a log file or a pipe
    (True, Terminal(), False, False),    # other ranks never draw
])  # fmt: skip
def test_callbacks_draw_a_bar_only_where_the_trainer_does(enable, stream, rank_zero, drawn):
    trainer = pl.Trainer(logger=False, enable_progress_bar=enable, enable_checkpointing=False, enable_model_summary=False)
    view = SimpleNamespace(progress_bar_callback=trainer.progress_bar_callback, is_global_zero=rank_zero)
    assert trainer_progress(view, stream) is drawn
    assert trainer_progress(None, stream) is False  # a module outside a trainer


def test_progress_wraps_only_when_enabled():
    items = [1, 2, 3]
    assert progress(items, "x", enabled=False) is items
    bar = progress(items, "x", enabled=True, total=3)
    assert bar is not items and list(bar) == items


@pytest.mark.parametrize("stream, extra, shown", [
    (Terminal(), [], True),
    (io.StringIO(), [], False),
    (Terminal(), ["--trainer.enable_progress_bar=false"], False),  # the toy-world driver's one-line display
])  # fmt: skip
def test_fit_shows_lightnings_bar_on_a_terminal_unless_told(stream, extra, shown, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stderr", stream)
    cli = cli_main([*quick_args(tmp_path), *extra], run=False)  # the shipped quickstart config, not run
    assert (cli.trainer.progress_bar_callback is not None) is shown
