"""Z-score normalisation from per-feature moments (count, sum, sum of squares).

Per-site mode: a site builds a :class:`Standardizer` from its own train moments.
Consortium mode: each site shares only its :class:`Moments` (counts and sums,
never rows); the moments are added up with :func:`combine_moments` and every
site uses the same pooled mean and std. The federated exchange itself lives
outside this module.

Moments are per feature for tables (n x d) and per channel for images
(N x C x H x W, every pixel of the channel counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhealth.errors import DataError

STD_FLOOR = 1e-6  # a constant feature must not divide by zero


@dataclass
class Moments:
    """Sufficient statistics of a mean and variance, per feature or channel.

    Attributes
    ----------
    count : int
        Number of values per feature (rows; for images rows x pixels).
    sum : numpy.ndarray
        float64 sum of values per feature.
    sumsq : numpy.ndarray
        float64 sum of squared values per feature.
    """

    count: int
    sum: np.ndarray
    sumsq: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (lists of floats), e.g. to send to the coordinator."""
        return {"count": int(self.count), "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Moments:
        """Inverse of :meth:`to_dict`."""
        return cls(
            count=int(data["count"]),
            sum=np.asarray(data["sum"], dtype=np.float64),
            sumsq=np.asarray(data["sumsq"], dtype=np.float64),
        )


def _per_feature(X: np.ndarray) -> np.ndarray:
    """View X as (values, features): columns of a table, channels of images."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 2:
        return X
    if X.ndim >= 3:  # (N, C, ...) -> (N * pixels, C)
        return np.moveaxis(X, 1, -1).reshape(-1, X.shape[1])
    raise DataError(f"expected a table (n x d) or images (N x C x H x W), got shape {X.shape}")


def local_moments(X: np.ndarray) -> Moments:
    """Count, sum and sum of squares of one site's data.

    Parameters
    ----------
    X : numpy.ndarray
        Table (n x d) or images (N x C x H x W).

    Returns
    -------
    Moments
        Per feature (table) or per channel (images).
    """
    flat = _per_feature(X)
    return Moments(count=flat.shape[0], sum=flat.sum(axis=0), sumsq=np.square(flat).sum(axis=0))


def combine_moments(moments: list[Moments]) -> Moments:
    """Add up the moments of several sites (the pooled data's moments).

    Parameters
    ----------
    moments : list of Moments
        One per site, all with the same number of features.

    Returns
    -------
    Moments
        Summed counts, sums and sums of squares.
    """
    if not moments:
        raise DataError("no moments to combine: no site reported any")
    shapes = {np.shape(m.sum) for m in moments}
    if len(shapes) != 1:
        raise DataError(
            f"sites report moments of different feature counts {sorted(shapes)}; "
            "every site must use the same schema"
        )
    return Moments(
        count=sum(int(m.count) for m in moments),
        sum=np.sum([m.sum for m in moments], axis=0),
        sumsq=np.sum([m.sumsq for m in moments], axis=0),
    )


@dataclass
class Standardizer:
    """``(x - mean) / std`` per feature or channel.

    Attributes
    ----------
    mean : numpy.ndarray
        Per-feature mean.
    std : numpy.ndarray
        Per-feature population std (ddof=0), at least ``STD_FLOOR``.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_moments(cls, m: Moments) -> Standardizer:
        """Mean and std from moments (local or combined).

        Parameters
        ----------
        m : Moments
            Moments with ``count > 0``.

        Returns
        -------
        Standardizer
        """
        if m.count <= 0:
            raise DataError("cannot normalise: the moments count no values (empty data)")
        mean = np.asarray(m.sum, dtype=np.float64) / m.count
        # Rounding (or noise added for privacy) can make this slightly negative.
        var = np.maximum(np.asarray(m.sumsq, dtype=np.float64) / m.count - mean**2, 0.0)
        return cls(mean=mean, std=np.maximum(np.sqrt(var), STD_FLOOR))

    @classmethod
    def fit(cls, X: np.ndarray) -> Standardizer:
        """Shortcut for ``from_moments(local_moments(X))`` (per-site mode)."""
        return cls.from_moments(local_moments(X))

    def transform(self, X: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
        """Standardise X; columns in ``skip`` (e.g. one-hot) are left as they are.

        Parameters
        ----------
        X : numpy.ndarray
            Table (n x d) or images (N x C x H x W) with d or C features.
        skip : numpy.ndarray of bool, optional
            Mask of length d of columns to leave unscaled.

        Returns
        -------
        numpy.ndarray
            float32 array of X's shape.
        """
        X = np.asarray(X)
        mean, std = self.mean.copy(), self.std.copy()
        if skip is not None:
            skip = np.asarray(skip, dtype=bool)
            if skip.shape != mean.shape:
                raise DataError(f"skip mask has shape {skip.shape}, expected {mean.shape}")
            mean[skip], std[skip] = 0.0, 1.0
        axis = 1 if X.ndim >= 3 else -1
        if X.ndim < 2 or X.shape[axis] != mean.size:
            raise DataError(
                f"data has shape {X.shape} but the standardizer has {mean.size} features"
            )
        shape = [1] * X.ndim
        shape[axis] = mean.size
        return ((X - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        """Plain-JSON form, e.g. to store with a model."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Standardizer:
        """Inverse of :meth:`to_dict`."""
        return cls(
            mean=np.asarray(data["mean"], dtype=np.float64),
            std=np.asarray(data["std"], dtype=np.float64),
        )
