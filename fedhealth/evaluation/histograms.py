"""A site's validation release: score histograms per class, counts only.

Every record of the evaluated split falls in one of :data:`BINS` equal-width bins of its
predicted probability of the positive class. The release is, per bin, the number of
positive and of negative records. From it the coordinator reads the confusion counts at
every threshold ``k / BINS``, the ROC and PR curves and the calibration bins (each bin's
scores taken at its centre). No score of any record leaves the site: an earlier design
also released each bin's score sum, and the test of the reply showed that a bin holding
one record released that record's score exactly (``tests/test_validation.py``).

Under DP (policy ``release_metrics = "dp"``) each record's contribution is a one-hot
vector (1 in its class's bin), of L2 norm 1; Gaussian noise of std ``σ`` is added to every
coordinate (:func:`fedhealth.privacy.dp.release.noisy_bounded_sums`) and the release is
charged to the site's ledger as one Gaussian-mechanism step ``(σ, q = 1, 1 step)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedhealth.errors import FedHealthError

#: Bins of the score histograms (thresholds 0, 0.01, ..., 1).
BINS = 100
#: Bins of a DP release: fewer, so that less noise piles up over the empty ones.
DP_BINS = 20
#: L2 bound of one record's contribution (a single count).
L2_BOUND = 1.0


def bin_of(scores: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Bin index of each score in [0, 1] (a score of exactly 1 falls in the last bin)."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    return np.minimum((s * bins).astype(np.int64), bins - 1)


def contributions(scores: np.ndarray, labels: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Per-record contribution rows (n, 2·bins): one-hot in positives or negatives."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(labels).astype(np.int64)
    if s.shape != y.shape or s.ndim != 1:
        raise FedHealthError("validation needs one score and one label per record")
    if y.size and not np.isin(y, (0, 1)).all():
        raise FedHealthError("validation needs binary labels (0 or 1)")
    b = bin_of(s, bins)
    rows = np.arange(s.size)
    out = np.zeros((s.size, 2 * bins))
    out[rows, np.where(y == 1, b, bins + b)] = 1.0
    return out


def release(
    scores: np.ndarray,
    labels: np.ndarray,
    noise_multiplier: float | None = None,
    rng: np.random.Generator | None = None,
    bins: int = BINS,
) -> dict[str, Any]:
    """The validation release of one split: exact, or noised under the Gaussian mechanism.

    Parameters
    ----------
    scores : numpy.ndarray
        Predicted probability of the positive class, per record.
    labels : numpy.ndarray
        0/1 label per record.
    noise_multiplier : float, optional
        σ of the Gaussian mechanism; ``None`` releases the exact counts.
    rng : numpy.random.Generator, optional
        The site's secret noise generator (required with ``noise_multiplier``).
    bins : int
        Number of histogram bins.

    Returns
    -------
    dict
        ``bins``, ``n`` (records evaluated, exact as every reply's ``num-examples``),
        ``pos``, ``neg`` (lists of ``bins`` floats) and ``noise_std`` (the std of the noise
        on each coordinate; 0 when exact). Only counts: never a score.
    """
    c = contributions(scores, labels, bins)
    if noise_multiplier is None:
        values, std = c.sum(axis=0), 0.0
    else:
        from fedhealth.privacy.dp.release import noisy_bounded_sums

        if rng is None:
            raise FedHealthError("a DP validation release needs the site's noise generator")
        noisy = noisy_bounded_sums(c, L2_BOUND, noise_multiplier, rng)
        values, std = noisy.values, float(noisy.noise_std[0])
    return {
        "bins": int(bins),
        "n": int(c.shape[0]),
        "pos": values[:bins].tolist(),
        "neg": values[bins:].tolist(),
        "noise_std": std,
    }


def coarsen(counts: np.ndarray, bins: int) -> np.ndarray:
    """Sum adjacent bins of histograms (..., k·bins) into (..., bins).

    Pools an exact release (:data:`BINS`) with DP ones (:data:`DP_BINS`) on the coarser
    grid: every threshold of the coarse grid is one of the fine grid.
    """
    a = np.asarray(counts, dtype=np.float64)
    fine = a.shape[-1]
    if bins < 1 or fine % bins:
        raise FedHealthError(f"{fine} histogram bins cannot be merged into {bins}")
    return a.reshape(*a.shape[:-1], bins, fine // bins).sum(-1)
