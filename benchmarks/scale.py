"""Scale: the coordinator's aggregation of many sites' replies, and the encrypted streaming sum.

Two measurements, each size in a fresh process (so that its peak memory is its own):

1. **Coordinator aggregation at N sites** (``--sites``, default 125 250 500 1000), tabular
   model (the quickstart's MLP, 30 features, hidden [32]: 1,122 parameters; ``--hidden``
   for another width). The coordinator's own path of a plaintext training round, on N real
   Flower reply messages built as sites send them (update arrays, ``num-examples`` and
   training metrics, the site record): the malformed-reply checks of every reply
   (``federation._update_problem``), the metric-key reconciliation
   (``federation._common_metric_keys``) and Flower's ``FedAvg.aggregate_train``. Printed:
   the round's CPU seconds (median of ``--reps``), CPU per site, and the process's peak
   resident memory (``VmHWM``) with all N replies held, as the coordinator holds them.
   Linear growth shows as a flat "per site" column. Site-side training is not included:
   every site trains on its own machine.
2. **Encrypted streaming sum at S sites** (``--he-sites``, default 100; ``--he-params``
   values per update): the full protocol (signed contributions, tags, digests), each site's
   ciphertexts added to the coordinator's running sum as they arrive
   (:class:`fedhealth.privacy.he.encrypted_sum.EncryptedSum`). Printed: the resident memory
   after the first contribution and after every ``S / 5`` more, and the peak: a flat line
   means memory does not grow with the number of sites.

Usage::

    python benchmarks/scale.py                       # both parts (about 5 minutes)
    python benchmarks/scale.py --sites 1000 --reps 3 --no-he
    python benchmarks/scale.py --sites --he-sites 100  # the HE part only

CPU time is the process's (``time.process_time``): on a shared machine it counts this
process's work only.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- 1. coordinator aggregation -------------------------------------------------------------


def _replies(n_sites: int, hidden: list[int]) -> tuple[Any, list[Any]]:
    """The global arrays and N training replies (updates around them), as sites send them."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedhealth.models import build_model
    from fedhealth.protocol import Metric, Record, SiteKey

    # What a ServerApp's process has set when it builds messages (run 1, the coordinator).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    model = build_model({"name": "mlp", "hidden": hidden}, 30, 2, seed=0)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    arrays = ArrayRecord({k: Array(v) for k, v in state.items()})
    rng = np.random.default_rng(0)
    replies = []
    for i in range(n_sites):
        request = Message(
            RecordDict({Record.ARRAYS: arrays}), dst_node_id=i + 1, message_type=MessageType.TRAIN
        )
        request.metadata.__dict__["_message_id"] = f"m{i}"  # what a SuperLink assigns
        update = {
            k: Array((v + rng.normal(0, 0.01, v.shape)).astype(v.dtype)) for k, v in state.items()
        }
        content = RecordDict(
            {
                Record.ARRAYS: ArrayRecord(update),
                Record.METRICS: MetricRecord(
                    {Metric.NUM_EXAMPLES: int(rng.integers(40, 400)), "loss": 0.5}
                ),
                Record.SITE: ConfigRecord({SiteKey.NAME: f"site{i:04d}"}),
            }
        )
        replies.append(Message(content, reply_to=request))
    return arrays, replies


def _aggregate(arrays: Any, replies: list[Any]) -> float:
    """CPU seconds of the coordinator's aggregation of ``replies``."""
    from flwr.serverapp.strategy import FedAvg

    from fedhealth.coordinator.federation import _common_metric_keys, _site, _update_problem
    from fedhealth.protocol import Metric

    strategy = FedAvg(weighted_by_key=Metric.NUM_EXAMPLES)
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    t0 = time.process_time()
    ok = sorted(replies, key=_site)
    ok = [m for m in ok if _update_problem(m, Metric.NUM_EXAMPLES, shapes) is None]
    new, _ = strategy.aggregate_train(1, _common_metric_keys(ok))
    elapsed = time.process_time() - t0
    if new is None or len(ok) != len(replies):
        raise SystemExit("aggregation refused replies")
    return elapsed


def coordinator_child(n_sites: int, reps: int, hidden: list[int]) -> dict[str, float]:
    """One size, in this process: median CPU seconds and peak memory."""
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    base = _rss_mb()
    arrays, replies = _replies(n_sites, hidden)
    times = [_aggregate(arrays, replies) for _ in range(reps)]
    return {"cpu": statistics.median(times), "peak": _rss_mb("VmHWM"), "base": base}


# -- 2. encrypted streaming sum -------------------------------------------------------------


def he_child(n_sites: int, n_values: int) -> dict[str, Any]:
    """Resident memory of the coordinator's running sum as ``n_sites`` contributions arrive."""
    import numpy as np

    from fedhealth.privacy.he.ceremony import (
        init_consortium,
        load_coordinator_keys,
        load_site_keys,
    )
    from fedhealth.privacy.he.ckks import HEParams
    from fedhealth.privacy.he.contribute import make_contribution
    from fedhealth.privacy.he.encrypted_sum import EncryptedSum

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sites = [f"site{i:03d}" for i in range(n_sites)]
        init_consortium(root, sites, sites[0], HEParams())
        coord = load_coordinator_keys(root)
        total = EncryptedSum(coord.public_context, "bench", 1, "n1", coord.registry)
        vec = np.random.default_rng(0).normal(0, 0.01, n_values)
        every = max(n_sites // 5, 1)
        trace: list[tuple[int, float]] = []
        add_cpu = []
        for i, s in enumerate(sites):
            keys = load_site_keys(
                None,
                s,
                identity_path=root / f"sites/{s}/identity.pem",
                wrapped_path=root / f"sites/{s}/he-secret.wrapped",
                registry_path=root / "public/registry.json",
            )
            chunks, contribution = make_contribution(
                vec, 100, keys, experiment_id="bench", round=1, nonce="n1", weight_scale=1000.0
            )
            del keys
            t0 = time.process_time()
            total.add(chunks, contribution)
            add_cpu.append(time.process_time() - t0)
            del chunks, contribution
            if i == 0 or (i + 1) % every == 0:
                trace.append((i + 1, _rss_mb()))
        request = total.decryption_request()
        down = sum(map(len, request.sum_chunks))
    return {
        "trace": trace,
        "peak": _rss_mb("VmHWM"),
        "add": statistics.median(add_cpu),
        "sum_mb": down / 2**20,
    }


# -- driver ---------------------------------------------------------------------------------


def _child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="*", default=[125, 250, 500, 1000])
    parser.add_argument("--reps", type=int, default=3, help="aggregations per size (median)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[32], help="MLP widths")
    parser.add_argument("--he-sites", type=int, default=100)
    parser.add_argument("--he-params", type=int, default=1_000_000, help="values per update")
    parser.add_argument("--no-he", action="store_true", help="skip the encrypted sum")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "coord":
            res = coordinator_child(int(rest[0]), int(rest[1]), [int(h) for h in rest[2:]])
        else:
            res = he_child(int(rest[0]), int(rest[1]))
        print(json.dumps(res))
        return
    if args.sites:
        print(
            f"Coordinator aggregation, tabular MLP 30-{'-'.join(map(str, args.hidden))}-2, "
            f"CPU seconds (median of {args.reps}), fresh process per size"
        )
        print(f"{'sites':>6} {'round CPU s':>12} {'ms per site':>12} {'peak RSS MB':>12}")
        for n in args.sites:
            r = _child(["coord", str(n), str(args.reps), *map(str, args.hidden)])
            print(f"{n:>6} {r['cpu']:>12.3f} {1000 * r['cpu'] / n:>12.2f} {r['peak']:>12.0f}")
    if not args.no_he and args.he_sites:
        r = _child(["he", str(args.he_sites), str(args.he_params)])
        print(
            f"\nEncrypted streaming sum, {args.he_sites} sites x {args.he_params:,} values "
            f"(running sum {r['sum_mb']:.1f} MB), coordinator RSS after k contributions:"
        )
        print("  " + "  ".join(f"k={k}: {mb:.0f} MB" for k, mb in r["trace"]))
        print(f"  peak {r['peak']:.0f} MB; add per contribution {r['add']:.3f} CPU s")


if __name__ == "__main__":
    main()
