"""Package roots that load their public names on first use (PEP 562).

Shared by the three package roots: importing one submodule (e.g. the CLI's errors) must not pull in
numba, OpenCV, SciPy and SimpleITK through ``__init__``. Standard library only.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[list[str], Callable, Callable]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for the package ``package``.

    ``names`` maps each public name to the submodule (relative to the package) that defines it; a name is
    imported on first access and then cached in the package's namespace.
    """
    exported = list(names)

    def __getattr__(name: str):
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exported))

    return exported, __getattr__, __dir__
