"""Deterministic train/test splits of one site's rows."""

from __future__ import annotations

import math

import numpy as np
from sklearn.model_selection import train_test_split

from fedhealth.errors import DataError

# A class needs at least this many rows to be stratified on; the same rule as
# FLamby's Fed-Heart-Disease (more than 2 per class), so its splits reproduce.
MIN_PER_CLASS_TO_STRATIFY = 3


def train_test_split_indices(
    y: np.ndarray, test_fraction: float, seed: int, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into train and test sets, deterministically.

    Uses :func:`sklearn.model_selection.train_test_split`, so the test set has
    ``ceil(test_fraction * n)`` rows and the train set the rest. FLamby's
    Fed-Heart-Disease split (``test_fraction=0.34, seed=43``) gives 199/104,
    172/89, 30/16 and 85/45 rows on its four centres, the same rows as FLamby.

    Parameters
    ----------
    y : numpy.ndarray
        Labels, shape (n,).
    test_fraction : float
        Fraction of rows in the test set, strictly between 0 and 1.
    seed : int
        Random seed; the same seed and labels give the same split.
    stratify : bool
        Keep class proportions in both sets. Falls back to an unstratified split
        when there is one class only, when a class has fewer than 3 rows (as
        FLamby does; sklearn cannot stratify a class of 1), or when either set
        would be smaller than the number of classes.

    Returns
    -------
    tuple of numpy.ndarray
        ``(train_idx, test_idx)``, int64, each sorted ascending (file order).

    Raises
    ------
    DataError
        If ``test_fraction`` is outside (0, 1) or there are too few rows to give
        both sets at least one row.
    """
    y = np.asarray(y).ravel()
    n = y.size
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1 (exclusive), not {test_fraction}")
    n_test = math.ceil(test_fraction * n)
    if n_test < 1 or n - n_test < 1:
        raise DataError(
            f"cannot split {n} rows with test_fraction {test_fraction}: train or test "
            "would be empty; the site needs more rows"
        )
    _, counts = np.unique(y, return_counts=True)
    can_stratify = (
        stratify
        and counts.size > 1
        and counts.min() >= MIN_PER_CLASS_TO_STRATIFY
        and min(n_test, n - n_test) >= counts.size
    )
    train, test = train_test_split(
        np.arange(n),
        test_size=test_fraction,
        random_state=seed,
        shuffle=True,
        stratify=y if can_stratify else None,
    )
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)
