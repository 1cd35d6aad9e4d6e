"""The package was reorganised by concern (docs/architecture.md); the old module paths still load.

Configs and MLflow ``config.yaml`` artifacts written before the move name classes by their old paths,
and checkpoints pickle objects under old module names. ``tests/data/legacy_configs`` holds configs
dumped by the old code; each is parsed and instantiated here.
"""

import importlib
import pickle
import warnings

import pytest

from eaft_pl._moved import MOVED
from tests.conftest import REPO

LEGACY = REPO / "tests" / "data" / "legacy_configs"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_public_name_of_the_new_modules_is_reachable_at_its_old_path(old):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = importlib.import_module(f"eaft_pl.{old}")
    assert any(issubclass(w.category, DeprecationWarning) and "has moved" in str(w.message) for w in caught)
    for new in MOVED[old]:
        module = importlib.import_module(f"eaft_pl.{new}")
        for name in getattr(module, "__all__", []):
            assert getattr(legacy, name) is getattr(module, name), f"eaft_pl.{old}.{name}"


def test_an_unknown_name_at_an_old_path_says_where_the_module_went():
    legacy = importlib.import_module("eaft_pl.losses")
    with pytest.raises(AttributeError, match=r"eaft_pl.losses has moved \(eaft_pl.loss.stats"):
        legacy.no_such_thing  # noqa: B018


def test_real_modules_win_over_the_old_names():
    # eaft_pl.evaluation and eaft_pl.data kept their paths: the finder must not shadow them.
    moved_type = type(importlib.import_module("eaft_pl.losses"))
    for name in ("eaft_pl.data.base", "eaft_pl.evaluation.forgetting", "eaft_pl.module"):
        assert not isinstance(importlib.import_module(name), moved_type), name


def test_objects_pickled_under_old_module_names_unpickle():
    from eaft_pl.loss.gates import EAFTGate
    from eaft_pl.loss.reference_gates import FLOWGate

    # Protocol-0 pickles of a class reference, as an old checkpoint holds them.
    assert pickle.loads(b"ceaft_pl.losses\nEAFTGate\n.") is EAFTGate
    assert pickle.loads(b"ceaft_pl.reference_gates\nFLOWGate\n.") is FLOWGate


@pytest.mark.parametrize(
    "name, expected",
    [
        ("quickstart.yaml", {"gate": "StaticConflictMaskGate", "data": "ChatJsonlDataModule", "callback": "SaveHFModel"}),
        ("toyworld.yaml", {"gate": "FLOWGate", "data": "ToyWorldDataModule", "callback": "ForgettingCallback"}),
        ("recipe_fsdp.yaml", {"gate": "EAFTGate", "data": "HFChatDataModule", "callback": "SaveHFModel"}),
    ],
)
def test_configs_saved_with_old_class_paths_instantiate(name, expected, monkeypatch, tmp_path):
    from eaft_pl.cli import cli_main

    monkeypatch.chdir(REPO)  # the saved configs name data files relative to the repository
    text = (LEGACY / name).read_text()
    assert "eaft_pl.checkpoint_io.AtomicCheckpointIO" in text  # written by the old code, old paths
    # A saved config is `fit`'s: without a subcommand (run=False) its fit-only keys are dropped.
    config = tmp_path / name
    config.write_text("\n".join(line for line in text.splitlines() if not line.startswith(("ckpt_path:", "weights_only:"))))
    # No GPU here: the recipe's accelerator becomes the CPU, everything else is the saved file's.
    cli = cli_main(["--config", str(config), "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
    assert type(cli.model.gate).__name__ == expected["gate"]
    assert type(cli.model.gate).__module__.startswith("eaft_pl.loss.")
    assert type(cli.datamodule).__name__ == expected["data"]
    assert expected["callback"] in {type(cb).__name__ for cb in cli.trainer.callbacks}
    plugin = cli.trainer.strategy.checkpoint_io
    assert type(plugin).__module__ == "eaft_pl.training.checkpoint_io"
