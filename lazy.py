"""Submodules as attributes: `import jaxlm; jaxlm.model.chat.render_chat(...)` works
in a notebook without importing each submodule first (and without importing every
module, and jax, when `jaxlm` itself is imported)."""

from __future__ import annotations

import importlib


def submodule_getattr(package: str):
    """A module `__getattr__` for `package` that imports `package.NAME` on first use."""
    def __getattr__(name: str):
        if not name.startswith("__"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
