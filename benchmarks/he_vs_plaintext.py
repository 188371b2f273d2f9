"""Encrypted aggregation against plaintext: the same experiment, side by side, in one run.

Runs an experiment (default: the quickstart imaging task, DICOM phantoms, small GroupNorm CNN)
on Flower's simulation engine with ``privacy.he`` off and on, alternating the order each
repetition so that machine load hits both alike, and prints medians of:

* final test accuracy (weighted over the sites' test splits) - target: HE within 0.5 points;
* round wall time (round start to evaluation done, as the coordinator sees it) and its ratio
  HE / plaintext - target <= 1.3x on the quickstart imaging task; also the training phase
  alone (where encryption, the encrypted sum and the decryption query happen);
* bytes on the wire per parameter per site: upload (a site's ciphertexts) and the download of
  each decrypting site (the summed ciphertexts), against 4 B/param of plaintext float32;
* encryption throughput: in the run (the sites' own timing of flatten + pack + encrypt +
  sign, per round) and, with ``benchmarks/he_costs.py``'s protocol run, for a 100 k vector
  and a ~7 M-parameter MONAI DenseNet121 update (bytes and seconds).

Differential privacy is switched off in both runs, and the temporary copies of the site
profiles are relaxed to allow that (``--keep-dp`` keeps the experiment's and sites' settings):
the comparison isolates encryption (with DP on, the sites' noise is derived from the global
weights they receive, so the two runs would draw different noise after round 1), and
repeated runs do not spend ε. The sites' data and the consortium keys are written to a
temporary directory.

Usage::

    python benchmarks/he_vs_plaintext.py                      # imaging, 3 repetitions
    python benchmarks/he_vs_plaintext.py --experiment experiments/quickstart.toml --reps 2
    python benchmarks/he_vs_plaintext.py --quick              # 1 repetition, no DenseNet
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
SITES = ["st-olav", "karolinska", "charite"]


def _variant(base: Path, out: Path, name: str, he: bool, keep_dp: bool, rounds: int | None):
    """A copy of experiment ``base`` with HE on/off (and DP off unless kept)."""
    doc = tomllib.loads(base.read_text())
    doc["experiment"]["sites"] = [
        str((base.parent / s).resolve()) for s in doc["experiment"]["sites"]
    ]
    if rounds:
        doc["experiment"]["rounds"] = rounds
    privacy = doc.setdefault("privacy", {})
    he_table = privacy.setdefault("he", {})
    he_table["enabled"] = he
    if "keys_dir" in he_table:
        he_table["keys_dir"] = str((base.parent / he_table["keys_dir"]).resolve())
    else:
        he_table["keys_dir"] = str((base.parent.parent / "workspace" / "consortium").resolve())
    if not keep_dp and "dp" in privacy:
        privacy["dp"]["enabled"] = False
    doc.setdefault("tracking", {})["register"] = False
    path = out / f"{name}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def _relax_sites(folder: Path) -> None:
    """Let the copied site profiles take part without DP (no ε caps, no required DP)."""
    for path in folder.glob("*.toml"):
        doc = tomllib.loads(path.read_text())
        policy = doc.get("privacy", {})
        policy["require_dp"] = False
        for cap in (
            "min_noise_multiplier",
            "max_epsilon_per_experiment",
            "lifetime_epsilon_budget",
        ):
            policy.pop(cap, None)
        path.write_text(tomli_w.dumps(doc))


def _run(path: Path, uri: str) -> dict[str, Any]:
    """One simulated federation: per-round times, final accuracy, the HE costs."""
    import mlflow

    from fedhealth.config.experiment import load_experiment
    from fedhealth.engines.simulation import run_simulation

    cfg = load_experiment(path)
    marks: dict[tuple[str, int], float] = {}

    def watch(event) -> None:
        marks[(event.kind, event.round)] = time.perf_counter()

    summary = run_simulation(path, cfg, uri, verbose=False, on_event=watch)
    rounds = range(1, cfg.experiment.rounds + 1)
    round_s = [marks[("evaluate-done", r)] - marks[("round-started", r)] for r in rounds]
    train_s = [marks[("train-done", r)] - marks[("round-started", r)] for r in rounds]
    metrics = mlflow.MlflowClient(uri, registry_uri=uri).get_run(summary.run_id).data.metrics
    history = mlflow.MlflowClient(uri, registry_uri=uri).get_metric_history
    enc = [m.value for m in history(summary.run_id, "he/encrypt_seconds")]
    parts = {
        k: [m.value for m in history(summary.run_id, f"he/{k}")]
        for k in ("decrypt_roundtrip_seconds", "decrypt_seconds", "aggregate_seconds")
    }
    return {
        "accuracy": summary.global_metrics.get("accuracy", float("nan")),
        "n_test": summary.global_metrics.get("num-examples", 0),
        "round_s": round_s,
        "train_s": train_s,
        "up": metrics.get("he/bytes_per_param_per_site"),
        "down": metrics.get("he/request_bytes_per_param"),
        "enc_s": enc,
        "parts": parts,
    }


def _n_params(path: Path) -> int:
    from fedhealth.config.experiment import load_experiment
    from fedhealth.coordinator.federation import input_dim
    from fedhealth.models import build_model

    cfg = load_experiment(path)
    spec = cfg.task_spec()
    model = build_model(spec.model, input_dim(cfg), spec.task.num_classes, spec.seed)
    return sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())


def _he_costs_module():
    spec = importlib.util.spec_from_file_location("he_costs", ROOT / "benchmarks" / "he_costs.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _crypto_table(densenet: bool) -> None:
    """Bytes and seconds of the full protocol on big updates (benchmarks/he_costs.py)."""
    import numpy as np

    from fedhealth.privacy.he.ckks import HEParams

    costs = _he_costs_module()
    vectors = {"100k vector": np.random.default_rng(0).normal(0, 0.05, 100_000)}
    if densenet:
        vectors["DenseNet121 2D"] = costs._densenet_vector()
    print("\nfull protocol on larger updates (3 sites, one core, medians of 3; he_costs.py):")
    print(
        f"  {'update':<15} {'params':>10} {'up B/p':>7} {'down B/p':>8} {'up MB/site':>10} "
        f"{'enc s':>6} {'enc Mp/s':>8} {'add s/site':>10} {'decrypt s':>9}"
    )
    for name, vec in vectors.items():
        with tempfile.TemporaryDirectory() as tmp:
            r = costs._run(HEParams(), vec, 3, Path(tmp) / "c")
        print(
            f"  {name:<15} {vec.size:>10,} {r['up']:>7.2f} {r['down']:>8.2f} "
            f"{r['up'] * vec.size / 1e6:>10.1f} {vec.size / r['enc']:>6.2f} "
            f"{r['enc'] / 1e6:>8.2f} {r['add']:>10.3f} {r['dec']:>9.3f}",
            flush=True,
        )


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    """Run both variants, alternating, and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", type=Path, default=ROOT / "experiments/quickstart-imaging.toml")
    ap.add_argument("--reps", type=int, default=3, help="runs of each variant")
    ap.add_argument("--rounds", type=int, default=None, help="override experiment.rounds")
    ap.add_argument("--keep-dp", action="store_true", help="keep the experiment's DP setting")
    ap.add_argument("--no-densenet", action="store_true", help="skip the DenseNet121 update")
    ap.add_argument("--quick", action="store_true", help="1 repetition, no DenseNet121")
    args = ap.parse_args()
    reps = 1 if args.quick else max(1, args.reps)

    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    from fedhealth.data.demo import write_demo_data
    from fedhealth.privacy.he.demo import ensure_consortium

    work = Path(tempfile.mkdtemp(prefix="fedhealth-he-bench-"))
    try:
        for folder in ("experiments", "sites", "strategies"):
            shutil.copytree(ROOT / folder, work / folder)
        if not args.keep_dp:
            _relax_sites(work / "sites")
        os.chdir(work)
        write_demo_data(work / "workspace" / "demo-data", SITES, seed=0)
        ensure_consortium(work / "workspace" / "consortium", SITES, SITES[0])
        base = work / "experiments" / args.experiment.name
        variants = {
            he: _variant(
                base, work / "experiments", f"bench-he-{he}", he, args.keep_dp, args.rounds
            )
            for he in (False, True)
        }
        uri = f"sqlite:///{work / 'mlflow.db'}"
        n_params = _n_params(variants[True])
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for rep in range(reps):
            for he in (False, True) if rep % 2 == 0 else (True, False):
                t0 = time.perf_counter()
                runs[he].append(_run(variants[he], uri))
                print(
                    f"rep {rep + 1}/{reps} HE {'on ' if he else 'off'}: "
                    f"accuracy {runs[he][-1]['accuracy']:.4f}, "
                    f"{time.perf_counter() - t0:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
        _report(args.experiment.name, n_params, runs)
        if not args.quick:
            _crypto_table(densenet=not args.no_densenet)
    finally:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)


def _report(name: str, n_params: int, runs: dict[bool, list[dict]]) -> None:
    off, on = runs[False], runs[True]
    acc = {he: _med([r["accuracy"] for r in rs]) for he, rs in runs.items()}
    rnd = {he: _med([t for r in rs for t in r["round_s"]]) for he, rs in runs.items()}
    trn = {he: _med([t for r in rs for t in r["train_s"]]) for he, rs in runs.items()}
    enc = _med([t for r in on for t in r["enc_s"]])
    up = _med([r["up"] for r in on if r["up"]])
    down = _med([r["down"] for r in on if r["down"]])
    print(
        f"\n{name}: {n_params:,} parameters, {len(off)} run(s) per variant, "
        f"{len(off[0]['round_s'])} rounds each; medians over runs (accuracy) and over all "
        "rounds of all runs (times)"
    )
    print(f"  {'':<34} {'plaintext':>10} {'HE':>10} {'HE/plain':>9}")
    print(
        f"  {'final test accuracy':<34} {acc[False]:>10.4f} {acc[True]:>10.4f} "
        f"{(acc[True] - acc[False]) * 100:>+8.2f}pt"
    )
    lo = {he: min(r["accuracy"] for r in rs) for he, rs in runs.items()}
    hi = {he: max(r["accuracy"] for r in rs) for he, rs in runs.items()}
    n_test = int(off[0]["n_test"])
    print(
        f"  {'  range over runs':<34} {lo[False]:.4f}-{hi[False]:.4f} "
        f"{lo[True]:.4f}-{hi[True]:.4f}   ({n_test} test examples: one is "
        f"{100 / max(n_test, 1):.2f} pt)"
    )
    print(
        f"  {'round wall time (s)':<34} {rnd[False]:>10.2f} {rnd[True]:>10.2f} "
        f"{rnd[True] / rnd[False]:>8.2f}x"
    )
    print(
        f"  {'  of which training phase (s)':<34} {trn[False]:>10.2f} {trn[True]:>10.2f} "
        f"{trn[True] / trn[False]:>8.2f}x"
    )
    # Flower polls for replies every 100 ms, so single round times are coarse: means too
    # (without round 1, which includes starting Ray's workers).
    mean = {
        he: statistics.fmean([t for r in rs for t in r["round_s"][1:]]) for he, rs in runs.items()
    }
    print(
        f"  {'round wall time, mean of rounds 2+':<34} {mean[False]:>10.2f} {mean[True]:>10.2f} "
        f"{mean[True] / mean[False]:>8.2f}x"
    )
    print(f"  {'upload B/param/site':<34} {4.0:>10.2f} {up:>10.2f} {up / 4:>8.2f}x")
    print(f"  {'download B/param (decrypting site)':<34} {'':>10} {down:>10.2f}")
    print(
        f"  {'site encryption s/round':<34} {'':>10} {enc:>10.4f}   "
        f"({n_params / enc / 1e6:.2f} M params/s incl. per-call overhead)"
    )
    part = {k: _med([t for r in on for t in r["parts"][k]]) for k in on[0]["parts"]}
    print(
        f"  HE extra per round: decryption exchange {part['decrypt_roundtrip_seconds']:.3f} s "
        f"(of which the site's checks + decryption {part['decrypt_seconds']:.3f} s), "
        f"encryption {enc:.3f} s per site, coordinator sum {part['aggregate_seconds']:.3f} s"
    )
    ok_acc = abs(acc[True] - acc[False]) <= 0.005
    ok_time = rnd[True] / rnd[False] <= 1.3
    print(
        f"  targets: accuracy within 0.5 pt {'ok' if ok_acc else 'MISSED'}; "
        f"round time <= 1.3x {'ok' if ok_time else 'MISSED'}; upload <= 24 B/param "
        f"{'ok' if up <= 24 else 'MISSED (small model: last-chunk padding, see below)'}"
    )


if __name__ == "__main__":
    main()
