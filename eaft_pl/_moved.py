"""Old module paths of eaft-pl, kept importable after the package was reorganised by concern.

Configs and MLflow ``config.yaml`` artifacts written before the move name classes by their old paths
(``class_path: eaft_pl.losses.EAFTGate``), and pickled checkpoints hold old module names. An import of
an old path gets a small module that looks its attributes up in the new modules, with a
``DeprecationWarning`` that names the new path. Nothing is imported until an old path is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

__all__ = ["MOVED", "install"]

#: old module (under ``eaft_pl.``) -> the new modules that hold what it held, searched in order.
MOVED: Dict[str, Tuple[str, ...]] = {
    "losses": ("loss.stats", "loss.gates", "loss.functional"),
    "reference_gates": ("loss.reference_gates", "loss.conflict"),
    "chunked": ("loss.chunked",),
    "metrics": ("loss.metrics",),
    "hub": ("models.loading",),
    "tiny": ("models.char_tokenizer",),
    "resume": ("training.resume",),
    "interrupt": ("training.interrupt",),
    "checkpoint_io": ("training.checkpoint_io",),
    "numerics": ("training.numerics",),
    "strategies": ("training.strategies",),
    "sharded": ("training.sharded",),
    "lora": ("training.lora",),
    "export": ("training.export",),
    "callbacks": ("training.export", "analysis.predictions"),
    "diagnostics": ("analysis.statistics",),
    "analyze": ("analysis.analyze", "cli"),
    "compare": ("analysis.compare",),
    "plots": ("analysis.plots",),
    "cohort": ("evaluation.cohort",),
    "training_diagnostics": ("evaluation.diagnostics",),
    "experiment": ("experiments.toyworld.driver",),
    "data.toy": ("experiments.toyworld.datamodule",),
    "data.toyworld": ("experiments.toyworld.world",),
}


class _MovedModule(types.ModuleType):
    """Stands at an old path; every attribute comes from the first new module that has it."""

    def __init__(self, name: str, targets: Sequence[str]) -> None:
        super().__init__(name, f"Moved: see {', '.join(targets)}.")
        self.__targets = tuple(targets)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self.__targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"{self.__name__} has moved ({', '.join(self.__targets)}), and none of them has {attr!r}")


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname.startswith("eaft_pl.") and fullname[len("eaft_pl.") :] in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = [f"eaft_pl.{t}" for t in MOVED[spec.name[len("eaft_pl.") :]]]
        warnings.warn(
            f"{spec.name} has moved to {' / '.join(targets)}; update the import or class_path", DeprecationWarning, stacklevel=2
        )
        return _MovedModule(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (after the normal finders: real modules win)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
