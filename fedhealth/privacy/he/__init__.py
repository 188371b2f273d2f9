"""Encrypted aggregation with CKKS (TenSEAL / SEAL).

Modules: ``keys`` (site identities, key wrapping, signatures), ``ceremony`` (consortium key
ceremony on disk), ``ckks`` (parameters, contexts, packing) and ``contributions`` (signed
contributions, membership tags, streaming sum and checked decryption). The security argument
is at the top of ``contributions``.
"""

from __future__ import annotations

from fedhealth.privacy.he.ceremony import (
    CoordinatorKeys,
    Registry,
    SiteKeys,
    add_site,
    init_consortium,
    load_coordinator_keys,
    load_site_keys,
)
from fedhealth.privacy.he.ckks import HEParams, flatten_state, unflatten
from fedhealth.privacy.he.contributions import (
    Contribution,
    DecryptionRequest,
    EncryptedSum,
    answers_agree,
    make_contribution,
    split_aggregate,
    verify_and_decrypt,
)

__all__ = [
    "Contribution",
    "CoordinatorKeys",
    "DecryptionRequest",
    "EncryptedSum",
    "HEParams",
    "Registry",
    "SiteKeys",
    "add_site",
    "answers_agree",
    "flatten_state",
    "init_consortium",
    "load_coordinator_keys",
    "load_site_keys",
    "make_contribution",
    "split_aggregate",
    "unflatten",
    "verify_and_decrypt",
]
