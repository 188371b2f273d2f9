"""Fed-Heart-Disease: fedhealth's FedAvg and FedAdam against FLamby's published figures.

Runs ``experiments/heart-disease.toml`` (four UCI centres, logistic regression,
FLamby's preprocessing and split) on Flower's simulation engine for several
seeds and strategies, plus pooled training of the same model on the union of
the centres' training splits, and prints per-centre-mean test accuracy (how
FLamby scores this benchmark) as median and range over seeds.

Usage::

    python benchmarks/heart_disease.py                 # 5 seeds, fedavg + fedadam + pooled
    python benchmarks/heart_disease.py --seeds 2 --rounds 10

Reads ``../shared/data/uci-heart-disease`` beside the project; exits with a
message when it is missing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import tomli_w
import torch

ROOT = Path(__file__).resolve().parents[1]
FLAMBY = {"pooled": 0.735, "fedavg": 0.685, "fedadam": 0.726, "balanced": float("nan")}


def variant(base: Path, out_dir: Path, name: str, **sections: dict) -> Path:
    """Write a copy of the experiment ``base`` with some keys overridden."""
    doc = tomllib.loads(base.read_text())
    doc["experiment"]["sites"] = [
        str((base.parent / s).resolve()) for s in doc["experiment"]["sites"]
    ]
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    path = out_dir / f"{name}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def federated(path: Path, uri: str) -> float:
    """Run one federation; return per-centre-mean test accuracy of the final model."""
    from fedhealth.config.experiment import load_experiment
    from fedhealth.engines.simulation import run_simulation

    summary = run_simulation(path, load_experiment(path), uri)
    return summary.global_metrics["accuracy_site_mean"]


def pooled(path: Path, seed: int, epochs: int) -> float:
    """Centralised training on the pooled (per-centre normalised) training splits."""
    from fedhealth.config.experiment import load_experiment_with_sites
    from fedhealth.models import build_model
    from fedhealth.site.dataset import load_site_data, standardizer_for
    from fedhealth.site.trainer import evaluate, train_local

    cfg, sites = load_experiment_with_sites(path)
    spec = cfg.task_spec()
    parts = []
    for site in sites:
        data = load_site_data(site, spec.task)
        norm = standardizer_for(data, "site", None)
        parts.append(
            (norm.transform(data.x_train), data.y_train, norm.transform(data.x_test), data.y_test)
        )
    x = np.concatenate([p[0] for p in parts]).astype(np.float32)
    y = np.concatenate([p[1] for p in parts])
    model = build_model(spec.model, x.shape[1], 2, seed)
    train_spec = spec.training.model_copy(update={"local_epochs": epochs})
    train_local(model, x, y, train_spec, seed=seed)
    return float(
        np.mean([evaluate(model, p[2].astype(np.float32), p[3])["accuracy"] for p in parts])
    )


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=None, help="override experiment.rounds")
    ap.add_argument("--pooled-epochs", type=int, default=50, help="FLamby trains pooled 50 epochs")
    ap.add_argument("--fedadam-eta", type=float, default=0.03)
    args = ap.parse_args()
    base = ROOT / "experiments" / "heart-disease.toml"
    data = ROOT.parent / "shared" / "data" / "uci-heart-disease"
    if not data.is_dir():
        sys.exit(f"benchmark skipped: Heart-Disease data not found at {data}")
    torch.set_num_threads(1)
    rows: dict[str, list[float]] = {"pooled": [], "fedavg": [], "fedadam": [], "balanced": []}
    seconds: dict[str, list[float]] = {k: [] for k in rows}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        uri = f"sqlite:///{out / 'mlflow.db'}"
        exp_over = {"rounds": args.rounds} if args.rounds else {}
        strategies = {
            "fedavg": {"name": "fedavg"},
            "fedadam": {
                "name": "fedadam",
                "options": {
                    "eta": args.fedadam_eta,
                    "eta_l": 0.001,
                    "beta_1": 0.9,
                    "beta_2": 0.99,
                    "tau": 1e-9,
                },
            },
            # strategies/balanced_fedavg.py with alpha = 0: every centre weighs the same,
            # which is what a per-centre-mean score rewards.
            "balanced": {
                "name": str(ROOT / "strategies" / "balanced_fedavg.py") + ":BalancedFedAvg",
                "options": {"alpha": 0.0},
            },
        }
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            rows["pooled"].append(pooled(base, seed, args.pooled_epochs))
            seconds["pooled"].append(time.perf_counter() - t0)
            for name, strat in strategies.items():
                path = variant(
                    base,
                    out,
                    f"{name}-{seed}",
                    experiment={**exp_over, "seed": seed, "name": f"heart-disease-bench-{name}"},
                    strategy=strat,
                    tracking={"register": False},
                )
                t0 = time.perf_counter()
                rows[name].append(federated(path, uri))
                seconds[name].append(time.perf_counter() - t0)
                print(f"seed {seed} {name}: {rows[name][-1]:.4f}", flush=True)
    print()
    print(
        "Fed-Heart-Disease, per-centre-mean test accuracy "
        f"({args.seeds} seeds; median [min, max]), FLamby's published figures beside"
    )
    print(f"{'method':<10} {'fedhealth':>28} {'FLamby':>8} {'s/run':>7}")
    for name, vals in rows.items():
        med = statistics.median(vals)
        print(
            f"{name:<10} {med:>10.4f} [{min(vals):.4f}, {max(vals):.4f}] "
            f"{FLAMBY[name]:>8.3f} {statistics.median(seconds[name]):>7.1f}"
        )


if __name__ == "__main__":
    main()
