"""Gaussian-mechanism releases of a site's metrics and statistics: clamp, noise, account.

Besides the model update, a site releases numbers computed on its records: the training
loss, the evaluation loss and accuracy, and (consortium normalisation) per-feature sums and
sums of squares. Each is released here as a Gaussian mechanism:

1. every record's contribution is clamped to a declared range (a loss to
   ``[0, loss_bound]``, a feature to its schema bounds, a correctness to ``{0, 1}``) and the
   contributions are scaled so that one record moves every coordinate by at most 1;
2. the L2 sensitivity of the released vector is then ``sqrt(#coordinates)`` (substitution of
   one record; the split sizes are released exactly, as in every FedAvg round);
3. Gaussian noise of std ``σ · sensitivity`` is added to every coordinate. One such release
   is exactly one step of the subsampled Gaussian mechanism with noise multiplier ``σ`` and
   sample rate 1, so it composes with the experiment's DP-SGD steps in the site's
   accountant (:class:`~fedhealth.privacy.dp.accounting.PrivacyAccountant`) and is charged
   to the ledger as ``(σ, q = 1, steps = 1)``.

The noise comes from a generator seeded by the site's secret key; nothing here reads or
writes the ledger (the site's :class:`~fedhealth.site.privacy_guard.PrivacyGuard` charges
before the reply is built).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedhealth.errors import FedHealthError

#: A release is one Gaussian-mechanism step without subsampling.
RELEASE_SAMPLE_RATE = 1.0
RELEASE_STEPS = 1


@dataclass(frozen=True)
class NoisySums:
    """A released vector: noisy sums and the std of the noise on each coordinate."""

    values: np.ndarray
    noise_std: np.ndarray


def noisy_scaled_sums(
    scaled: np.ndarray, noise_multiplier: float, rng: np.random.Generator
) -> NoisySums:
    """Add Gaussian noise to the column sums of per-record contributions in ``[0, 1]``.

    Parameters
    ----------
    scaled : numpy.ndarray
        Shape (n, k): each record's contribution to each of ``k`` released sums, already
        clamped and scaled into ``[0, 1]`` (checked).
    noise_multiplier : float
        σ: noise std divided by the L2 sensitivity ``sqrt(k)``.
    rng : numpy.random.Generator
        The site's secret noise generator.

    Returns
    -------
    NoisySums
        ``values`` (k,) and the noise std (k,), in the scaled units.
    """
    scaled = np.asarray(scaled, dtype=np.float64)
    if scaled.ndim != 2:
        raise FedHealthError("a DP release needs one row of contributions per record")
    if scaled.size and (not np.isfinite(scaled).all() or scaled.min() < 0.0 or scaled.max() > 1.0):
        raise FedHealthError("contributions to a DP release must be clamped into [0, 1]")
    sigma = float(noise_multiplier)
    if not (math.isfinite(sigma) and sigma > 0):
        raise FedHealthError(f"a DP release needs a noise multiplier > 0, not {sigma!r}")
    k = scaled.shape[1]
    std = sigma * math.sqrt(k)
    noise = rng.normal(0.0, std, size=k)
    return NoisySums(scaled.sum(axis=0) + noise, np.full(k, std))


def release_evaluation(
    correct: np.ndarray,
    losses: np.ndarray,
    loss_bound: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Noisy accuracy and mean loss of a test split (one Gaussian-mechanism release).

    Parameters
    ----------
    correct : numpy.ndarray
        Shape (n,): 1 where the prediction is right.
    losses : numpy.ndarray
        Shape (n,): per-record loss; clamped to ``[0, loss_bound]``.
    loss_bound : float
        The declared loss bound (policy ``metrics_loss_bound``).
    noise_multiplier : float
        σ of the release.
    rng : numpy.random.Generator
        The site's secret noise generator.

    Returns
    -------
    dict
        ``accuracy`` (clipped to [0, 1]) and ``loss`` (clipped to [0, loss_bound]), the std
        of the noise on each (``accuracy-noise-std``, ``loss-noise-std``).
    """
    n = max(len(correct), 1)
    scaled = np.column_stack(
        [np.asarray(correct, np.float64), np.clip(losses, 0.0, loss_bound) / loss_bound]
    )
    out = noisy_scaled_sums(scaled, noise_multiplier, rng)
    acc = float(np.clip(out.values[0] / n, 0.0, 1.0))
    loss = float(np.clip(out.values[1] * loss_bound / n, 0.0, loss_bound))
    return {
        "accuracy": acc,
        "loss": loss,
        "accuracy-noise-std": float(out.noise_std[0] / n),
        "loss-noise-std": float(out.noise_std[1] * loss_bound / n),
    }


def release_mean_loss(
    losses: np.ndarray, loss_bound: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Noisy mean of per-record losses clamped to ``[0, loss_bound]`` (one release).

    Returns
    -------
    tuple of float
        The noisy mean (clipped to [0, loss_bound]) and the std of its noise.
    """
    n = max(len(losses), 1)
    scaled = (np.clip(np.asarray(losses, np.float64), 0.0, loss_bound) / loss_bound)[:, None]
    out = noisy_scaled_sums(scaled, noise_multiplier, rng)
    mean = float(np.clip(out.values[0] * loss_bound / n, 0.0, loss_bound))
    return mean, float(out.noise_std[0] * loss_bound / n)


def release_moments(
    x: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    noise_multiplier: float,
    rng: np.random.Generator,
    binary: np.ndarray | None = None,
) -> dict[str, object]:
    """Noisy per-feature sums and sums of squares of a split, in the features' own units.

    Each feature is clamped to ``[low, high]`` and scaled to ``u = (x - low) / (high - low)``
    in [0, 1]. Released, noised: ``Σu`` for every feature and ``Σq`` with
    ``q = 4·(u - 1/2)²`` (also in [0, 1]) for every feature not declared ``binary``; one
    record moves each coordinate by at most 1. Then mapped back:
    ``Σu² = Σq/4 + Σu - n/4`` (a binary feature's ``u² = u``, so ``Σu² = Σu``, and it needs
    no second coordinate), ``Σx = n·low + r·Σu`` and
    ``Σx² = n·low² + 2·low·r·Σu + r²·Σu²`` with ``r = high - low``.

    Why centred squares: the variance the coordinator derives, ``E[u²] - E[u]²``, equals
    ``E[q]/4 - (E[u] - 1/2)²``, so the noise on ``Σq`` reaches it divided by 4, while the
    noise on plain ``Σu²`` reached it whole. Together with the fewer coordinates (a one-hot
    column's square is its value), the same σ gives the variances of Fed-Heart-Disease's
    continuous features 2.9-6.3 times less noise (``benchmarks/statistics_release.py``).
    For images (N, C, H, W) the features are the channels and one record holds H·W values
    per channel (its per-channel means of ``u`` and ``q`` are its contributions).

    Parameters
    ----------
    x : numpy.ndarray
        The split: a table (n, d) or images (N, C, H, W).
    low, high : numpy.ndarray
        Per-feature (per-channel) bounds, shape (d,).
    noise_multiplier : float
        σ of the release.
    rng : numpy.random.Generator
        The site's secret noise generator.
    binary : numpy.ndarray of bool, optional
        Shape (d,): features whose values are 0 or 1 (one-hot columns); their sums of
        squares are their sums. Default: none.

    Returns
    -------
    dict
        ``count`` (exact), ``sum`` and ``sumsq`` (lists, noisy), ``sum_noise_std`` and
        ``sumsq_noise_std`` (lists, in the features' units).
    """
    x = np.asarray(x, dtype=np.float64)
    low = np.asarray(low, dtype=np.float64)
    high = np.asarray(high, dtype=np.float64)
    d = low.size
    binary = np.zeros(d, dtype=bool) if binary is None else np.asarray(binary, dtype=bool)
    if binary.shape != (d,):
        raise FedHealthError(f"binary must mark each of the {d} features, got {binary.shape}")
    rng_ = high - low
    if x.ndim == 4:  # images: per-record, per-channel means over the H x W pixels
        per = x.shape[2] * x.shape[3]
        u = (np.clip(x, low[None, :, None, None], high[None, :, None, None])
             - low[None, :, None, None]) / rng_[None, :, None, None]  # fmt: skip
        s_u = u.mean(axis=(2, 3))
        q = (4.0 * np.square(u - 0.5)).mean(axis=(2, 3))
        count = x.shape[0] * per
    else:
        per = 1
        u = (np.clip(x, low, high) - low) / rng_
        s_u, q = u, 4.0 * np.square(u - 0.5)
        count = x.shape[0]
    squared = ~binary
    out = noisy_scaled_sums(np.concatenate([s_u, q[:, squared]], axis=1), noise_multiplier, rng)
    std = float(out.noise_std[0]) * per  # the same on every coordinate
    total = float(count)
    sum_u = out.values[:d] * per
    sum_q = np.zeros(d)
    sum_q[squared] = out.values[d:] * per
    sumsq_u = np.where(squared, sum_q / 4.0 + sum_u - total / 4.0, sum_u)
    s = total * low + rng_ * sum_u
    ss = total * low**2 + 2 * low * rng_ * sum_u + rng_**2 * sumsq_u
    # Σx² = (2·low·r + r²)·Σu + (r²/4)·Σq + constants: its noise mixes both coordinates.
    ss_std = np.where(
        squared,
        np.sqrt((2 * low * rng_ + rng_**2) ** 2 + (rng_**2 / 4.0) ** 2) * std,
        np.abs(2 * low * rng_ + rng_**2) * std,
    )
    return {
        "count": int(count),
        "sum": s.tolist(),
        "sumsq": ss.tolist(),
        "sum_noise_std": (rng_ * std).tolist(),
        "sumsq_noise_std": ss_std.tolist(),
    }


def noisy_bounded_sums(
    contributions: np.ndarray, l2_bound: float, noise_multiplier: float, rng: np.random.Generator
) -> NoisySums:
    """Gaussian noise on the sums of per-record vectors whose L2 norm is at most ``l2_bound``.

    For sparse releases (a histogram: each record adds 1 to one cell) the L2 sensitivity is
    the bound on one record's vector, far below :func:`noisy_scaled_sums`' ``sqrt(k)``.

    Parameters
    ----------
    contributions : numpy.ndarray
        Shape (n, k), non-negative and finite; every row's L2 norm at most ``l2_bound``
        (checked, never assumed).
    l2_bound : float
        The L2 sensitivity of the released sums.
    noise_multiplier : float
        σ: noise std divided by ``l2_bound``.
    rng : numpy.random.Generator
        The site's secret noise generator.

    Returns
    -------
    NoisySums
        ``values`` (k,) and the noise std (k,).
    """
    c = np.asarray(contributions, dtype=np.float64)
    if c.ndim != 2:
        raise FedHealthError("a DP release needs one row of contributions per record")
    norms = np.linalg.norm(c, axis=1) if c.size else np.zeros(0)
    if c.size and (not np.isfinite(c).all() or c.min() < 0 or norms.max() > l2_bound + 1e-9):
        raise FedHealthError(f"contributions to a DP release must have L2 norm <= {l2_bound}")
    sigma = float(noise_multiplier)
    if not (math.isfinite(sigma) and sigma > 0):
        raise FedHealthError(f"a DP release needs a noise multiplier > 0, not {sigma!r}")
    std = sigma * float(l2_bound)
    k = c.shape[1]
    return NoisySums(c.sum(axis=0) + rng.normal(0.0, std, size=k), np.full(k, std))
