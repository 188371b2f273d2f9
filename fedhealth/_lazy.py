"""Lazy re-exports for a package ``__init__``: a name's module is imported on first use.

Used where importing the package must stay cheap: :mod:`fedhealth.privacy.dp` (the ledger
and policy load without torch/Opacus) and :mod:`fedhealth.privacy.he` (a site process per
message must not load TenSEAL).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build a package's module-level ``__getattr__`` and ``__dir__`` (PEP 562).

    Parameters
    ----------
    namespace
        The package's ``globals()``; a name, once loaded, is cached there so that
        ``__getattr__`` is not consulted again.
    exports
        Public name -> submodule (relative to the package) that defines it.

    Returns
    -------
    tuple
        ``(__getattr__, __dir__)``, to assign at module level.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
