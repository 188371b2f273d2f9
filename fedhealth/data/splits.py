"""Deterministic train/test splits of one site's rows.

The split is scikit-learn's ``train_test_split`` (``ShuffleSplit`` /
``StratifiedShuffleSplit``), re-implemented exactly — same random draws, same rows — so
that the site runtime, which starts a new process for every message, does not import
scikit-learn (about 1.3 s). ``tests/test_data_tabular.py`` checks it against
scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np

from fedhealth.errors import DataError

# A class needs at least this many rows to be stratified on; the same rule as
# FLamby's Fed-Heart-Disease (more than 2 per class), so its splits reproduce.
MIN_PER_CLASS_TO_STRATIFY = 3


def train_test_split_indices(
    y: np.ndarray, test_fraction: float, seed: int, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into train and test sets, deterministically.

    Gives the rows of :func:`sklearn.model_selection.train_test_split` (with
    ``shuffle=True, random_state=seed``), so the test set has
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
    rng = np.random.RandomState(seed)
    if can_stratify:
        train, test = _stratified(y, n - n_test, n_test, rng)
    else:
        perm = rng.permutation(n)
        train, test = perm[n_test:], perm[:n_test]
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def _stratified(
    y: np.ndarray, n_train: int, n_test: int, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """One split of scikit-learn's ``StratifiedShuffleSplit`` (the same draws of ``rng``)."""
    _, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, count in enumerate(class_counts):
        rows = class_indices[i].take(rng.permutation(count), mode="clip")
        train.extend(rows[: n_i[i]])
        test.extend(rows[n_i[i] : n_i[i] + t_i[i]])
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def _approximate_mode(
    class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
) -> np.ndarray:
    """Rows per class of ``n_draws`` draws: scikit-learn's ``_approximate_mode``
    (floor of the proportional share, remainders by largest fraction, ties by ``rng``)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)
