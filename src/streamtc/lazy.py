"""Names a package imports from its submodules on first use (PEP 562), so that importing it, and
`streamtc --help` or an argument refusal, does not wait seconds for torch and transformers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_names(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: each name of `table` (name -> submodule) is imported
    from its submodule when first asked for and then kept as the package's own attribute."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{table[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__all__ = ["lazy_names"]
