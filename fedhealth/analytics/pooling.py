"""At the coordinator: pool the sites' noisy releases into consortium answers.

Each site adds independent Gaussian noise of a known standard deviation to each
query's vector, so the pooled (summed) vector carries noise of variance
``Σ_sites std²`` per cell. Stated 95 % intervals:

* counts, crosstab cells and histogram bins: ``pooled ± 1.96 · noise sd`` -- the
  interval that covers the exact pooled count with probability 0.95 (noise only:
  a count of a given population has no sampling error);
* derived numbers (missing shares, mean, standard deviation, quantiles, survival):
  ``estimate ± 1.96 · sd``, the noise's sd found by redrawing the pooled noise
  (parametric bootstrap, ``draws`` times, fixed seed), plus for the mean its
  sampling variance ``s²/n``, and for survival Greenwood's variance from the pooled
  counts.

Noisy counts are clamped to >= 0 before anything is derived from them
(post-processing, free under DP). Survival is the actuarial life-table estimate on
the declared grid (censorings within a bin count half at risk), which is the
Kaplan-Meier curve read at the grid points when bins are fine.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedhealth.config.analysis import AnalysisSpec
from fedhealth.errors import FederationError

Z95 = 1.959963984540054


def pool_analysis(
    spec: AnalysisSpec,
    releases: list[dict[str, Any]],
    *,
    min_sites: int,
    draws: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Consortium answers from the sites' releases.

    Parameters
    ----------
    spec : AnalysisSpec
        The analysis the sites answered.
    releases : list of dict
        One :func:`~fedhealth.analytics.site_queries.answer_analysis` result per site.
    min_sites : int
        Fewest releases an answer needs.
    draws : int
        Noise redraws for the intervals of derived numbers.
    seed : int
        Seed of those redraws (they add no privacy noise; results are reproducible).

    Returns
    -------
    dict
        ``analysis``, ``sites``, ``epsilon_per_site``, ``delta`` and, per query, the
        pooled estimates with ``lower``/``upper`` 95 % bounds and per-site values.

    Raises
    ------
    FederationError
        Fewer than ``min_sites`` releases, or a release for another spec, of another
        shape, or with non-finite numbers.
    """
    if len(releases) < min_sites:
        raise FederationError(
            f"analysis {spec.name!r}: {len(releases)} site(s) answered, fewer than "
            f"min_sites = {min_sites}; no consortium answer is given"
        )
    want = spec.spec_hash()
    sites = [r["site"] for r in releases]
    if len(set(sites)) != len(sites):
        raise FederationError(f"analysis {spec.name!r}: a site answered twice ({sites})")
    for r in releases:
        if r.get("spec_hash") != want:
            raise FederationError(
                f"analysis {spec.name!r}: site {r.get('site')!r} answered another request "
                f"(spec hash {str(r.get('spec_hash'))[:12]}, expected {want[:12]})"
            )
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for q, name in zip(spec.queries, spec.query_names(), strict=True):
        parts = [r["queries"].get(name) for r in releases]
        if any(p is None for p in parts):
            raise FederationError(f"analysis {spec.name!r}: a site's release lacks {name!r}")
        answered = [(r, p) for r, p in zip(releases, parts, strict=True) if "withheld" not in p]
        held = {r["site"]: p["withheld"] for r, p in zip(releases, parts, strict=True)
                if "withheld" in p}  # fmt: skip
        if len(answered) < min_sites:
            out[name] = {
                "kind": q.kind,
                "withheld_by": held,
                "answered": len(answered),
                "suppressed": f"fewer than min_sites = {min_sites} sites answered",
            }
            continue
        q_sites = [r["site"] for r, _ in answered]
        parts = [p for _, p in answered]
        shape = parts[0]["shape"]
        vals = []
        for r, p in answered:
            v = np.asarray(p["values"], dtype=np.float64)
            if p["shape"] != shape or v.size != math.prod(shape) or not np.all(np.isfinite(v)):
                raise FederationError(
                    f"analysis {spec.name!r}: site {r['site']!r} released query {name!r} with "
                    "another shape or non-finite values"
                )
            vals.append(v)
        per_site = np.stack(vals)
        std = math.sqrt(sum(float(p["noise_std"]) ** 2 for p in parts))
        pooled = per_site.sum(axis=0)
        labels = parts[0]["labels"]
        args = (pooled, std, labels, rng, draws)
        if q.kind in ("count", "histogram"):
            res = _counts(*args)
        elif q.kind == "missingness":
            res = _missingness(*args)
        elif q.kind == "mean":
            res = _mean(*args)
        elif q.kind == "quantiles":
            res = _quantiles(*args, probs=list(q.quantiles))
        else:
            res = _survival(*args)
        res.update(kind=q.kind, labels=labels, shape=shape, noise_std=std)
        res["per_site"] = {s: v.tolist() for s, v in zip(q_sites, per_site, strict=True)}
        res["withheld_by"] = held
        out[name] = res
    return {
        "analysis": spec.name,
        "dataset": spec.dataset,
        "spec_hash": want,
        "sites": sites,
        "min_sites": min_sites,
        "delta": float(spec.privacy.delta),
        "epsilon_per_site": {r["site"]: float(r["epsilon"]) for r in releases},
        "epsilon_analysis_total_per_site": {
            r["site"]: float(r["epsilon_analysis_total"]) for r in releases
        },
        "epsilon_dataset_lifetime_per_site": {
            r["site"]: float(r["epsilon_dataset_lifetime"]) for r in releases
        },
        "queries": out,
    }


def _redraw(pooled: np.ndarray, std: float, rng: np.random.Generator, draws: int) -> np.ndarray:
    return pooled[None, :] + rng.normal(0.0, std, size=(draws, pooled.size))


def _counts(pooled, std, labels, rng, draws) -> dict[str, Any]:
    half = Z95 * std
    return {
        "estimate": np.maximum(pooled, 0).tolist(),
        "raw": pooled.tolist(),
        "lower": np.maximum(pooled - half, 0).tolist(),
        # A noisy count far below 0 still gets an interval that holds its estimate (0).
        "upper": np.maximum(pooled + half, 0).tolist(),
        "interval": "noise",
    }


def _missingness(pooled, std, labels, rng, draws) -> dict[str, Any]:
    def share(v: np.ndarray) -> np.ndarray:
        n = np.maximum(v[..., :1], 1.0)
        return np.clip(np.maximum(v[..., 1:], 0) / n, 0, 1)

    est = share(pooled)
    sd = share(_redraw(pooled, std, rng, draws)).std(axis=0)
    return {
        "estimate": est.tolist(),
        "lower": np.clip(est - Z95 * sd, 0, 1).tolist(),
        "upper": np.clip(est + Z95 * sd, 0, 1).tolist(),
        "n": float(max(pooled[0], 0)),
        "interval": "noise",
    }


def _moments(v: np.ndarray, c: float, r: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.maximum(v[..., 0], 2.0)
    m1 = np.clip(v[..., 1] / n, -1, 1)
    m2 = np.clip(v[..., 2] / n, 0, 1)
    var = np.maximum(m2 - m1**2, 0) * n / (n - 1)
    return n, c + r * m1, r * np.sqrt(var)


def _mean(pooled, std, labels, rng, draws) -> dict[str, Any]:
    c, r = float(labels["center"]), float(labels["half_range"])
    n, mean, sd = (float(x) for x in _moments(pooled, c, r))
    _, means, sds = _moments(_redraw(pooled, std, rng, draws), c, r)
    se_mean = math.sqrt(float(means.std()) ** 2 + sd**2 / n)
    se_sd = float(sds.std())
    return {
        "estimate": {"n": n, "mean": mean, "std": sd},
        "lower": {"mean": mean - Z95 * se_mean, "std": max(sd - Z95 * se_sd, 0.0)},
        "upper": {"mean": mean + Z95 * se_mean, "std": sd + Z95 * se_sd},
        "interval": "noise + sampling (mean), noise (std)",
    }


def quantiles_from_histogram(counts: np.ndarray, edges: np.ndarray, probs: list[float]):
    """Quantiles of a histogram, linear within bins (counts clamped to >= 0).

    Parameters
    ----------
    counts : numpy.ndarray
        (..., bins) counts.
    edges : numpy.ndarray
        (bins + 1,) edges.
    probs : list of float

    Returns
    -------
    numpy.ndarray
        (..., len(probs)).
    """
    c = np.maximum(counts, 0)
    cum = np.cumsum(c, axis=-1)
    total = np.maximum(cum[..., -1:], 1e-12)
    cdf = np.concatenate([np.zeros_like(total), cum / total], axis=-1)
    out = np.empty((*c.shape[:-1], len(probs)))
    flat_cdf = cdf.reshape(-1, cdf.shape[-1])
    flat_out = out.reshape(-1, len(probs))
    for i, row in enumerate(flat_cdf):
        row = np.maximum.accumulate(row)
        for j, p in enumerate(probs):
            k = int(np.clip(np.searchsorted(row, p, side="left"), 1, len(edges) - 1))
            lo, hi = row[k - 1], row[k]
            frac = 0.5 if hi <= lo else (p - lo) / (hi - lo)
            flat_out[i, j] = edges[k - 1] + frac * (edges[k] - edges[k - 1])
    return out


def _quantiles(pooled, std, labels, rng, draws, probs) -> dict[str, Any]:
    edges = np.asarray(labels["edges"], dtype=np.float64)
    est = quantiles_from_histogram(pooled, edges, probs)
    sd = quantiles_from_histogram(_redraw(pooled, std, rng, min(draws, 500)), edges, probs).std(
        axis=0
    )
    return {
        "probs": probs,
        "estimate": est.tolist(),
        "lower": (est - Z95 * sd).tolist(),
        "upper": (est + Z95 * sd).tolist(),
        "n": float(max(pooled.sum(), 0)),
        "interval": "noise",
    }


def life_table(cells: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Survival, Greenwood variance and at-risk counts on the grid from binned counts.

    Parameters
    ----------
    cells : numpy.ndarray
        (..., 2k + 1): events per bin, censorings per bin, records beyond the horizon.
    k : int
        Number of grid points.

    Returns
    -------
    tuple of numpy.ndarray
        S at each grid point, its Greenwood variance, and the number at risk at the
        start of each bin (each (..., k)).
    """
    c = np.maximum(cells, 0)
    d, cens = c[..., :k], c[..., k : 2 * k]
    total = c.sum(axis=-1, keepdims=True)
    left = np.cumsum(d + cens, axis=-1)
    at_risk = total - np.concatenate([np.zeros_like(total), left[..., :-1]], axis=-1)
    eff = np.maximum(at_risk - cens / 2.0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(eff > 0, np.clip(d / eff, 0, 1), 0.0)
        g = np.where(eff - d > 0, d / (eff * (eff - d)), 0.0)
    s = np.cumprod(1.0 - h, axis=-1)
    var = s**2 * np.cumsum(g, axis=-1)
    return s, var, at_risk


def _survival(pooled, std, labels, rng, draws) -> dict[str, Any]:
    k = len(labels["grid"])
    groups = labels["groups"]
    cells = pooled.reshape(len(groups), 2 * k + 1)
    s, var_g, at_risk = life_table(cells, k)
    sims = _redraw(pooled, std, rng, draws).reshape(draws, len(groups), 2 * k + 1)
    s_sim, _, _ = life_table(sims, k)
    var_n = s_sim.var(axis=0)
    se = np.sqrt(var_g + var_n)
    return {
        "grid": labels["grid"],
        "groups": groups,
        "estimate": s.tolist(),
        "lower": np.clip(s - Z95 * se, 0, 1).tolist(),
        "upper": np.clip(s + Z95 * se, 0, 1).tolist(),
        "at_risk": np.maximum(at_risk, 0).tolist(),
        "events": np.maximum(cells[:, :k], 0).tolist(),
        "interval": "Greenwood + noise",
    }
