"""How noisy the consortium statistics' variances are: centred squares against plain ones.

One statistics release (σ = 5, the default ``statistics_noise_multiplier``) of the four UCI
Heart-Disease centres' rows pooled into one table (FLamby's preprocessing: 8 numeric columns
with ``experiments/heart-disease-dp.toml``'s bounds, cp and restecg one-hot), repeated
``--draws`` times with fresh noise. For each continuous feature, in range units (the feature
scaled to [0, 1] by its bounds): its variance, and the std of the variance the coordinator
derives (``Σx²/n - (Σx/n)²``) from

* the release before 2026-11-29: ``(Σu, Σu²)``, 2·d coordinates;
* :func:`fedhealth.privacy.dp.release.release_moments`: ``Σu`` and the centred squares
  ``Σ4(u - 1/2)²`` of the non-one-hot features.

Same σ, so the same ε for both. Run: ``python benchmarks/statistics_release.py [--draws 2000]``.
Reads ``../shared/data/uci-heart-disease`` (or ``$FEDHEALTH_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fedhealth.privacy.dp.release import noisy_scaled_sums, release_moments

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
           "oldpeak", "slope", "ca", "thal", "num"]  # fmt: skip
BOUNDS = {"age": (18, 100), "sex": (0, 1), "trestbps": (60, 240), "chol": (0, 700),
          "fbs": (0, 1), "thalach": (50, 230), "exang": (0, 1), "oldpeak": (-3, 7)}  # fmt: skip
BINARY_NUMERIC = {"sex", "fbs", "exang"}
SIGMA = 5.0


def table(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features (numeric, then one-hot cp 2-4 and restecg 1-2), bounds and one-hot mask."""
    files = sorted(data.glob("processed.*.data"))
    df = pd.concat(pd.read_csv(f, header=None, names=COLUMNS, na_values=["?"]) for f in files)
    df = df.drop(columns=["slope", "ca", "thal"]).dropna()
    numeric = list(BOUNDS)
    onehot = [(df.cp == v) for v in (2, 3, 4)] + [(df.restecg == v) for v in (1, 2)]
    x = np.column_stack([df[c].to_numpy(float) for c in numeric]
                        + [o.to_numpy(float) for o in onehot])  # fmt: skip
    low = np.array([BOUNDS[c][0] for c in numeric] + [0] * len(onehot), dtype=float)
    high = np.array([BOUNDS[c][1] for c in numeric] + [1] * len(onehot), dtype=float)
    binary = np.array([False] * len(numeric) + [True] * len(onehot))
    return x, low, high, binary


def main() -> None:
    """Print each continuous feature's variance and both releases' noise on it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()
    shared = Path(os.environ.get("FEDHEALTH_SHARED_DATA", ROOT.parent / "shared" / "data"))
    data = shared / "uci-heart-disease"
    if not data.is_dir():
        sys.exit(f"{data} is missing: the UCI Heart-Disease tables are needed")
    x, low, high, binary = table(data)
    r = high - low
    u = (np.clip(x, low, high) - low) / r
    n, d = u.shape
    rng = np.random.default_rng(0)

    def plain() -> np.ndarray:
        out = noisy_scaled_sums(np.concatenate([u, u**2], axis=1), SIGMA, rng)
        return out.values[d:] / n - (out.values[:d] / n) ** 2

    def centred() -> np.ndarray:
        out = release_moments(x, low, high, SIGMA, rng, binary)
        mean = np.asarray(out["sum"]) / n
        return (np.asarray(out["sumsq"]) / n - mean**2) / r**2

    before = np.std([plain() for _ in range(args.draws)], axis=0)
    after = np.std([centred() for _ in range(args.draws)], axis=0)
    print(f"{n} rows, {d} features, σ = {SIGMA}, {args.draws} draws; variances in range units")
    print(f"{'feature':<9} {'variance':>8} {'noise: plain':>12} {'centred':>8} {'ratio':>6}")
    for j, name in enumerate(BOUNDS):
        if name in BINARY_NUMERIC:
            continue
        print(f"{name:<9} {u[:, j].var():>8.4f} {before[j]:>12.4f} {after[j]:>8.4f} "
              f"{before[j] / after[j]:>6.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
