"""Deployment overhead and coordinator scale.

Part 1 — the deployed consortium (coordinator + 3 sites as separate processes on
127.0.0.1, TLS and SuperNode authentication, via ``tests/deploy_harness.py``) against the
same experiment in simulation. Per round: wall time (between the round metrics MLflow
recorded), the time the sites spent inside their handlers (from each site's audit log:
``received`` to ``sent``; data loading, training, serialising the reply), and the rest
(process start and imports of the per-message ClientApp, polling, transport, the
coordinator's own work). Medians over rounds.

Part 2 — coordinator scale in simulation: 10, 50 and 100 sites with the tabular model on
small CSVs (the breast-cancer table resampled), round time and the peak RSS (VmHWM) of
the process that runs the ServerApp (the simulation driver).

Run: ``/work/venv/bin/python benchmarks/deployment.py [--rounds 3] [--sites 10 50 100]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.deploy_harness import (  # noqa: E402
    SITES,
    provisioned_consortium,
    write_experiment,
)


def _round_times(tracking_uri: str, experiment: str) -> tuple[list[float], float]:
    """Per-round wall times from the MLflow metric timestamps, and the run's start."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run = client.search_runs([exp.experiment_id])[0]
    hist = sorted(client.get_metric_history(run.info.run_id, "global/accuracy"),
                  key=lambda m: m.step)  # fmt: skip
    stamps = [run.info.start_time / 1000] + [m.timestamp / 1000 for m in hist]
    return [b - a for a, b in itertools.pairwise(stamps)], stamps[0]


def _handler_seconds(site_ws: Path, experiment: str) -> dict[int, float]:
    """Per round: the slowest site's train + evaluate handler time (audit log)."""
    from fedhealth.deploy.audit import audit_path, read

    per: dict[tuple[str, int, str], float] = {}
    for ws in site_ws.iterdir():
        start: dict[tuple[str, int], float] = {}
        for r in read(audit_path(ws)):
            if r.get("experiment") != experiment:
                continue
            key = (r.get("handler", ""), int(r.get("round", 0)))
            if r["event"] == "received":
                start[key] = r["ts"]
            elif r["event"] == "sent" and key in start:
                per[(ws.name, key[1], key[0])] = r["ts"] - start[key]
    rounds: dict[int, float] = {}
    for site in {s for s, _, _ in per}:
        for rnd in {r for _, r, _ in per}:
            t = sum(v for (s, r, _), v in per.items() if s == site and r == rnd)
            rounds[rnd] = max(rounds.get(rnd, 0.0), t)
    return rounds


def _summary(label: str, times: list[float], handlers: dict[int, float]) -> str:
    inside = [handlers.get(i + 1, float("nan")) for i in range(len(times))]
    rest = [t - h for t, h in zip(times, inside, strict=True)]
    med = statistics.median
    return (f"{label:<12} {med(times):>8.1f} s {med(inside):>10.2f} s {med(rest):>10.1f} s "
            f"{med(rest) / med(times):>8.0%}")  # fmt: skip


def deployed_vs_simulated(rounds: int) -> None:
    """Part 1: print per-round wall time, handler time and the rest, both engines."""

    root = Path(tempfile.mkdtemp(prefix="fh-bench-deploy-"))
    dep = provisioned_consortium(root, SITES)
    exp = write_experiment(root, "bench-deploy", SITES, rounds=rounds, round_timeout=120)
    try:
        dep.start_coordinator()
        dep.start_sites(SITES)
        t0 = time.time()
        res = dep.cli("run", str(exp), "--federation", "test", timeout=900)
        assert res.returncode == 0, res.stdout + res.stderr
        deployed_total = time.time() - t0
        d_times, _ = _round_times(dep.tracking_uri, "bench-deploy")
    finally:
        dep.teardown()
    d_handlers = _handler_seconds(root / "site-ws", "bench-deploy")

    # The same experiment in simulation (separate site workspaces and MLflow store).
    sim_exp = exp.with_name("bench-sim.toml")
    sim_exp.write_text(exp.read_text().replace('"bench-deploy"', '"bench-sim"'))
    for site in SITES:
        p = root / "sites" / f"{site}.toml"
        p.write_text(p.read_text().replace(str(root / "site-ws"), str(root / "sim-ws")))
    uri = f"sqlite:///{root / 'sim-mlflow.db'}"
    t0 = time.time()
    res = subprocess.run([str(Path(sys.executable).parent / "fedhealth"), "run", str(sim_exp),
                          "--tracking-uri", uri], cwd=root, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    sim_total = time.time() - t0
    s_times, _ = _round_times(uri, "bench-sim")
    s_handlers = _handler_seconds(root / "sim-ws", "bench-sim")

    print(f"\n== Deployed (3 sites, TLS + SuperNode auth, 127.0.0.1) vs simulation: "
          f"{rounds} rounds, logistic regression, breast-cancer table ==")  # fmt: skip
    print(f"{'engine':<12} {'round':>10} {'in handlers':>12} {'not training':>12} {'share':>8}")
    print(_summary("deployed", d_times, d_handlers))
    print(_summary("simulation", s_times, s_handlers))
    print(f"whole command: deployed {deployed_total:.1f} s, simulation {sim_total:.1f} s "
          f"(simulation includes Ray start)")  # fmt: skip
    print(f"deployed rounds: {', '.join(f'{t:.1f}' for t in d_times)} s; "
          f"simulated rounds: {', '.join(f'{t:.1f}' for t in s_times)} s")  # fmt: skip


SCALE_DRIVER = """
import json, sys, time
from pathlib import Path
from fedhealth.config.experiment import load_experiment_with_sites
from fedhealth.engines.simulation import run_simulation
path = Path(sys.argv[1])
cfg, _ = load_experiment_with_sites(path)
t0 = time.time()
run_simulation(path, cfg, sys.argv[2], cpus_per_site=float(sys.argv[3]))
hwm = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")]
print(json.dumps({"seconds": time.time() - t0, "vmhwm_kb": int(hwm[0].split()[1])}))
"""


def _scale_consortium(root: Path, n_sites: int, rounds: int) -> Path:
    """``n_sites`` site profiles with 40-row CSVs resampled from the breast-cancer table."""
    import numpy as np
    from sklearn.datasets import load_breast_cancer

    from fedhealth.data.demo import breast_cancer_feature_names

    bc = load_breast_cancer()
    names = breast_cancer_feature_names()
    rng = np.random.default_rng(0)
    sites = []
    for i in range(n_sites):
        rows = rng.choice(len(bc.target), size=40, replace=False)
        lines = [",".join([*names, "diagnosis"])]
        for r in rows:
            label = "malignant" if bc.target[r] == 0 else "benign"
            lines.append(",".join([*(f"{v:.6g}" for v in bc.data[r]), label]))
        csv = root / "data" / f"site{i:03d}.csv"
        csv.parent.mkdir(parents=True, exist_ok=True)
        csv.write_text("\n".join(lines) + "\n")
        prof = root / "sites" / f"site{i:03d}.toml"
        prof.parent.mkdir(parents=True, exist_ok=True)
        prof.write_text(
            f'[site]\nname = "site{i:03d}"\nworkspace = "{root / "ws"}"\n\n'
            f'[datasets.breast-cancer]\nkind = "tabular"\npath = "{csv}"\n'
        )
        sites.append(f"site{i:03d}")
    exp = write_experiment(
        root, f"scale-{n_sites}", sites, rounds=rounds, min_sites=2, round_timeout=900
    )
    return exp


def coordinator_scale(sizes: list[int], rounds: int) -> None:
    """Part 2: round time and driver peak memory against the number of sites."""
    print(f"\n== Coordinator scale in simulation: tabular model, {rounds} rounds, "
          "40 rows per site ==")  # fmt: skip
    print(f"{'sites':>6} {'round (median)':>15} {'run':>9} {'peak RSS (VmHWM)':>18}")
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix=f"fh-bench-scale{n}-"))
        exp = _scale_consortium(root, n, rounds)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        res = subprocess.run([sys.executable, "-c", SCALE_DRIVER, str(exp), uri, "0.5"],
                             cwd=root, capture_output=True, text=True, timeout=3600)  # fmt: skip
        if res.returncode != 0:
            print(f"{n:>6} failed: {res.stderr[-800:]}")
            continue
        out = json.loads(res.stdout.strip().splitlines()[-1])
        times, _ = _round_times(uri, f"scale-{n}")
        print(f"{n:>6} {statistics.median(times):>13.1f} s {out['seconds']:>7.1f} s "
              f"{out['vmhwm_kb'] / 1024:>15.0f} MB")  # fmt: skip


def main() -> None:
    """Parse arguments and run both parts."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale-rounds", type=int, default=2)
    ap.add_argument("--sites", type=int, nargs="*", default=[10, 50, 100])
    ap.add_argument("--skip-deploy", action="store_true")
    args = ap.parse_args()
    if not args.skip_deploy:
        deployed_vs_simulated(args.rounds)
    if args.sites:
        coordinator_scale(args.sites, args.scale_rounds)


if __name__ == "__main__":
    main()
