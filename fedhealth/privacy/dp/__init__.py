"""Differential privacy for fedhealth: accounting, DP-SGD, site-level DP, policy, ledger.

One entry point per job, accountants swappable by name (``"rdp"``, ``"prv"``):

* :mod:`~fedhealth.privacy.dp.accounting` -- ε for a plan, noise for a target,
  and the stateful per-experiment :class:`PrivacyAccountant`.
* :mod:`~fedhealth.privacy.dp.local` -- :func:`make_private`, record-level DP-SGD.
* :mod:`~fedhealth.privacy.dp.site_level` -- clip + noise share per site.
* :mod:`~fedhealth.privacy.dp.policy` -- :func:`check_request` against a site's policy.
* :mod:`~fedhealth.privacy.dp.ledger` -- the site's durable, hash-chained ledger.
* :mod:`~fedhealth.privacy.dp.plan` -- a site's σ, q and steps for an experiment.
* :mod:`~fedhealth.privacy.dp.randomness` -- secret, site-derived seeds for noise and sampling.

Names are imported lazily, so ``fedhealth.privacy.dp.ledger`` and ``.policy``
load without torch/Opacus.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedhealth._lazy import lazy_exports

_EXPORTS = {
    "ACCOUNTANTS": "accounting",
    "MAX_NOISE_MULTIPLIER": "accounting",
    "PrivacyAccountant": "accounting",
    "check_delta": "accounting",
    "epsilon_for_history": "accounting",
    "epsilon_spent": "accounting",
    "noise_for_target": "accounting",
    "GRAD_SAMPLE_MODES": "local",
    "PrivateTraining": "local",
    "make_private": "local",
    "pick_grad_sample_mode": "local",
    "sample_rate": "local",
    "steps_per_epoch": "local",
    "validate_model": "local",
    "LedgerCorruptError": "ledger",
    "LedgerEntry": "ledger",
    "LedgerError": "ledger",
    "PrivacyLedger": "ledger",
    "PolicyViolation": "policy",
    "PrivacyPolicy": "policy",
    "RoundRequest": "policy",
    "check_participation": "policy",
    "check_request": "policy",
    "DPPlan": "plan",
    "plan_for_site": "plan",
    "add_noise_share": "site_level",
    "clip_update": "site_level",
    "effective_noise_multiplier": "site_level",
    "noise_share_std": "site_level",
    "site_level_epsilon": "site_level",
}

__all__ = sorted(_EXPORTS)

# Annotated so mypy still sees a module __getattr__ (names resolve to Any).
__getattr__: Callable[[str], Any]
__dir__: Callable[[], list[str]]
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
