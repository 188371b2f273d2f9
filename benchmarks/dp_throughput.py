"""DP-SGD training throughput against non-private training, side by side in one run.

For each model the same batches train once without privacy (plain optimiser) and once with
fedhealth's DP-SGD (:func:`fedhealth.privacy.dp.local.make_private`: per-sample gradients,
clipping, noise), interleaved repetition by repetition so that both see the same machine
state (within a repetition they alternate every 10 steps). Each timing is the median over
``--reps`` repetitions of ``--steps`` optimiser steps on fixed-size batches (examples/s =
batch size x steps / seconds); the ratio is DP time / non-private time (the median over
repetitions of each repetition's ratio), i.e. how many times slower DP-SGD is. One thread,
as each simulated site trains (``SiteRuntime`` sets ``torch.set_num_threads(1)``).

Clock: by default the process's CPU time (``time.process_time``), which on a shared machine
counts only the work of this process, not the time other jobs hold the cores; ``--clock
wall`` times with ``time.perf_counter`` instead. With one thread the two agree on a quiet
machine.

Models (every model of the zoo): the quickstart's tabular MLP (30 features, hidden [32],
LayerNorm), a wider MLP, Heart-Disease's logistic regression (at heart-disease-dp's batch
64), the imaging ``small_cnn`` ([16, 32] channels, GroupNorm, 32x32), MONAI DenseNet121 and
ResNet18 (GroupNorm, 1x64x64) on a few batches. DP paths: ``auto`` (what sites use:
fedhealth's book-keeping ``bk`` for every zoo model) and, for comparison, Opacus's path
(``hooks``; ``ew`` for ResNet18). The last lines give each model's DP/plain time ratio for
``auto`` against the goal of 2x.

Usage::

    python benchmarks/dp_throughput.py              # all models (about 2-3 minutes)
    python benchmarks/dp_throughput.py --quick      # tabular and small_cnn only
    python benchmarks/dp_throughput.py --clock wall # wall-clock time instead of CPU time
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from fedhealth.models import build_model  # noqa: E402
from fedhealth.privacy.dp.local import make_private  # noqa: E402

#: DP-SGD may take at most this many times the plaintext step time (issue 14).
GOAL = 2.0

#: Plain and DP training alternate every this many steps within a repetition, so that a
#: burst of load on the shared machine falls on both alike.
CHUNK = 10

#: The clocks ``--clock`` chooses from.
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
clock: Callable[[], float] = time.process_time


@dataclass
class Case:
    """One model to time: how to build it, its input shape and batch size."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    batch: int
    steps: int
    modes: tuple[str, ...]


def cases(quick: bool, steps: int) -> list[Case]:
    """The models of the benchmark."""
    out = [
        Case(
            "quickstart MLP (30-32-2)",
            lambda: build_model({"name": "mlp", "hidden": [32]}, 30, 2, seed=0),
            (30,),
            16,
            steps * 4,
            ("auto", "hooks"),
        ),
        Case(
            "MLP (30-128-128-2)",
            lambda: build_model({"name": "mlp", "hidden": [128, 128]}, 30, 2, seed=0),
            (30,),
            64,
            steps * 4,
            ("auto", "hooks"),
        ),
        Case(
            "logistic regression (13-2)",
            lambda: build_model({"name": "logistic_regression"}, 13, 2, seed=0),
            (13,),
            64,
            steps * 4,
            ("auto", "hooks"),
        ),
        Case(
            "small_cnn [16,32] 32x32",
            lambda: build_model(
                {"name": "small_cnn", "channels": [16, 32], "groups": 8}, 1, 2, seed=0
            ),
            (1, 32, 32),
            16,
            steps,
            ("auto", "hooks"),
        ),
    ]
    if not quick:
        out.append(
            Case(
                "DenseNet121 1x64x64",
                lambda: build_model({"name": "densenet121", "groups": 8}, 1, 2, seed=0),
                (1, 64, 64),
                8,
                max(steps // 4, 3),
                ("auto", "hooks"),
            )
        )
        out.append(
            Case(
                "ResNet18 1x64x64",
                lambda: build_model({"name": "resnet18", "groups": 8}, 1, 2, seed=0),
                (1, 64, 64),
                8,
                max(steps // 4, 3),
                ("auto", "ew"),
            )
        )
    return out


def _batches(case: Case, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(case.batch, *case.shape, generator=gen), torch.randint(0, 2, (case.batch,)))
        for _ in range(n_batches)
    ]


def _time_plain(model: nn.Module, batches) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    t0 = clock()
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return clock() - t0


def _private(model: nn.Module, case: Case, mode: str):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ds = TensorDataset(torch.zeros(case.batch * 8, *case.shape), torch.zeros(case.batch * 8))
    loader = DataLoader(ds, batch_size=case.batch)
    return make_private(
        model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode
    )


def _time_private(pt, batches) -> float:
    pt.model.train()
    t0 = clock()
    for x, y in batches:
        pt.optimizer.zero_grad()
        pt.criterion(pt.model(x), y).backward()
        pt.optimizer.step()
    return clock() - t0


Row = tuple[str, str, float, float, float, float, float]


def measure(case: Case, reps: int) -> list[Row]:
    """One row per DP path: model, path, plain ex/s, DP ex/s (medians over ``reps``) and the
    slowdown DP time / plain time: the median, min and max over the repetitions, each
    repetition's DP time divided by the plain time measured right before it."""
    batches = _batches(case, case.steps)
    plain_model = case.build()
    privates = {}
    for mode in case.modes:
        pt = _private(case.build(), case, mode)
        privates[mode] = pt
    _time_plain(plain_model, batches[:2])  # warm-up
    for pt in privates.values():
        _time_private(pt, batches[:2])
    plain, dp = [], {m: [] for m in privates}
    chunks = [batches[i : i + CHUNK] for i in range(0, len(batches), CHUNK)]
    for _ in range(reps):  # interleaved: every CHUNK steps, every variant in turn
        plain.append(0.0)
        for mode in privates:
            dp[mode].append(0.0)
        for chunk in chunks:
            plain[-1] += _time_plain(plain_model, chunk)
            for mode, pt in privates.items():
                dp[mode][-1] += _time_private(pt, chunk)
    n = case.batch * case.steps
    plain_rate = n / statistics.median(plain)
    rows = []
    for mode, pt in privates.items():
        rate = n / statistics.median(dp[mode])
        label = f"{mode} -> {pt.grad_sample_mode}" if mode == "auto" else mode
        paired = [d / p for d, p in zip(dp[mode], plain, strict=True)]
        ratio = statistics.median(paired)
        rows.append((case.name, label, plain_rate, rate, ratio, min(paired), max(paired)))
    return rows


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions (median)")
    parser.add_argument("--steps", type=int, default=20, help="steps per repetition (CNNs)")
    parser.add_argument("--quick", action="store_true", help="skip DenseNet121 and ResNet18")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu", help="process CPU time or wall time"
    )
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, 1 thread, {args.clock} clock, median of {args.reps} "
        "interleaved repetitions"
    )
    head = (
        f"{'model':28} {'DP path':16} {'batch':>5} {'plain ex/s':>11} {'DP ex/s':>9} "
        f"{'DP slower':>9} {'[min, max]':>14}"
    )
    print(head)
    print("-" * len(head))
    summary = []
    for case in cases(args.quick, args.steps):
        for model, path, plain, dp, ratio, low, high in measure(case, args.reps):
            print(
                f"{model:28} {path:16} {case.batch:>5} {plain:>11.0f} {dp:>9.0f} "
                f"{ratio:>8.2f}x [{low:5.2f}, {high:5.2f}]"
            )
            if path.startswith("auto"):
                summary.append((model, path, ratio))
    print(f"\nDP time / plain time with auto (goal <= {GOAL:g}x):")
    for model, path, ratio in summary:
        verdict = "ok" if ratio <= GOAL else "OVER"
        print(f"  {model:28} {path:16} {ratio:5.2f}x  {verdict}")


if __name__ == "__main__":
    main()
