"""Federated analytics: error against the exact pooled answer, for ε from 0.1 to 10 per site.

Runs the two reference analyses through the real site-side code (every site reads its
data, is charged on a fresh ledger and adds its own Gaussian noise) and pools them:

* ``experiments/heart-disease-feasibility.analysis.toml`` (four UCI centres; 8 queries
  sharing the site's ε): absolute error of the pooled patient count and of the count
  by sex, coverage of their stated 95 % intervals, and the error of the pooled median
  cholesterol (pandas on the pooled rows, values 0 = not measured left out);
* ``experiments/tcga-brca-survival.analysis.toml`` (six TCGA-BRCA centres; one
  Kaplan-Meier query at 1, 2, 3 years): the largest absolute error against lifelines'
  Kaplan-Meier on the pooled rows, over the grid.

Each cell of the table is the median (and 95th percentile) over ``--reps`` noise draws.

Usage::

    python benchmarks/analytics_error.py                     # 30 draws per ε (~3 minutes)
    python benchmarks/analytics_error.py --reps 5 --plot /tmp/err.png

Reads ``../shared/data`` beside the project (or ``$FEDHEALTH_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedhealth.analytics.local import run_analysis_local  # noqa: E402
from fedhealth.data.tcga_brca import centre_tables, write_tcga_brca_centres  # noqa: E402

EPSILONS = (0.1, 0.3, 1.0, 3.0, 10.0)
COLS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
        "oldpeak", "slope", "ca", "thal", "num"]  # fmt: skip


def project(data: Path, work: Path) -> Path:
    for folder in ("experiments", "sites"):
        shutil.copytree(ROOT / folder, work / folder)
    for p in (work / "sites").glob("*.toml"):
        text = p.read_text().replace("../../shared/data", str(data.resolve()))
        # The reference caps (5 per analysis) would refuse ε = 10 -- as they should.
        p.write_text(
            text.replace("max_epsilon_per_experiment = 5.0", "").replace(
                "lifetime_epsilon_budget = 10.0", ""
            )
        )
    write_tcga_brca_centres(data / "tcga-brca-flamby", work / "workspace/demo-data/tcga-brca")
    return work


def with_epsilon(path: Path, eps: float) -> Path:
    text = path.read_text().replace("epsilon = 1.0", f"epsilon = {eps}")
    out = path.with_name(f"eps-{eps}-{path.name}")
    out.write_text(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "analytics-error.png")
    args = ap.parse_args()
    data = Path(os.environ.get("FEDHEALTH_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (data / "tcga-brca-flamby").is_dir() or not (data / "uci-heart-disease").is_dir():
        sys.exit(f"shared data not found at {data} (set FEDHEALTH_SHARED_DATA)")
    logging.disable(logging.WARNING)
    from lifelines import KaplanMeierFitter

    heart = pd.concat(
        pd.read_csv(data / "uci-heart-disease" / f"processed.{c}.data", header=None,
                    names=COLS, na_values="?")
        for c in ("cleveland", "hungarian", "switzerland", "va")
    )  # fmt: skip
    n_true = len(heart)
    sex_true = np.array([(heart.sex == 0).sum(), (heart.sex == 1).sum()], dtype=float)
    chol = heart.chol[(heart.chol > 0) & heart.chol.notna()].clip(100, 600)
    # The sites that release cholesterol (Switzerland withholds it: never measured).
    chol_median = float(chol.median())
    tcga = pd.concat(centre_tables(data / "tcga-brca-flamby").values())
    grid = [365, 730, 1095]
    km_true = KaplanMeierFitter().fit(tcga["T"], tcga["E"]).survival_function_at_times(grid)
    km_true = km_true.to_numpy()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = project(data, Path(tmp))
        for eps in EPSILONS:
            h_path = with_epsilon(work / "experiments/heart-disease-feasibility.analysis.toml", eps)
            t_path = with_epsilon(work / "experiments/tcga-brca-survival.analysis.toml", eps)
            count_err, sex_err, cover, chol_err, km_err = [], [], [], [], []
            for rep in range(args.reps):
                ws = Path(tmp) / f"ws-{eps}-{rep}"
                r = run_analysis_local(h_path, noise_seed=rep, workspace=ws)
                q = r["queries"]
                count_err.append(abs(q["count"]["raw"][0] - n_true))
                sex = np.asarray(q["count-by-sex"]["raw"])
                sex_err.append(float(np.abs(sex - sex_true).mean()))
                lo, hi = (
                    np.asarray(q["count-by-sex"]["lower"]),
                    np.asarray(q["count-by-sex"]["upper"]),
                )
                cover.append(float(np.mean((lo <= sex_true) & (sex_true <= hi))))
                chol_err.append(abs(q["quantiles-chol"]["estimate"][1] - chol_median))
                r = run_analysis_local(t_path, noise_seed=rep, workspace=ws)
                km = np.asarray(r["queries"]["overall-survival"]["estimate"][0])
                km_err.append(float(np.max(np.abs(km - km_true))))
            rows.append({
                "eps": eps,
                "count": count_err, "sex": sex_err, "cover": float(np.mean(cover)),
                "chol": chol_err, "km": km_err,
            })  # fmt: skip

    def cell(v: list[float], digits: int) -> str:
        return f"{np.median(v):.{digits}f} ({np.percentile(v, 95):.{digits}f})"

    print(f"median (95th percentile) absolute error over {args.reps} noise draws per ε; "
          "δ = 1e-5 per site")  # fmt: skip
    print()
    print(
        "| ε per site | patients (n = 920) | count by sex, per cell | 95 % interval coverage "
        "(by sex) | median cholesterol (mg/dl) | KM survival, max over 1-3 y |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['eps']:g} | {cell(r['count'], 1)} | {cell(r['sex'], 1)} | "
              f"{r['cover']:.2f} | {cell(r['chol'], 1)} | {cell(r['km'], 3)} |")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    eps = [r["eps"] for r in rows]
    for ax, key, label in zip(
        axes,
        ("count", "chol", "km"),
        ("pooled patient count", "median cholesterol (mg/dl)", "KM survival (max over grid)"),
        strict=True,
    ):
        med = [np.median(r[key]) for r in rows]
        p95 = [np.percentile(r[key], 95) for r in rows]
        ax.loglog(eps, med, "o-", label="median")
        ax.loglog(eps, p95, "s--", label="95th percentile")
        ax.set_xlabel("ε per site")
        ax.set_title(f"abs. error: {label}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
