"""The Gaussian mechanism of the analytics: noise per query, and the ε it spends.

Every query releases a vector whose L2 sensitivity (adding or removing one
record of the cohort) follows from the declared schema alone (:func:`sensitivity`).
It gets Gaussian noise of standard deviation ``σ_q · Δ_q``. In Rényi DP a
Gaussian with noise multiplier σ costs ``α / (2σ²)`` at every order α, so the
queries of one analysis compose *exactly* into a single Gaussian with
``σ_eff = (Σ_q σ_q⁻²)^(-1/2)``; its ε is computed by the project's accountant
(Opacus RDP, :func:`fedhealth.privacy.dp.accounting.epsilon_for_history` with
sample rate 1 and one step).

Budget split: the analysis's ε gives a total "ρ" = 1/(2σ_total²); queries with
their own ε take ρ_q = 1/(2σ_q²) of it, and the others share what is left
equally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fedhealth.privacy.dp.accounting import epsilon_for_history, noise_for_target


def sigma_for_epsilon(epsilon: float, delta: float) -> float:
    """Noise multiplier of one Gaussian release (sensitivity 1) spending ``epsilon``.

    Parameters
    ----------
    epsilon, delta : float
        The target (ε, δ).

    Returns
    -------
    float
        σ with ``epsilon_for_history([(σ, 1, 1)], δ) <= epsilon`` (Opacus's search,
        tolerance 0.01 in ε).
    """
    return noise_for_target(epsilon, delta, 1.0, 1, "rdp")


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
    return epsilon_for_history([(effective_sigma(sigmas), 1.0, 1)], delta, "rdp")


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
