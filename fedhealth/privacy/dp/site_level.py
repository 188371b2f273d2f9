"""Distributed site-level DP: each site clips its update and adds a share of the noise.

The privacy unit is a whole site (hospital). Every site clips its model update
to L2 norm ``C`` and adds Gaussian noise of std ``σ·C/sqrt(k)``, where ``k`` is
the number of sites expected to report. Under homomorphic encryption the
coordinator only ever sees the *sum* of the ``k`` updates, whose noise is the
sum of ``k`` independent shares: Gaussian with std ``σ·C`` -- exactly the
Gaussian mechanism with sensitivity ``C`` (adding or removing one site moves
the sum by at most ``C``) and noise multiplier ``σ``. The coordinator accounts
it with :func:`site_level_epsilon`.

Caveats
-------
* **Dropouts.** If only ``m < k`` sites report, the sum carries only ``m``
  shares: std ``σ·C·sqrt(m/k)``. The coordinator must account each round with
  :func:`effective_noise_multiplier` for the *actual* number of sites, never
  with the nominal σ (or abort the round).
* **Collusion.** A site knows its own share. If the coordinator colludes with
  ``t`` sites they can subtract those shares; the remaining noise is that of
  ``m - t`` sites (``effective_noise_multiplier(σ, k, m - t)``). Choose ``k``
  and σ with the tolerated collusion in mind.
* **Sampling.** ``sample_rate_sites`` < 1 (privacy amplification) is valid
  only if the coordinator samples each site independently with that
  probability *and keeps the selection secret*; with every site in every round
  use ``sample_rate_sites=1.0``.
* **Weighting.** The bound holds for the plain sum (or mean) of clipped
  updates. If updates are weighted (FedAvg's ``n_k / n``) *after* clipping,
  the sensitivity becomes ``max_k w_k · C``: clip the weighted update instead.
* **Randomness.** Use an unseeded ``np.random.default_rng()`` (OS entropy) in
  production; a known seed makes the noise removable. Floating-point noise is
  not hardened against the Mironov (2012) least-significant-bit attack.
"""

from __future__ import annotations

import math

import numpy as np

from fedhealth.errors import ConfigError, FedHealthError
from fedhealth.privacy.dp.accounting import epsilon_spent


def _check_clip(clip_norm: float) -> float:
    c = float(clip_norm)
    if not math.isfinite(c) or c <= 0:
        raise ConfigError(f"site-level clip norm must be a finite number > 0, got {clip_norm!r}")
    return c


def _check_sites(expected_sites: int, what: str = "expected_sites") -> int:
    if isinstance(expected_sites, bool) or int(expected_sites) != expected_sites:
        raise ConfigError(f"{what} must be a whole number, got {expected_sites!r}")
    if expected_sites < 1:
        raise ConfigError(f"{what} must be at least 1, got {expected_sites!r}")
    return int(expected_sites)


def clip_update(vec: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """Scale a flattened model update down to L2 norm at most ``clip_norm``.

    Parameters
    ----------
    vec : np.ndarray
        The site's update (e.g. new weights minus global weights), any shape.
    clip_norm : float
        C, the bound on each site's contribution (the sensitivity).

    Returns
    -------
    clipped : np.ndarray
        ``vec * min(1, C / ||vec||)``, same shape and dtype as ``vec``.
    original_norm : float
        ``||vec||`` before clipping (for logging; it is *not* private).

    Raises
    ------
    FedHealthError
        If the update contains NaN or infinity.
    """
    c = _check_clip(clip_norm)
    arr = np.asarray(vec)
    norm = float(np.linalg.norm(arr.astype(np.float64, copy=False).ravel()))
    if not math.isfinite(norm):
        raise FedHealthError(
            "the site's model update contains NaN or infinity, so it cannot be clipped; local "
            "training diverged -- lower the learning rate or check the data."
        )
    if norm <= c:
        return arr.copy(), norm
    return (arr * (c / norm)).astype(arr.dtype, copy=False), norm


def noise_share_std(noise_multiplier: float, clip_norm: float, expected_sites: int) -> float:
    """Std of one site's noise share: ``σ·C / sqrt(expected_sites)``.

    Parameters
    ----------
    noise_multiplier : float
        σ of the *sum* over sites.
    clip_norm : float
        C.
    expected_sites : int
        k, the number of sites whose shares will be summed.

    Returns
    -------
    float
    """
    sigma = float(noise_multiplier)
    if not math.isfinite(sigma) or sigma < 0:
        raise ConfigError(
            f"noise multiplier must be a finite number >= 0, got {noise_multiplier!r}"
        )
    return sigma * _check_clip(clip_norm) / math.sqrt(_check_sites(expected_sites))


def add_noise_share(
    vec: np.ndarray,
    noise_multiplier: float,
    clip_norm: float,
    expected_sites: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Add this site's share of the Gaussian noise to an (already clipped) update.

    Parameters
    ----------
    vec : np.ndarray
        The clipped update.
    noise_multiplier : float
        σ of the sum over sites.
    clip_norm : float
        C used for clipping.
    expected_sites : int
        k, the number of sites whose shares will be summed.
    rng : np.random.Generator
        Source of noise (unseeded in production).

    Returns
    -------
    np.ndarray
        ``vec`` plus N(0, (σ·C)²/k) per coordinate, in ``vec``'s float dtype
        (noise is drawn in float64).
    """
    std = noise_share_std(noise_multiplier, clip_norm, expected_sites)
    arr = np.asarray(vec)
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
    noise = rng.normal(0.0, std, size=arr.shape)
    return (arr.astype(np.float64) + noise).astype(dtype, copy=False)


def effective_noise_multiplier(
    noise_multiplier: float, expected_sites: int, actual_sites: int
) -> float:
    """Noise multiplier the sum really carries when ``actual_sites`` shares arrived.

    Each share has variance ``σ²C²/k``; the sum of ``m`` shares has std
    ``σ·C·sqrt(m/k)``, so the effective multiplier is ``σ·sqrt(m/k)``.

    Parameters
    ----------
    noise_multiplier : float
        Nominal σ (calibrated for ``expected_sites``).
    expected_sites : int
        k the shares were calibrated for.
    actual_sites : int
        m, the shares actually summed (minus colluding sites, if any).

    Returns
    -------
    float
        ``σ·sqrt(m/k)``; 0 when ``m`` is 0.
    """
    k = _check_sites(expected_sites)
    if isinstance(actual_sites, bool) or int(actual_sites) != actual_sites or actual_sites < 0:
        raise ConfigError(f"actual_sites must be a whole number >= 0, got {actual_sites!r}")
    return float(noise_multiplier) * math.sqrt(int(actual_sites) / k)


def site_level_epsilon(
    noise_multiplier: float,
    sample_rate_sites: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Site-level ε after ``rounds`` rounds (the coordinator's accountant).

    Parameters
    ----------
    noise_multiplier : float
        σ the summed update carried -- pass :func:`effective_noise_multiplier`
        when fewer sites than expected reported.
    sample_rate_sites : float
        Probability each site was (secretly, independently) selected per
        round; 1.0 when every site takes part in every round.
    rounds : int
        Number of rounds.
    delta : float
        Target δ (should be below 1 / number of sites).
    accountant : {"rdp", "prv"}
        Which Opacus accountant.

    Returns
    -------
    float
    """
    return epsilon_spent(noise_multiplier, sample_rate_sites, rounds, delta, accountant)
