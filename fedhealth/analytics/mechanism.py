"""The Gaussian mechanism of the analytics: noise per query, and the ε it spends.

Every query releases a vector whose L2 sensitivity (adding or removing one
record of the cohort) follows from the declared schema alone (:func:`sensitivity`).
It gets Gaussian noise of standard deviation ``σ_q · Δ_q``. In Rényi DP a
Gaussian with noise multiplier σ costs ``α / (2σ²)`` at every order α, so the
queries of one analysis compose *exactly* into a single Gaussian with
``σ_eff = (Σ_q σ_q⁻²)^(-1/2)``; its ε is computed by the project's accountant
(Opacus's RDP conversion, as :func:`fedhealth.privacy.dp.accounting.epsilon_for_history`
with sample rate 1 and one step, over a wider grid of orders).

Budget split: the analysis's ε gives a total "ρ" = 1/(2σ_total²); queries with
their own ε take ρ_q = 1/(2σ_q²) of it, and the others share what is left
equally.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Opacus's RDP orders plus large ones: a small ε (a large σ) is tightest at a large order.
ORDERS = (
    [1 + x / 10.0 for x in range(1, 100)]
    + list(range(12, 64))
    + [80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 1536, 2048, 4096]
)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """ε of one Gaussian release with noise multiplier σ (RDP α/(2σ²), Opacus's conversion).

    This is what Opacus's RDP accountant computes for sample rate 1 and one step
    (:func:`fedhealth.privacy.dp.accounting.epsilon_for_history`), over a wider grid of
    orders so that small ε are not overstated.
    """
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = np.asarray(ORDERS, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")  # bound stays valid
        eps, _ = get_privacy_spent(orders=orders, rdp=orders / (2.0 * sigma**2), delta=delta)
    return float(eps)


def sigma_for_epsilon(epsilon: float, delta: float) -> float:
    """Smallest noise multiplier of one Gaussian release (sensitivity 1) within ``epsilon``.

    Parameters
    ----------
    epsilon, delta : float
        The target (ε, δ).

    Returns
    -------
    float
        σ with ``gaussian_epsilon(σ, δ) <= epsilon`` (bisection to relative 1e-6).
    """
    lo, hi = 1e-3, 1e4
    if gaussian_epsilon(hi, delta) > epsilon:
        raise ValueError(f"ε = {epsilon:g} is unreachable (δ = {delta:g})")
    while hi / lo > 1 + 1e-6:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if gaussian_epsilon(mid, delta) > epsilon else (lo, mid)
    return hi


def plan_noise(queries: Sequence[Any], privacy: Any) -> list[float]:
    """The noise multiplier of each query.

    Parameters
    ----------
    queries : sequence of query models
        Each with an optional ``epsilon``.
    privacy : AnalysisPrivacySection
        ``epsilon`` (may be None when every query has its own) and ``delta``.

    Returns
    -------
    list of float
        σ_q per query, in order.

    Raises
    ------
    ValueError
        If the queries' own ε leave nothing for the others under ``privacy.epsilon``.
    """
    delta = float(privacy.delta)
    own = {i: sigma_for_epsilon(q.epsilon, delta) for i, q in enumerate(queries) if q.epsilon}
    rest = [i for i, q in enumerate(queries) if not q.epsilon]
    sigmas = [0.0] * len(queries)
    for i, s in own.items():
        sigmas[i] = s
    if rest:
        total = 1.0 / (2.0 * sigma_for_epsilon(privacy.epsilon, delta) ** 2)
        left = total - sum(1.0 / (2.0 * s**2) for s in own.values())
        if left <= total * 1e-6:
            raise ValueError(
                f"the queries' own `epsilon` values use up `privacy.epsilon` = "
                f"{privacy.epsilon:g}, leaving nothing for {len(rest)} queries without one; "
                "raise `privacy.epsilon` or lower the queries' own"
            )
        share = math.sqrt(len(rest) / (2.0 * left))
        for i in rest:
            sigmas[i] = share
    return sigmas


def effective_sigma(sigmas: Sequence[float]) -> float:
    """The single Gaussian equivalent (in RDP) to releasing every query once."""
    return 1.0 / math.sqrt(sum(1.0 / s**2 for s in sigmas))


def analysis_epsilon(sigmas: Sequence[float], delta: float) -> float:
    """ε of the composed releases at ``delta`` (project accountant, RDP).

    Parameters
    ----------
    sigmas : sequence of float
        Noise multipliers of the queries.
    delta : float

    Returns
    -------
    float
    """
    return gaussian_epsilon(effective_sigma(sigmas), delta)


def sensitivity(query: Any, columns: dict[str, Any]) -> float:
    """L2 sensitivity of a query's released vector, from the declared schema.

    * count / crosstab, histogram, quantiles (a histogram), Kaplan-Meier (event and
      censoring counts per time bin and group, plus those beyond the horizon): one
      record sits in exactly one cell, so 1.
    * missingness over C columns: the record count and C missing counts, all of which
      one record may change: sqrt(1 + C).
    * mean: count, sum and sum of squares of the value rescaled to [-1, 1] with the
      declared bounds: sqrt(3).

    Parameters
    ----------
    query : query model
    columns : dict
        The declared columns.

    Returns
    -------
    float
    """
    if query.kind == "missingness":
        return math.sqrt(1 + len(missingness_columns(query, columns)))
    if query.kind == "mean":
        return math.sqrt(3.0)
    return 1.0


def missingness_columns(query: Any, columns: dict[str, Any]) -> list[str]:
    """Columns a missingness query covers (all declared ones by default)."""
    return list(query.columns) if query.columns else list(columns)
