"""Encrypted aggregation with CKKS (TenSEAL / SEAL).

Modules, bottom up: ``names`` (wire names, import-free), ``binding`` (canonical framing of a
round), ``keys`` (site identities, key wrapping, signatures), ``ckks`` (parameters, contexts,
slot packing), ``ledger`` (a site's per-round memory), ``ceremony`` (consortium key ceremony on
disk), ``records`` (signed contributions and decryption requests), ``tags`` (membership
tags), then one module per step of a round: ``contribute`` (site: encrypt, tag, sign),
``encrypted_sum`` (coordinator: streaming sum), ``decrypt`` (site: checked decryption),
``answers`` (coordinator: split and compare the quorum's answers), and ``wire`` (Flower
records). The protocol and its security argument are in ``docs/security.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedhealth._lazy import lazy_exports

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
    "Contribution": "records",
    "DecryptionRequest": "records",
    "EncryptedSum": "encrypted_sum",
    "SiteLedger": "ledger",
    "answers_agree": "answers",
    "make_contribution": "contribute",
    "split_aggregate": "answers",
    "verify_and_decrypt": "decrypt",
}

__all__ = sorted(_EXPORTS)

# Annotated so mypy still sees a module __getattr__ (names resolve to Any).
__getattr__: Callable[[str], Any]
__dir__: Callable[[], list[str]]
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
