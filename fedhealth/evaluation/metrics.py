"""Discrimination and calibration from the sites' released histograms, with 95 % intervals.

Every figure is a function of the per-bin counts of positives and negatives
(:mod:`fedhealth.evaluation.histograms`), computed for many histograms at once
(a leading axis of bootstrap replicates):

- AUROC: the Mann-Whitney statistic with records in the same bin counted as ties (½);
- AUPRC: average precision over the thresholds ``k / bins`` (scikit-learn's step rule);
- accuracy, sensitivity and specificity at a threshold of the grid;
- Brier score: each record's score taken as its bin's centre (error at most a quarter
  of the squared bin width, 0.0025 with 100 bins);
- calibration intercept and slope: a logistic regression of the label on the logit of the
  bin's centre, fitted by Newton's method with step halving on the binned data (weights =
  counts); undefined (NaN) where one class lies entirely above the other (separation).

**Intervals** (:data:`INTERVAL_METHOD`): a parametric bootstrap over the released
histograms. Each site's class histograms are resampled (multinomial with the released
class totals and shares), the site's DP noise is drawn again on top when it released under
DP, and the pooled histogram of a replicate is the sum of the sites' replicates (sites are
resampled independently). The interval is the 2.5-97.5 % percentile of the replicates.
Noisy counts are clipped at 0 (post-processing of a DP release costs no privacy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedhealth.errors import FedHealthError
from fedhealth.evaluation.histograms import coarsen

REPLICATES = 1000
INTERVAL_METHOD = (
    f"parametric bootstrap ({REPLICATES} replicates) over the released histograms: each "
    "site's class histograms resampled (multinomial), its DP noise redrawn, sites "
    "independent; 2.5-97.5 % percentiles"
)
METRICS = (
    "auroc",
    "auprc",
    "accuracy",
    "sensitivity",
    "specificity",
    "brier",
    "calibration_intercept",
    "calibration_slope",
)


def _arrays(r: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    try:
        bins = int(r["bins"])
        pos, neg = (np.asarray(r[k], dtype=np.float64) for k in ("pos", "neg"))
    except (KeyError, TypeError, ValueError) as exc:
        raise FedHealthError(f"a validation release lacks or garbles {exc}") from None
    if not (pos.shape == neg.shape == (bins,)) or not np.isfinite(pos + neg).all():
        raise FedHealthError("a validation release's histograms differ from its `bins`")
    return pos, neg


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for any finite x


def _log_likelihood(
    a: np.ndarray, b: np.ndarray, x: np.ndarray, pos: np.ndarray, neg: np.ndarray
) -> np.ndarray:
    """Binned Bernoulli log-likelihood of ``logit P(y=1) = a + b x`` (overflow-free)."""
    eta = a[..., None] + b[..., None] * x
    return -(pos * np.logaddexp(0.0, -eta) + neg * np.logaddexp(0.0, eta)).sum(-1)


#: Newton iterations of the calibration fit, and step halvings per iteration at most.
_NEWTON_ITERATIONS = 100
_HALVINGS = 50


def _calibration(pos: np.ndarray, neg: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, ...]:
    """Intercept and slope of ``logit P(y=1) = a + b · logit(score)`` on binned data.

    The maximum-likelihood fit of a logistic regression with the bins as covariate values
    and the counts as weights, by Newton's method with step halving: a step is shortened
    until the log-likelihood rises (Armijo's rule), so the iteration converges from any
    start on this concave problem instead of overshooting into overflow. The estimate
    exists only when neither class lies entirely on one side of the other (no complete or
    quasi-complete separation: the slope would be infinite) and both classes are present;
    there, and where the iteration did not converge, the result is NaN (undefined; the
    bootstrap interval is taken over the replicates where it is defined).
    """
    x = np.log(np.clip(mean, 1e-4, 1 - 1e-4) / (1 - np.clip(mean, 1e-4, 1 - 1e-4)))
    x = np.broadcast_to(x, pos.shape)
    w = pos + neg
    inf = np.inf
    pos_lo = np.where(pos > 0, x, inf).min(-1)
    pos_hi = np.where(pos > 0, x, -inf).max(-1)
    neg_lo = np.where(neg > 0, x, inf).min(-1)
    neg_hi = np.where(neg > 0, x, -inf).max(-1)
    # Also true when a class is absent (its bounds are +-inf) or all records share one bin.
    undefined = (neg_hi <= pos_lo) | (pos_hi <= neg_lo)
    total_pos, total = pos.sum(-1), np.clip(w.sum(-1), 1e-300, None)
    prevalence = np.clip(total_pos / total, 1e-6, 1 - 1e-6)
    a = np.log(prevalence / (1 - prevalence))  # the null model: a finite likelihood
    b = np.zeros_like(a)
    decrement = np.full(a.shape, np.inf)
    for _ in range(_NEWTON_ITERATIONS):
        p = _sigmoid(a[..., None] + b[..., None] * x)
        r = pos - w * p
        v = w * p * (1 - p)
        g0, g1 = r.sum(-1), (r * x).sum(-1)
        h00, h01, h11 = v.sum(-1), (v * x).sum(-1), (v * x * x).sum(-1)
        ridge = 1e-12 * (h00 + h11) + 1e-300  # keeps a near-singular system solvable
        det = (h00 + ridge) * (h11 + ridge) - h01**2
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            da = ((h11 + ridge) * g0 - h01 * g1) / det
            db = ((h00 + ridge) * g1 - h01 * g0) / det
            decrement = g0 * da + g1 * db  # Newton decrement squared: >= 0, 0 at the optimum
        active = ~undefined & np.isfinite(decrement) & (decrement > 1e-20)
        if not active.any():
            break
        da, db = np.where(active, da, 0.0), np.where(active, db, 0.0)
        start = _log_likelihood(a, b, x, pos, neg)
        slack = 1e-13 * (np.abs(start) + 1.0)  # rounding of the likelihood near the optimum
        t = np.ones_like(a)
        for _ in range(_HALVINGS):
            gain = _log_likelihood(a + t * da, b + t * db, x, pos, neg) - start
            short = active & ~(gain >= 1e-4 * t * decrement - slack)
            if not short.any():
                break
            t = np.where(short, 0.5 * t, t)
        a, b = a + t * da, b + t * db
    converged = ~undefined & np.isfinite(a) & np.isfinite(b) & (decrement < 1e-8)
    return np.where(converged, a, np.nan), np.where(converged, b, np.nan)


def figures(pos: np.ndarray, neg: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` for histograms of shape (..., bins).

    Parameters
    ----------
    pos, neg : numpy.ndarray
        Counts of positive and negative records per bin (noisy counts are clipped at 0).
    threshold : float
        Decision threshold (rounded to the grid ``k / bins``) of accuracy, sensitivity and
        specificity.

    Returns
    -------
    dict
        Metric name -> array of shape (...,) (NaN where undefined, e.g. no positives).
    """
    # Discrimination from the counts as released (zero-mean noise cancels in the cumulative
    # sums; clipping every bin would pile noise into empty bins); calibration needs weights
    # >= 0, so it reads the clipped counts.
    bins = pos.shape[-1]
    P, N = np.clip(pos.sum(-1), 1e-9, None), np.clip(neg.sum(-1), 1e-9, None)
    zero = np.zeros((*pos.shape[:-1], 1))
    # Records with a score in bin >= k, for k = 0..bins (predicted positive at k / bins).
    tp = np.concatenate([np.flip(np.cumsum(np.flip(pos, -1), -1), -1), zero], -1)
    fp = np.concatenate([np.flip(np.cumsum(np.flip(neg, -1), -1), -1), zero], -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = np.clip((neg * (tp[..., 1:] + 0.5 * pos)).sum(-1) / (P * N), 0, 1)
        recall = tp / P[..., None]
        precision = np.where(tp + fp > 0.5, np.clip(tp / (tp + fp), 0, 1), 1.0)
        auprc = np.clip(((recall[..., :-1] - recall[..., 1:]) * precision[..., :-1]).sum(-1), 0, 1)
        k = round(float(threshold) * bins)
        accuracy = np.clip((tp[..., k] + N - fp[..., k]) / (P + N), 0, 1)
        sensitivity = np.clip(tp[..., k] / P, 0, 1)
        specificity = np.clip((N - fp[..., k]) / N, 0, 1)
        pos, neg = np.clip(pos, 0, None), np.clip(neg, 0, None)
        count = pos + neg
        mean = np.broadcast_to((np.arange(bins) + 0.5) / bins, pos.shape)
        brier = (pos * (1 - mean) ** 2 + neg * mean**2).sum(-1) / np.clip(count.sum(-1), 1e-9, None)
    intercept, slope = _calibration(pos, neg, mean)
    return {
        "auroc": auroc,
        "auprc": auprc,
        "accuracy": accuracy,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "brier": brier,
        "calibration_intercept": intercept,
        "calibration_slope": slope,
    }


def _replicates(
    pos: np.ndarray,
    neg: np.ndarray,
    std: float,
    reps: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap replicates (reps, bins) of one site's released histograms."""
    p, n = np.clip(pos, 0, None), np.clip(neg, 0, None)
    out = []
    for h in (p, n):
        total = round(float(h.sum()))
        share = h / h.sum() if h.sum() > 0 else np.full(h.size, 1.0 / h.size)
        out.append(rng.multinomial(total, share, size=reps).astype(np.float64))
    bp, bn = out
    if std > 0:
        bp, bn = (a + rng.normal(0.0, std, size=a.shape) for a in (bp, bn))
    return bp, bn


def _summary(point: dict[str, np.ndarray], boot: dict[str, np.ndarray]) -> dict[str, dict]:
    out = {}
    for name in METRICS:
        reps = boot[name][np.isfinite(boot[name])]
        low, high = np.percentile(reps, [2.5, 97.5]) if reps.size else (np.nan, np.nan)
        out[name] = {"value": float(point[name]), "low": float(low), "high": float(high)}
    return out


def pooled_bins(releases: Mapping[str, Mapping[str, Any]]) -> int:
    """The grid the sites' histograms are pooled on: the largest that divides every site's."""
    try:
        sizes = {int(r["bins"]) for r in releases.values()}
    except (KeyError, TypeError, ValueError) as exc:
        raise FedHealthError(f"a validation release lacks or garbles {exc}") from None
    if not sizes or min(sizes) < 1:
        raise FedHealthError("a validation release has no histogram bins")
    return math.gcd(*sizes)


def pooled_histograms(releases: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of the sites' released histograms on their common grid (:func:`pooled_bins`)."""
    bins = pooled_bins(releases)
    pos, neg = (
        np.sum([coarsen(_arrays(r)[i], bins) for r in releases.values()], axis=0) for i in (0, 1)
    )
    return {"bins": bins, "pos": pos.tolist(), "neg": neg.tolist()}


def derive(
    releases: Mapping[str, Mapping[str, Any]],
    threshold: float = 0.5,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per site and pooled: every metric with its 95 % bootstrap interval.

    Parameters
    ----------
    releases : mapping
        Site name -> its release (:func:`fedhealth.evaluation.histograms.release`).
    threshold : float
        Decision threshold of accuracy, sensitivity and specificity.
    replicates : int
        Bootstrap replicates.
    seed : int
        Seed of the bootstrap (the intervals are reproducible).

    Returns
    -------
    dict
        ``{site: {"n", "positives", "noise_std", metric: {"value", "low", "high"}}}`` and
        the same under ``"pooled"`` (the sum of every site's histograms, on the grid of
        :func:`pooled_bins` when the sites released on different ones).
    """
    if not releases:
        raise FedHealthError("no site released validation statistics")
    rng = np.random.default_rng(seed)
    bins_common = pooled_bins(releases)
    out: dict[str, dict[str, Any]] = {}
    # Pooled histograms and their replicates are running sums: memory stays one site's
    # replicates (reps x bins) whatever the number of sites (it was ~3 MB a site, kept).
    total = np.zeros((2, bins_common))
    rep_total = (np.zeros((replicates, bins_common)), np.zeros((replicates, bins_common)))
    variance = 0.0
    for site in sorted(releases):
        r = releases[site]
        pos, neg = _arrays(r)
        std = float(r.get("noise_std", 0.0) or 0.0)
        rep = _replicates(pos, neg, std, replicates, rng)
        out[site] = {
            "n": int(r.get("n", 0)),
            "positives": float(np.clip(pos, 0, None).sum()),
            "noise_std": std,
            **_summary(figures(pos, neg, threshold), figures(*rep, threshold)),
        }
        # Sites may release on different grids (exact: 100 bins, DP: 20); pool on the
        # coarsest grid common to all, where a coarse bin's noise is the sum of its fine bins'.
        total += coarsen(np.stack([pos, neg]), bins_common)
        for acc, part in zip(rep_total, rep, strict=True):
            acc += coarsen(part, bins_common)
        variance += std**2 * pos.size / bins_common
    pooled_pos, pooled_neg = total[0], total[1]
    out["pooled"] = {
        "n": sum(int(releases[s].get("n", 0)) for s in releases),
        "positives": float(np.clip(total[0], 0, None).sum()),
        "noise_std": float(np.sqrt(variance)),
        **_summary(
            figures(pooled_pos, pooled_neg, threshold),
            figures(rep_total[0], rep_total[1], threshold),
        ),
    }
    return out


def flat_metrics(derived: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """:func:`derive`'s result as flat MLflow metrics: ``<site>/<metric>[_low|_high]``.

    Counts (``n``, ``positives``, ``noise_std``) keep their name; undefined figures (NaN)
    are left out.
    """
    out: dict[str, float] = {}
    for site, m in derived.items():
        for metric, v in m.items():
            if isinstance(v, Mapping):
                for part in ("value", "low", "high"):
                    suffix = "" if part == "value" else f"_{part}"
                    if v[part] == v[part]:  # not NaN
                        out[f"{site}/{metric}{suffix}"] = float(v[part])
            elif isinstance(v, (int, float)):
                out[f"{site}/{metric}"] = float(v)
    return out


def format_interval(m: Mapping[str, float]) -> str:
    """``0.912 [0.850, 0.960]`` of a :func:`derive` figure; ``-`` when undefined."""
    if m["value"] != m["value"]:  # NaN: e.g. a site without positives
        return "-"
    if m["low"] != m["low"]:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
