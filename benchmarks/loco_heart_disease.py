"""Leave-one-centre-out on Fed-Heart-Disease: train on three centres, validate at the fourth.

For each of the four UCI centres in turn, the Heart-Disease experiment
(``experiments/heart-disease.toml``: logistic regression, FLamby's preprocessing and split,
its strategy and rounds) runs on Flower's simulation engine with the three other centres only;
its final model is registered in a real MLflow store (a temporary SQLite file), and the
registered version is then validated at the held-out centre, which never trained it, by
the evaluation-only study of ``fedhealth evaluate models:/NAME/VERSION --split all``
(:func:`fedhealth.engines.simulation.run_validation_simulation`, the CLI's entry point):
the centre releases score histograms of every one of its records and the coordinator
derives the figures with 95 % bootstrap intervals.

Prints one row per held-out centre: n, AUROC [95 % CI], AUPRC, Brier score, calibration
slope and intercept, sensitivity and specificity at 0.5, accuracy, and for comparison the
accuracy (mean over the three centres) and AUROC (pooled) of the same model on the
training centres' own test splits, from the training run's final evaluation. Writes the
ROC and calibration curves of the four held-out validations (one figure each, four
curves) and the released histograms (``loco-heart-disease.json``) to ``--out`` (default: a
temporary folder), or the figures to ``docs/images/`` with ``--write-docs``.

Usage::

    python benchmarks/loco_heart_disease.py                  # 7-14 min on 2 loaded cores
    python benchmarks/loco_heart_disease.py --write-docs     # refresh docs/images/loco-*
    python benchmarks/loco_heart_disease.py --rounds 5 --centres va

Reads ``../shared/data/uci-heart-disease`` beside the project (or
``$FEDHEALTH_SHARED_DATA``) in place; exits with a message when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
import torch

ROOT = Path(__file__).resolve().parents[1]
CENTRES = ("cleveland", "hungarian", "switzerland", "va")
DOC_IMAGES = ROOT / "docs" / "images"
PLOTS = {"roc": "loco-heart-disease-roc.png", "calibration": "loco-heart-disease-calibration.png"}


def shared_data() -> Path:
    """``../shared/data`` beside the project, or ``$FEDHEALTH_SHARED_DATA``."""
    return Path(os.environ.get("FEDHEALTH_SHARED_DATA", ROOT.parent / "shared" / "data"))


def write_fold(held_out: str, folder: Path, data: Path, rounds: int | None) -> tuple[Path, Path]:
    """Write the fold's site profiles and experiment under ``folder``.

    The profiles are copies of ``sites/<centre>.toml`` reading the data in place (its
    absolute path) with a fresh workspace (ledger, keys) under ``folder``; the experiment is
    ``experiments/heart-disease.toml`` with the three training centres only and its own
    name and registered model. Returns (experiment path, held-out centre's profile).
    """
    sites = folder / "sites"
    sites.mkdir(parents=True)
    for centre in CENTRES:
        text = (ROOT / "sites" / f"{centre}.toml").read_text()
        (sites / f"{centre}.toml").write_text(
            text.replace("../../shared/data", str(data.resolve()))
        )
    doc = tomllib.loads((ROOT / "experiments" / "heart-disease.toml").read_text())
    name = f"heart-disease-loco-{held_out}"
    doc["experiment"]["name"] = name
    doc["experiment"]["sites"] = [str(sites / f"{c}.toml") for c in CENTRES if c != held_out]
    if rounds:
        doc["experiment"]["rounds"] = rounds
    strategy = doc.get("strategy", {}).get("name", "")
    if ".py:" in strategy and not Path(strategy).is_absolute():
        doc["strategy"]["name"] = str(ROOT / strategy)  # a strategy file of the project
    doc.setdefault("tracking", {})["registered_model"] = name
    experiment = folder / "experiments" / f"{name}.toml"
    experiment.parent.mkdir()
    experiment.write_text(tomli_w.dumps(doc))
    return experiment, sites / f"{held_out}.toml"


def fold(held_out: str, folder: Path, data: Path, uri: str, rounds: int | None) -> dict[str, Any]:
    """Train without ``held_out``, register, validate the version at ``held_out``."""
    from fedhealth.config.experiment import load_experiment
    from fedhealth.engines.simulation import run_simulation, run_validation_simulation

    experiment, profile = write_fold(held_out, folder, data, rounds)
    t0 = time.perf_counter()
    summary = run_simulation(experiment, load_experiment(experiment), uri)
    if not summary.version:
        raise SystemExit(f"fold {held_out}: the training run registered no version")
    trained = time.perf_counter() - t0
    model_uri = f"models:/{summary.registered_model}/{summary.version}"
    result = run_validation_simulation(model_uri, [profile], uri, split="all")
    train_acc = {s: m["accuracy"] for s, m in summary.site_metrics.items() if "accuracy" in m}
    return {
        "held_out": held_out,
        "model": model_uri,
        "training_run": summary.run_id,
        "validation_run": result.run_id,
        "train_test_accuracy": train_acc,
        "train_test_auroc_pooled": summary.final_auroc.get("pooled", {}),
        "metrics": result.metrics[held_out],
        "release": result.releases[held_out],
        "seconds": {"train": trained, "validate": time.perf_counter() - t0 - trained},
    }


def _ci(m: dict[str, float], digits: int = 3) -> str:
    if m["value"] != m["value"]:
        return "-"
    if m["low"] != m["low"]:
        return f"{m['value']:.{digits}f}"
    return f"{m['value']:.{digits}f} [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"


def table(folds: list[dict[str, Any]]) -> str:
    """The Markdown table of the held-out validations (one row per held-out centre)."""
    head = (
        "| held-out centre | n (positives) | AUROC [95 % CI] | AUPRC | Brier | calibration slope "
        "| calibration intercept | sensitivity @0.5 | specificity @0.5 | accuracy "
        "| training centres' test accuracy (mean) | their pooled test AUROC |"
    )
    rows = [head, "|" + "---|" * 12]
    for f in folds:
        m = f["metrics"]
        acc = f["train_test_accuracy"]
        mean_acc = sum(acc.values()) / len(acc) if acc else float("nan")
        internal = f["train_test_auroc_pooled"]
        cells = [
            f["held_out"],
            f"{m['n']} ({m['positives']:.0f})",
            _ci(m["auroc"]),
            _ci(m["auprc"]),
            _ci(m["brier"]),
            _ci(m["calibration_slope"], 2),
            _ci(m["calibration_intercept"], 2),
            _ci(m["sensitivity"]),
            _ci(m["specificity"]),
            _ci(m["accuracy"]),
            f"{mean_acc:.3f} (" + ", ".join(f"{s} {v:.3f}" for s, v in sorted(acc.items())) + ")",
            _ci(internal) if internal else "-",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plots(folds: list[dict[str, Any]], folder: Path) -> list[Path]:
    """ROC and calibration of the held-out validations, one figure each, one curve a fold."""
    from fedhealth.registry.report import roc_calibration_plots

    releases = {f["held_out"]: f["release"] for f in folds}
    metrics = {f["held_out"]: f["metrics"] for f in folds}
    labels = {f["held_out"]: f"{f['held_out']} held out (n={f['metrics']['n']})" for f in folds}
    pngs = roc_calibration_plots(
        releases,
        metrics,
        pooled=False,
        labels=labels,
        titles={
            "roc": "Leave-one-centre-out: ROC at the held-out centre",
            "calibration": "Leave-one-centre-out: calibration at the held-out centre",
        },
    )
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for kind, png in pngs.items():
        path = folder / PLOTS[kind]
        path.write_bytes(png)
        out.append(path)
    return out


def main() -> None:
    """Run the four folds, print the table, write the plots and the histograms."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="override experiment.rounds (20)")
    ap.add_argument(
        "--centres", nargs="+", choices=CENTRES, default=list(CENTRES),
        help="the held-out centres (default: all four)",
    )  # fmt: skip
    ap.add_argument(
        "--write-docs", action="store_true",
        help=f"write the plots to {DOC_IMAGES.relative_to(ROOT)}/",
    )  # fmt: skip
    ap.add_argument(
        "--out", type=Path, default=None,
        help="folder for the plots and histograms (default: a temporary folder)",
    )  # fmt: skip
    args = ap.parse_args()
    data = shared_data() / "uci-heart-disease"
    if not data.is_dir():
        sys.exit(
            f"benchmark skipped: Heart-Disease data not found at {data} (set FEDHEALTH_SHARED_DATA)"
        )
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="loco-heart-disease-"))
    folds = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for centre in args.centres:
            f = fold(centre, Path(tmp) / centre, data.parent, uri, args.rounds)
            m = f["metrics"]
            print(
                f"{centre} held out: {f['model']} validated on {m['n']} records, AUROC "
                f"{_ci(m['auroc'])} ({f['seconds']['train']:.0f} s training, "
                f"{f['seconds']['validate']:.0f} s validation)",
                flush=True,
            )
            folds.append(f)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loco-heart-disease.json").write_text(json.dumps(folds, indent=1, sort_keys=True))
    written = plots(folds, DOC_IMAGES if args.write_docs else out)
    reference = tomllib.loads((ROOT / "experiments" / "heart-disease.toml").read_text())
    rounds = args.rounds or reference["experiment"]["rounds"]
    strategy = reference.get("strategy", {}).get("name", "fedavg").rsplit(":", 1)[-1]
    print()
    print(
        f"Leave-one-centre-out, Fed-Heart-Disease ({strategy}, {rounds} rounds, logistic "
        "regression); the held-out centre validates on every record (--split all); "
        "95 % bootstrap intervals"
    )
    print(table(folds))
    print()
    print(f"plots: {', '.join(str(p) for p in written)}")
    print(f"histograms and figures: {out / 'loco-heart-disease.json'}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
