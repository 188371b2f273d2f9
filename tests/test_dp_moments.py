"""The consortium-statistics release: exact without noise, one unit of sensitivity per
coordinate, and variances far less noisy than plain sums of squares at the same σ."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedhealth.errors import FedHealthError
from fedhealth.privacy.dp.release import release_moments


class NoNoise:
    """Records what noise the release asks for and adds none (to read the exact sums)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []

    def normal(self, loc: float, scale: float, size: int) -> np.ndarray:
        self.calls.append((scale, size))
        return np.zeros(size)


def _table(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    age = rng.normal(55, 9, n)  # some fall outside the bounds and are clamped
    chol = rng.normal(240, 60, n)
    sex = rng.integers(0, 2, n).astype(float)  # numeric, bounds [0, 1]
    cp = np.eye(3)[rng.integers(0, 3, n)]  # one-hot
    x = np.column_stack([age, chol, sex, cp])
    low = np.array([40.0, 100.0, 0.0, 0.0, 0.0, 0.0])
    high = np.array([70.0, 400.0, 1.0, 1.0, 1.0, 1.0])
    binary = np.array([False, False, False, True, True, True])
    return x, low, high, binary


def test_without_noise_the_sums_are_those_of_the_clamped_values() -> None:
    x, low, high, binary = _table(200)
    noise = NoNoise()
    out = release_moments(x, low, high, 5.0, noise, binary)  # type: ignore[arg-type]
    clamped = np.clip(x, low, high)
    assert out["count"] == 200
    np.testing.assert_allclose(out["sum"], clamped.sum(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(out["sumsq"], np.square(clamped).sum(axis=0), rtol=1e-12,
                               atol=1e-9)  # fmt: skip
    # One coordinate per feature and one per non-binary feature, each moved by at most 1 by
    # one record: the noise std is σ·sqrt(#coordinates).
    ((scale, size),) = noise.calls
    assert size == 6 + 3 and scale == pytest.approx(5.0 * math.sqrt(9))


def test_images_per_channel_sums_without_noise() -> None:
    x = np.random.default_rng(1).uniform(-0.2, 1.2, size=(10, 2, 4, 4))
    low, high = np.zeros(2), np.ones(2)
    out = release_moments(x, low, high, 3.0, NoNoise(), None)  # type: ignore[arg-type]
    clamped = np.clip(x, 0, 1)
    assert out["count"] == 10 * 16
    np.testing.assert_allclose(out["sum"], clamped.sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(out["sumsq"], np.square(clamped).sum(axis=(0, 2, 3)), rtol=1e-12)


def test_one_record_moves_no_released_coordinate_by_more_than_one() -> None:
    """Substitute one record by the most extreme rows in the bounds and outside them: each
    released coordinate (in its scaled units) moves by at most 1, so sqrt(k) bounds the L2
    sensitivity the accountant is charged for."""
    x, low, high, binary = _table(50, seed=2)
    r = high - low

    def coordinates(data: np.ndarray) -> np.ndarray:
        out = release_moments(data, low, high, 1.0, NoNoise(), binary)  # type: ignore[arg-type]
        n = out["count"]
        s_u = (np.asarray(out["sum"]) - n * low) / r
        ss_u = (np.asarray(out["sumsq"]) - n * low**2 - 2 * low * r * s_u) / r**2
        q = 4 * (ss_u - s_u + n / 4)  # Σ 4(u - 1/2)², the released second coordinate
        return np.concatenate([s_u, q[~binary]])

    base = coordinates(x)
    for row in (low - 1e6, high + 1e6, (low + high) / 2, low, high):
        other = x.copy()
        other[0] = row
        assert np.abs(coordinates(other) - base).max() <= 1.0 + 1e-9


def test_variances_are_far_less_noisy_than_from_plain_sums_of_squares() -> None:
    """Same σ, many draws: the variance of a continuous feature (in range units) is off by
    what the centred release predicts, several times less than plain Σu² would be."""
    x, low, high, binary = _table(400, seed=3)
    sigma, draws = 5.0, 400
    rng = np.random.default_rng(4)
    est = []
    for _ in range(draws):
        out = release_moments(x, low, high, sigma, rng, binary)
        n = out["count"]
        mean = np.asarray(out["sum"]) / n
        est.append(np.asarray(out["sumsq"]) / n - mean**2)
    err = np.std(np.asarray(est), axis=0) / (high - low) ** 2  # range units
    k = 9
    m = ((np.clip(x, low, high) - low) / (high - low)).mean(axis=0)
    centred = sigma * math.sqrt(k) / 400 * np.sqrt(1 / 16 + (2 * (m - 0.5)) ** 2)
    plain = sigma * math.sqrt(12) / 400 * np.sqrt(1 + (2 * m) ** 2)  # 6 + 6 coordinates
    for j in (0, 1):  # age, chol
        assert err[j] == pytest.approx(centred[j], rel=0.15)
        assert err[j] < plain[j] / 3


def test_a_binary_mask_of_the_wrong_shape_is_refused() -> None:
    x, low, high, _ = _table(5)
    with pytest.raises(FedHealthError, match="binary must mark each of the 6 features"):
        release_moments(x, low, high, 1.0, np.random.default_rng(0), np.array([True]))
