"""Deployment overhead, coordinator scale, and what a ClientApp process imports.

Part 1 — the deployed consortium (coordinator + 3 sites as separate processes on 127.0.0.1,
TLS and SuperNode authentication, via ``tests/deploy_harness.py``) against the same
experiment in simulation (Flower's engine, Ray): logistic regression on the breast-cancer
table with DP-SGD (ε = 1 per site) and encrypted aggregation (the consortium's CKKS keys;
the simulated sites use the same profiles, keys and experiment, with fresh workspaces).
The deployed run is submitted once every site's app process is ready (it starts once, with
the site, and imports torch, Opacus and TenSEAL then; the time it took is printed).
A round is three message exchanges: train, decrypt (the HE quorum) and evaluate. Every
column is a median over rounds, in seconds; each round's value is derived as follows.

* **round** (wall): between the coordinator's MLflow timestamps of ``global/accuracy`` of
  the previous round (the run's start for round 1) and of this round.
* For each exchange, the **slowest site** is the one with the largest process start +
  handler time, from its audit log's ``timing`` (``fedhealth.site.timing``; ``sent`` or
  ``refused`` line). The site columns add up that site's parts over the round's exchanges:
  **process start** = ``process_start_s`` (the ClientApp process's creation to the handler's
  start: Python, Flower's startup, importing ``fedhealth.site.client_app``; 0 for a simulated
  site's long-lived worker after its first message) + ``import_s`` (what the handler
  imports for the message); **serialisation** = ``serialise_s`` (building the reply's
  records, reading the request's arrays); **encryption** = ``encrypt_s`` + ``decrypt_s``
  (HE keys, flatten, encrypt, sign; checking and decrypting the sum); **training** =
  ``train_s`` + ``evaluate_s`` (local steps; the evaluation pass); **data loading** =
  ``load_s``; **DP accounting** = ``privacy_s`` (plan, policy, ledger); **site other** =
  ``other_s`` (profile, audit log, policy checks).
* **coordinator work**: what the coordinator's own clock shows it doing between exchanges:
  for each exchange, from the first MLflow metric timestamp at or after the end of the
  previous exchange (the run's start for round 1; the sites' last ``sent``) to the
  creation of the exchange's requests (``created_at`` of the request, recorded by the
  sites as ``queued_s``), when that timestamp precedes it; plus the HE sum the coordinator
  reports (``he/aggregate_seconds``). It holds checkpointing, MLflow logging, aggregation
  and preparing the next requests; work with no timestamp before it (receiving the
  decryption answers and averaging them, for instance) stays in polling/transport.
* **polling/transport** = round − the slowest sites' (process start + handler) summed over
  the exchanges − coordinator work: the SuperLink, the SuperNodes' and the ServerApp's
  polling, Flower's own (de)serialisation and transport, the SuperNode spawning the
  process. The line below the table splits off its first part, request created → the
  slowest site's process created.

Part 2 — coordinator scale in simulation: 10, 50 and 100 sites with the tabular model on
small CSVs (the breast-cancer table resampled), round time and the peak RSS (VmHWM) of
the process that runs the ServerApp (the simulation driver).

Part 3 — what a fresh process imports for each kind of message: in fresh processes that
first import Flower, the time to import ``fedhealth.site.client_app`` and what the message
needs, with ``torch.optim.SGD``'s first build and step (which imports ``torch._dynamo``) for
training. A deployed site pays this once, when its app process starts (its log,
``site-exec.log``, says how long that took; Part 1 prints it); a simulated site's worker
on its first message of each kind. Medians of ``--import-reps`` runs.

Run: ``.venv/bin/python benchmarks/deployment.py [--rounds 3] [--sites 10 50 100]
[--skip-deploy] [--skip-imports] [--import-reps 5] [--keep]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.deploy_harness import (  # noqa: E402
    SITES,
    privacy_sections,
    provisioned_consortium,
    write_experiment,
)

COLUMNS = (
    "process start", "polling/transport", "serialisation", "encryption", "training",
    "data loading", "DP accounting", "site other", "coordinator work",
)  # fmt: skip


def _round_times(tracking_uri: str, experiment: str) -> tuple[list[float], float]:
    """Per-round wall times from the MLflow metric timestamps, and the run's start."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run = client.search_runs([exp.experiment_id])[0]
    hist = sorted(client.get_metric_history(run.info.run_id, "global/accuracy"),
                  key=lambda m: m.step)  # fmt: skip
    stamps = [run.info.start_time / 1000] + [m.timestamp / 1000 for m in hist]
    return [b - a for a, b in itertools.pairwise(stamps)], stamps[0]


@dataclass
class CoordinatorClock:
    """What the coordinator's MLflow run says about time (epoch seconds)."""

    start: float  # the run's creation
    round_end: dict[int, float]  # round -> timestamp of global/accuracy
    stamps: list[float]  # every metric timestamp (and the start), sorted
    he_sum: dict[int, float]  # round -> he/aggregate_seconds


def _coordinator_clock(tracking_uri: str, experiment: str) -> CoordinatorClock:
    """Every metric timestamp of the experiment's run (read before the server stops)."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run = client.search_runs([exp.experiment_id])[0]
    start = run.info.start_time / 1000
    stamps, ends, he_sum = [start], {}, {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            stamps.append(m.timestamp / 1000)
            if key == "global/accuracy":
                ends[m.step] = m.timestamp / 1000
            elif key == "he/aggregate_seconds":
                he_sum[m.step] = m.value
    return CoordinatorClock(start, ends, sorted(stamps), he_sum)


@dataclass
class SiteCall:
    """One handler invocation at one site, from its audit log (epoch seconds)."""

    site: str
    handler: str
    round: int
    created: float  # the coordinator created the request
    process: float  # the ClientApp process was created (handler start for a reused one)
    end: float  # the handler finished
    timing: dict[str, float]


def _site_calls(site_ws: Path, experiment: str) -> list[SiteCall]:
    """Every audited handler call of ``experiment`` with its timing, all sites."""
    from fedhealth.site.audit import audit_path, read

    calls = []
    for ws in sorted(p for p in site_ws.iterdir() if p.is_dir()):
        for r in read(audit_path(ws)):
            t = r.get("timing")
            if r.get("experiment") != experiment or r["event"] == "received" or not t:
                continue
            end = float(r["ts"])
            process = end - t["handler_s"] - t["process_start_s"]
            created = process - t["queued_s"] if "queued_s" in t else process
            calls.append(SiteCall(ws.name, r["handler"], int(r["round"]), created, process,
                                  end, t))  # fmt: skip
    return calls


def _round_exchanges(calls: list[SiteCall], rnd: int) -> list[list[SiteCall]]:
    """Round ``rnd``'s calls grouped by handler (one exchange each), in the order sent."""
    by_handler: dict[str, list[SiteCall]] = {}
    for c in calls:
        if c.round == rnd:
            by_handler.setdefault(c.handler, []).append(c)
    return sorted(by_handler.values(), key=lambda cs: min(c.created for c in cs))


def _breakdown(calls: list[SiteCall], clock: CoordinatorClock) -> list[dict[str, float]]:
    """Per round: wall time and the columns (see the module docstring)."""
    rows = []
    for rnd in sorted(clock.round_end):
        begin = clock.round_end.get(rnd - 1, clock.start)
        row = dict.fromkeys(COLUMNS, 0.0)
        row["round"] = clock.round_end[rnd] - begin
        row["request to process"] = row["imports"] = 0.0
        exchanges = _round_exchanges(calls, rnd)
        prev_end, on_sites = begin, 0.0
        for ex in exchanges:
            slow = max(ex, key=lambda c: c.end - c.process)
            t = slow.timing
            on_sites += slow.end - slow.process
            row["process start"] += t["process_start_s"] + t["import_s"]
            row["imports"] += t["import_s"]
            row["serialisation"] += t["serialise_s"]
            row["encryption"] += t["encrypt_s"] + t["decrypt_s"]
            row["training"] += t["train_s"] + t["evaluate_s"]
            row["data loading"] += t["load_s"]
            row["DP accounting"] += t["privacy_s"]
            row["site other"] += t["other_s"]
            created = min(c.created for c in ex)
            row["request to process"] += slow.process - created
            marker = next((s for s in clock.stamps if s >= prev_end), None)
            if marker is not None and marker <= created:
                row["coordinator work"] += created - marker
            prev_end = max(c.end for c in ex)
        row["coordinator work"] += clock.he_sum.get(rnd, 0.0)
        row["polling/transport"] = row["round"] - on_sites - row["coordinator work"]
        row["exchanges"] = float(len(exchanges))
        rows.append(row)
    return rows


def _exchange_lines(calls: list[SiteCall], clock: CoordinatorClock) -> list[str]:
    """Per round, each exchange's timeline (s): request created -> slowest site's process,
    that site's handler, its end -> the next exchange's request (or the round's end)."""
    lines = []
    for rnd in sorted(clock.round_end):
        exchanges = _round_exchanges(calls, rnd)
        parts = []
        for i, ex in enumerate(exchanges):
            slow = max(ex, key=lambda c: c.end)
            created = min(c.created for c in ex)
            after = (min(c.created for c in exchanges[i + 1]) if i + 1 < len(exchanges)
                     else clock.round_end[rnd])  # fmt: skip
            parts.append(f"{slow.handler} {slow.process - created:.2f} + "
                         f"{slow.end - slow.process:.2f} ({slow.site}) + "
                         f"{after - slow.end:.2f}")  # fmt: skip
        lines.append(f"  round {rnd}: " + "; ".join(parts))
    return lines


def _table_line(label: str, rows: list[dict[str, float]]) -> str:
    med = {k: statistics.median(r[k] for r in rows) for k in ("round", *COLUMNS)}
    cells = [f"{med['round']:>6.2f}"] + [f"{med[c]:>{max(len(c), 6)}.3f}" for c in COLUMNS]
    return f"{label:<11} " + " ".join(cells)


def deployed_vs_simulated(rounds: int, keep: bool = False) -> None:
    """Part 1: per-round wall time and where it went, deployed and simulated; the working
    directory (workspaces, audit and SuperNode logs) is removed unless ``keep``."""
    root = Path(tempfile.mkdtemp(prefix="fh-bench-deploy-"))
    try:
        _deployed_vs_simulated(rounds, root)
    finally:
        if keep:
            print(f"kept the consortium's files in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _deployed_vs_simulated(rounds: int, root: Path) -> None:
    dep = provisioned_consortium(root, SITES)  # with the HE key ceremony
    exp = write_experiment(root, "bench-deploy", SITES, rounds=rounds, round_timeout=120,
                           extra=privacy_sections(root))  # fmt: skip
    try:
        dep.start_coordinator()
        dep.start_sites(SITES)
        # A site's app process starts once, long before a run in practice: wait for it, so
        # that round 1 does not share the 2 cores with three processes importing torch.
        _wait_app_processes(root / "site-ws", len(SITES))
        t0 = time.time()
        res = dep.cli("run", str(exp), "--federation", "test", timeout=900)
        assert res.returncode == 0, res.stdout + res.stderr
        deployed_total = time.time() - t0
        d_clock = _coordinator_clock(dep.tracking_uri, "bench-deploy")
    finally:
        dep.teardown()
    deployed = _breakdown(_site_calls(root / "site-ws", "bench-deploy"), d_clock)

    # The same experiment in simulation: same profiles and keys, fresh site workspaces
    # (privacy and HE ledgers) and MLflow store.
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
    s_clock = _coordinator_clock(uri, "bench-sim")
    simulated = _breakdown(_site_calls(root / "sim-ws", "bench-sim"), s_clock)

    print(f"\n== Deployed (3 sites, TLS + SuperNode auth, 127.0.0.1) vs simulation: {rounds} "
          "rounds, DP-SGD (ε = 1) + encrypted aggregation, logistic regression, breast-cancer "
          "table; seconds, medians over rounds ==")  # fmt: skip
    head = [f"{'round':>6}"] + [f"{c:>{max(len(c), 6)}}" for c in COLUMNS]
    print(f"{'engine':<11} " + " ".join(head))
    print(_table_line("deployed", deployed))
    print(_table_line("simulation", simulated))
    med = statistics.median
    for label, rows in (("deployed", deployed), ("simulated", simulated)):
        walls = ", ".join(f"{r['round']:.2f}" for r in rows)
        print(f"{label}: rounds {walls} s; {med(r['exchanges'] for r in rows):.0f} exchanges "
              f"per round; process start {med(r['process start'] for r in rows):.2f} s, of "
              f"which the handlers' imports {med(r['imports'] for r in rows):.2f} s; "
              f"polling/transport {med(r['polling/transport'] for r in rows):.2f} s, of which "
              f"request created -> slowest site's process "
              f"{med(r['request to process'] for r in rows):.2f} s")  # fmt: skip
    print("exchanges, deployed (request created -> slowest site's process + its handler "
          "(site) + its reply -> the next request or the round's end), s:")  # fmt: skip
    print("\n".join(_exchange_lines(_site_calls(root / "site-ws", "bench-deploy"), d_clock)))
    print(f"whole command: deployed {deployed_total:.1f} s (the sites' app processes ready "
          f"before it), simulation {sim_total:.1f} s (includes Ray start)")  # fmt: skip
    ready = _app_process_starts(root / "site-ws")
    if ready:
        print(
            "each deployed site's app process started once, before the run (its imports: "
            f"torch, pandas, Opacus, TenSEAL): {', '.join(f'{s:.1f}' for s in ready)} s"
        )
    med_d = statistics.median(r["round"] for r in deployed)
    med_s = statistics.median(r["round"] for r in simulated)
    verdict = "met" if med_d <= med_s + 2 else "NOT met"
    print(
        f"target deployed round <= simulated round + 2 s: {med_d:.2f} <= {med_s:.2f} + 2 "
        f"-> {verdict}"
    )


def _wait_app_processes(site_ws: Path, n: int, timeout: float = 600) -> None:
    """Wait until ``n`` site app processes logged that they are ready (``site-exec.log``)."""
    deadline = time.time() + timeout
    while len(_app_process_starts(site_ws)) < n:
        if time.time() > deadline:
            raise TimeoutError(f"the sites' app processes were not ready after {timeout:.0f} s")
        time.sleep(0.5)


def _app_process_starts(site_ws: Path) -> list[float]:
    """Seconds each site's app process took to start (``site-exec.log``'s ready line)."""
    import re

    out = []
    for log in sorted(site_ws.glob("*/logs/site-exec.log")):
        for m in re.finditer(r"ready in ([0-9.]+) s", log.read_text(errors="replace")):
            out.append(float(m.group(1)))
    return out


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
        # Each site its own workspace (ledger, pinned splits, audit log); public data, so
        # exact metrics, and splits of 40 rows are allowed (the default minimum is 50).
        prof.write_text(
            f'[site]\nname = "site{i:03d}"\nworkspace = "{root / "ws" / f"site{i:03d}"}"\n\n'
            f'[datasets.breast-cancer]\nkind = "tabular"\npath = "{csv}"\n\n'
            '[privacy]\nrelease_metrics = "exact"\nmin_split_records = 5\n'
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


IMPORT_PROBE = """
import json, sys, time
import flwr.app, flwr.clientapp  # a flwr-clientapp process has these before loading the app
print("-- the ClientApp's imports --", file=sys.stderr, flush=True)
t0 = time.perf_counter()
for name in json.loads(sys.argv[1]):
    __import__(name)  # unlike importlib.import_module, logged by -X importtime
imports = time.perf_counter() - t0
optimiser = 0.0
if sys.argv[2] == "torch":
    import torch
    t0 = time.perf_counter()
    model = torch.nn.Linear(5, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    model(torch.zeros(4, 5)).sum().backward()
    opt.step()
    optimiser = time.perf_counter() - t0
heavy = ["torch", "pandas", "opacus", "tenseal", "mlflow", "torch._dynamo", "sympy", "scipy"]
print(json.dumps({"imports": imports, "optimiser": optimiser,
                  "loaded": [m for m in heavy if m in sys.modules]}))
"""

APP = "fedhealth.site.client_app"
RUNTIME = "fedhealth.site.runtime"
#: message -> (modules, optimiser step: "torch" or "none")
IMPORT_CASES = {
    "module import only": ([APP], "none"),
    "train (DP + HE)": ([APP, RUNTIME, "opacus", "fedhealth.site.encrypted_reply"], "torch"),
    "train (plaintext)": ([APP, RUNTIME], "torch"),
    "evaluate": ([APP, RUNTIME], "none"),
    "decrypt (HE quorum)": ([APP, "fedhealth.site.encrypted_reply"], "none"),
}


def _probe(modules: list[str], optimiser: str, importtime: bool = False) -> dict:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", IMPORT_PROBE,
           json.dumps(modules), optimiser]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if importtime:
        out["importtime"] = res.stderr
    return out


def _packages(importtime: str, floor_s: float = 0.05) -> list[tuple[str, float]]:
    """Packages a probe's ``-X importtime`` log shows after Flower's, with cumulative cost."""
    lines = importtime.splitlines()
    after = lines.index("-- the ClientApp's imports --")
    found = []
    for line in lines[after + 1 :]:
        parts = line.split("|")
        name = parts[2].strip() if len(parts) == 3 else ""
        if name and "." not in name and parts[1].strip().isdigit():
            found.append((name, int(parts[1]) / 1e6))
    return sorted((f for f in found if f[1] >= floor_s), key=lambda f: -f[1])


def clientapp_imports(reps: int) -> None:
    """Part 3: what a fresh process imports for each kind of message."""
    seconds: dict[str, list[float]] = {}
    loaded: dict[str, list[str]] = {}
    for _ in range(reps):  # interleaved, so load from other jobs hits every case alike
        for case, (mods, opt) in IMPORT_CASES.items():
            out = _probe(mods, opt)
            seconds.setdefault(case, []).append(out["imports"] + out["optimiser"])
            loaded[case] = out["loaded"]
    print(f"\n== A fresh process's imports per kind of message (after Flower's own), "
          f"seconds, median of {reps} processes; a deployed site pays them once, at its "
          "start ==")  # fmt: skip
    print(f"{'message':<22} {'seconds':>7}  heavy modules")
    for case in IMPORT_CASES:
        mods = ", ".join(loaded[case]) or "-"
        print(f"{case:<22} {statistics.median(seconds[case]):>7.2f}  {mods}")
    first = _probe(*IMPORT_CASES["train (DP + HE)"], importtime=True)
    top = _packages(first["importtime"])
    print("packages a DP + HE training message imports (-X importtime, one run, cumulative; "
          "nested ones count in their importer too): "
          + ", ".join(f"{name} {s:.2f} s" for name, s in top))  # fmt: skip


def main() -> None:
    """Parse arguments and run the parts."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale-rounds", type=int, default=2)
    ap.add_argument("--sites", type=int, nargs="*", default=[10, 50, 100])
    ap.add_argument("--skip-deploy", action="store_true")
    ap.add_argument("--skip-imports", action="store_true")
    ap.add_argument("--import-reps", type=int, default=5)
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the deployed consortium's files (audit logs, site logs)",
    )
    args = ap.parse_args()
    if not args.skip_imports:
        clientapp_imports(args.import_reps)
    if not args.skip_deploy:
        deployed_vs_simulated(args.rounds, args.keep)
    if args.sites:
        coordinator_scale(args.sites, args.scale_rounds)


if __name__ == "__main__":
    main()
