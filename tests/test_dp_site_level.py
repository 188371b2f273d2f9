"""Distributed site-level DP: clipping, noise-share calibration (statistically), accounting."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import stats

from fedhealth.errors import ConfigError, FedHealthError
from fedhealth.privacy.dp.site_level import (
    add_noise_share,
    clip_update,
    effective_noise_multiplier,
    noise_share_std,
    site_level_epsilon,
)

DRAWS = 20_000

logging.getLogger("absl").setLevel(logging.ERROR)


def test_clip_scales_down_only_when_needed():
    v = np.array([3.0, 4.0])
    clipped, norm = clip_update(v, 1.0)
    assert norm == pytest.approx(5.0)
    assert np.linalg.norm(clipped) == pytest.approx(1.0)
    assert np.allclose(clipped, v / 5.0)
    same, norm = clip_update(v, 10.0)
    assert norm == pytest.approx(5.0) and np.array_equal(same, v) and same is not v
    zero, norm = clip_update(np.zeros(4), 1.0)
    assert norm == 0.0 and not zero.any()


def test_clip_keeps_shape_and_dtype():
    v = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32) * 10
    clipped, _ = clip_update(v, 0.5)
    assert clipped.shape == v.shape and clipped.dtype == np.float32
    assert np.linalg.norm(clipped.astype(np.float64)) == pytest.approx(0.5, rel=1e-6)


def test_clip_refuses_nan_and_bad_norm():
    with pytest.raises(FedHealthError, match="NaN"):
        clip_update(np.array([1.0, np.nan]), 1.0)
    with pytest.raises(ConfigError, match="clip norm"):
        clip_update(np.ones(3), 0.0)


def test_noise_share_std_formula():
    assert noise_share_std(1.2, 0.5, 9) == pytest.approx(1.2 * 0.5 / 3)
    with pytest.raises(ConfigError, match="expected_sites"):
        noise_share_std(1.0, 1.0, 0)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_sum_of_shares_has_std_sigma_c(k):
    sigma, clip = 1.3, 0.7
    target = sigma * clip
    root = np.random.SeedSequence(20240611 + k)
    rngs = [np.random.default_rng(s) for s in root.spawn(k)]  # independent sites
    zero = np.zeros(DRAWS)
    shares = np.stack([add_noise_share(zero, sigma, clip, k, rng) for rng in rngs])
    total = shares.sum(axis=0)

    # std of the sum: relative standard error of a std estimate is 1/sqrt(2N) = 0.5 %
    assert total.std(ddof=1) == pytest.approx(target, rel=0.03)
    assert abs(total.mean()) < 5 * target / math.sqrt(DRAWS)
    # each share: std σC/sqrt(k), i.e. ratio sum/share = sqrt(k)
    per_site = shares.std(axis=1, ddof=1)
    assert np.allclose(per_site, target / math.sqrt(k), rtol=0.03)
    assert total.std(ddof=1) / per_site.mean() == pytest.approx(math.sqrt(k), rel=0.04)
    # chi-square: sum(x²)/(σC)² ~ χ²(N) if the calibration is exact (two-sided test)
    chi2 = float(np.sum(total**2) / target**2)
    p = 2 * min(stats.chi2.cdf(chi2, DRAWS), stats.chi2.sf(chi2, DRAWS))
    assert p > 1e-3, f"chi2={chi2:.0f} for N={DRAWS}: p={p:.2g}"
    # and it is Gaussian
    assert stats.kstest(total / target, "norm").pvalue > 1e-3
    if k > 1:  # shares of different sites are uncorrelated
        assert abs(np.corrcoef(shares[0], shares[1])[0, 1]) < 5 / math.sqrt(DRAWS)


def test_noise_is_added_to_the_update():
    rng = np.random.default_rng(1)
    vec = np.full(DRAWS, 0.25, dtype=np.float32)
    noisy = add_noise_share(vec, 1.0, 1.0, 4, rng)
    assert noisy.dtype == np.float32 and noisy.shape == vec.shape
    assert (noisy - vec).mean() == pytest.approx(0.0, abs=5 * 0.5 / math.sqrt(DRAWS))
    assert (noisy - vec).std() == pytest.approx(0.5, rel=0.03)


def test_dropouts_leave_less_noise_and_effective_sigma_says_how_much():
    sigma, clip, k, m = 1.0, 1.0, 8, 5
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(7).spawn(m)]
    total = sum(add_noise_share(np.zeros(DRAWS), sigma, clip, k, r) for r in rngs)
    eff = effective_noise_multiplier(sigma, k, m)
    assert eff == pytest.approx(sigma * math.sqrt(m / k))
    assert total.std(ddof=1) == pytest.approx(eff * clip, rel=0.03)
    assert effective_noise_multiplier(sigma, k, k) == sigma
    assert effective_noise_multiplier(sigma, k, 0) == 0.0
    # fewer sites -> less noise -> more ε: the coordinator must use the effective σ
    assert site_level_epsilon(eff, 1.0, 10, 1e-3) > site_level_epsilon(sigma, 1.0, 10, 1e-3)


def test_site_level_epsilon_matches_google():
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    # every site every round: the plain Gaussian mechanism composed `rounds` times
    rdp = RdpAccountant()
    rdp.compose(dp_accounting.GaussianDpEvent(1.0), 20)
    assert site_level_epsilon(1.0, 1.0, 20, 1e-3) == pytest.approx(rdp.get_epsilon(1e-3), rel=0.01)
    pld = PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(dp_accounting.GaussianDpEvent(1.0), 20)
    assert site_level_epsilon(1.0, 1.0, 20, 1e-3, accountant="prv") == pytest.approx(
        pld.get_epsilon(1e-3), rel=0.01
    )
    # secretly sampled sites: Poisson-subsampled Gaussian. Its optimal RDP order is
    # fractional here, where dp_accounting 0.6 uses a looser series than Opacus (1.6 %
    # apart), so check RDP as a valid bound between the tight PLD value and Google's RDP.
    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(2.0))
    rdp, pld = RdpAccountant(), PLDAccountant(value_discretization_interval=1e-3)
    rdp.compose(event, 50)
    pld.compose(event, 50)
    tight = pld.get_epsilon(1e-3)
    assert site_level_epsilon(2.0, 0.5, 50, 1e-3, accountant="prv") == pytest.approx(
        tight, rel=0.01
    )
    assert tight < site_level_epsilon(2.0, 0.5, 50, 1e-3) <= rdp.get_epsilon(1e-3)
