"""Encrypted aggregation with CKKS (TenSEAL / SEAL).

Modules: ``keys`` (site identities, key wrapping, signatures), ``ceremony`` (consortium key
ceremony on disk), ``ckks`` (parameters, contexts, packing) and ``contributions`` (signed
contributions, membership tags, streaming sum and checked decryption). The security argument
is at the top of ``contributions``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so that importing this package does not load
# TenSEAL: a deployed site starts a process per message.
_EXPORTS = {
    "CoordinatorKeys": "ceremony",
    "Registry": "ceremony",
    "SiteKeys": "ceremony",
    "add_site": "ceremony",
    "init_consortium": "ceremony",
    "load_coordinator_keys": "ceremony",
    "load_site_keys": "ceremony",
    "HEParams": "ckks",
    "flatten_state": "ckks",
    "unflatten": "ckks",
    "Contribution": "contributions",
    "DecryptionRequest": "contributions",
    "EncryptedSum": "contributions",
    "answers_agree": "contributions",
    "make_contribution": "contributions",
    "split_aggregate": "contributions",
    "verify_and_decrypt": "contributions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
