"""Lazy package exports (PEP 562): a package names its public objects without importing the modules
that define them, so importing one light submodule (the loss functions, the evaluation tasks) does
not drag in Lightning through the package's ``__init__``."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose ``exports`` map a name to the module defining it.

    A name is imported on first access and then cached in the package's namespace, so later look-ups
    are plain attribute reads.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
