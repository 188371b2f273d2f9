"""Fed-Heart-Disease under differential privacy: accuracy against honestly counted ε.

Runs ``experiments/heart-disease-dp.toml`` (four UCI centres, logistic regression, FLamby's
preprocessing and split; record-level DP-SGD at every centre) on Flower's simulation engine
for ε in {0.5, 1, 3, 8} (δ = 1e-3) and several seeds, plus the same training without DP,
and prints the per-centre-mean test accuracy (how FLamby scores this benchmark) as median
and range over seeds, beside FLamby's published DP figure (0.702 at ε = 1, whose accountant
sees fewer steps than it runs) and the non-private FLamby figures.

Every run gets fresh site workspaces, so its ledgers (and noise keys) start empty and the
reported ε is that run's alone; the ε column is the largest ε any centre reported for the
run -- each centre calibrates its noise so that all its planned steps (every Poisson batch
of every round) stay within the target.

Usage::

    python benchmarks/dp_heart_disease.py                         # 5 seeds (~10 minutes)
    python benchmarks/dp_heart_disease.py --seeds 2 --epsilons 1

Reads ``../shared/data/uci-heart-disease`` beside the project; exits with a message when
it is missing.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "experiments" / "heart-disease-dp.toml"
FLAMBY_DP = {1.0: 0.702}  # Opacus at ε = 1, δ = 1e-3, ε under-counted
FLAMBY = {"pooled": 0.735, "FedAvg": 0.685, "FedAdam": 0.726}


def _site_copy(profile: Path, out_dir: Path) -> Path:
    """The site profile with absolute data paths and its workspace under ``out_dir``."""
    doc = tomllib.loads(profile.read_text())
    doc["site"]["workspace"] = str(out_dir / "sites")
    for ds in doc["datasets"].values():
        shared = os.environ.get("FEDHEALTH_SHARED_DATA")
        ds["path"] = (
            str(Path(shared) / "uci-heart-disease" / Path(ds["path"]).name)
            if shared
            else str((profile.parent / ds["path"]).resolve())
        )
    path = out_dir / profile.name
    path.write_text(tomli_w.dumps(doc))
    return path


def variant(out_dir: Path, seed: int, epsilon: float | None) -> Path:
    """heart-disease-dp with another seed and target ε (None: DP off), in ``out_dir``."""
    doc = tomllib.loads(BASE.read_text())
    doc["experiment"]["sites"] = [
        str(_site_copy((BASE.parent / s).resolve(), out_dir)) for s in doc["experiment"]["sites"]
    ]
    doc["experiment"]["seed"] = seed
    strategy = doc["strategy"]["name"]
    if ":" in strategy:  # a strategy file named from the project root
        doc["strategy"]["name"] = str(ROOT / strategy)
    if epsilon is None:
        doc["privacy"]["dp"]["enabled"] = False
    else:
        doc["privacy"]["dp"]["target_epsilon"] = epsilon
    path = out_dir / "experiment.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def run_once(seed: int, epsilon: float | None) -> tuple[float, float]:
    """One federation in fresh workspaces: (per-centre-mean accuracy, largest site ε)."""
    from fedhealth.config.experiment import load_experiment
    from fedhealth.engines.simulation import run_simulation

    with tempfile.TemporaryDirectory() as tmp:
        path = variant(Path(tmp), seed, epsilon)
        summary = run_simulation(path, load_experiment(path), f"sqlite:///{tmp}/mlflow.db")
    eps = [s["epsilon"] for s in summary.privacy.get("sites", {}).values()]
    return summary.global_metrics["accuracy_site_mean"], max(eps) if eps else math.inf


def main() -> None:
    """Run the sweep and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[0.5, 1.0, 3.0, 8.0])
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without DP")
    args = parser.parse_args()
    shared = Path(os.environ.get("FEDHEALTH_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (shared / "uci-heart-disease").is_dir():
        sys.exit(f"shared data not found at {shared}")
    settings: list[float | None] = list(args.epsilons) + ([] if args.no_baseline else [None])
    rows = []
    t0 = time.time()
    for eps in settings:
        accs, spent = [], []
        for seed in range(args.seeds):
            acc, e = run_once(seed, eps)
            accs.append(acc)
            spent.append(e)
            print(f"  ε target {eps}, seed {seed}: accuracy {acc:.3f}, ε spent {e:.3f}", flush=True)
        rows.append((eps, accs, max(spent)))
    cfg = tomllib.loads(BASE.read_text())
    t = cfg["training"]
    print()
    print(
        f"Fed-Heart-Disease, record-level DP-SGD at each centre, δ = 1e-3, {args.seeds} seeds; "
        f"{cfg['experiment']['rounds']} rounds, batch {t['batch_size']}, {t['optimizer']} lr "
        f"{t['learning_rate']}, momentum {t.get('momentum', 0)}, clipping "
        f"{cfg['privacy']['dp']['max_grad_norm']} ({time.time() - t0:.0f} s)"
    )
    head = (
        f"{'target ε':>9} {'max ε spent':>11} {'accuracy (per-centre mean)':>27} "
        f"{'min':>6} {'max':>6} {'FLamby':>8}"
    )
    print(head)
    print("-" * len(head))
    for eps, accs, spent in rows:
        flamby = FLAMBY_DP.get(eps) if eps is not None else None
        print(
            f"{'no DP' if eps is None else f'{eps:g}':>9} "
            f"{'-' if eps is None else f'{spent:.3f}':>11} "
            f"{statistics.median(accs):>27.3f} {min(accs):>6.3f} {max(accs):>6.3f} "
            f"{'' if flamby is None else f'{flamby:.3f}*':>8}"
        )
    print(
        "* FLamby (Opacus, ε = 1, δ = 1e-3) under-counts ε: its accountant sees fewer steps "
        "than it runs. FLamby without DP: "
        + ", ".join(f"{k} {v:.3f}" for k, v in FLAMBY.items())
        + ". Goal: >= 0.70 at ε = 1, honestly counted."
    )


if __name__ == "__main__":
    main()
