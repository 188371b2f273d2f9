"""Which training settings learn a small image task: the figures behind the image recipe in
``docs/getting-started.md``.

Writes a small 2-class PNG folder per site (balanced normal / pneumonia chest X-rays from
the shared PneumoniaMNIST, so chance is 0.50), with the site profiles and one experiment per
setting, into a temporary folder outside the project, then runs each experiment as
``fedhealth run`` does (Flower's simulation engine) and prints the final model's test
accuracy over all sites and its per-site mean.

Usage::

    python benchmarks/image_recipe.py                        # 3 sites x 120 PNGs, 10 rounds
    python benchmarks/image_recipe.py --per-class 40 --rounds 5

Reads ``../shared/data/medmnist-pneumoniamnist`` beside the project (or
``$FEDHEALTH_SHARED_DATA``); exits with a message when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tomli_w

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEDHEALTH_SHARED_DATA", ROOT.parent / "shared" / "data"))
NPZ = SHARED / "medmnist-pneumoniamnist" / "pneumoniamnist.npz"

#: The settings compared: the defaults (what a newcomer gets by leaving `[training]` out),
#: plain SGD with a larger step and momentum, Adam as the quickstart imaging uses it, and the
#: recipe the docs give (Adam, more local epochs).
SETTINGS = {
    "sgd-0.05 (defaults)": {"optimizer": "sgd", "learning_rate": 0.05},
    "sgd-0.3-momentum-0.9": {"optimizer": "sgd", "learning_rate": 0.3, "momentum": 0.9},
    "adam-0.002": {"optimizer": "adam", "learning_rate": 0.002},
    "adam-0.002-5-epochs (recipe)": {
        "optimizer": "adam",
        "learning_rate": 0.002,
        "local_epochs": 5,
    },
}


def write_sites(out: Path, n_sites: int, per_class: int, seed: int) -> list[Path]:
    """A PNG folder, labels CSV and profile per site; balanced classes, disjoint images."""
    from PIL import Image

    with np.load(NPZ) as z:
        images, labels = z["train_images"], z["train_labels"].ravel()
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in (0, 1)]
    profiles = []
    for s in range(n_sites):
        name = f"site-{s + 1}"
        folder = out / name / "png"
        folder.mkdir(parents=True)
        rows = ["file,label"]
        for c in (0, 1):
            for i in pools[c][s * per_class : (s + 1) * per_class]:
                Image.fromarray(images[i]).save(folder / f"{i}.png")
                rows.append(f"{i}.png,{c}")
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
        profile = out / f"{name}.toml"
        profile.write_text(
            tomli_w.dumps(
                {
                    "site": {"name": name, "workspace": str(out / "workspace")},
                    "datasets": {"xray": {"kind": "images", "path": str(folder)}},
                }
            )
        )
        profiles.append(profile)
    return profiles


def experiment(out: Path, profiles: list[Path], key: str, training: dict, rounds: int) -> Path:
    """One experiment: the recipe's task and model with ``training``."""
    doc = {
        "experiment": {
            "name": "png-" + key.split(" ")[0].replace(".", ""),
            "sites": [str(p) for p in profiles],
            "rounds": rounds,
            "min_sites": len(profiles),
            "seed": 42,
        },
        "task": {
            "dataset": "xray",
            "kind": "image",
            "num_classes": 2,
            "image_size": 28,
            "test_fraction": 0.25,
            "normalisation": "none",
        },
        "model": {"name": "small_cnn", "channels": [16, 32], "groups": 8},
        "training": {"local_epochs": 2, "batch_size": 16, **training},
        "strategy": {"name": "fedavg"},
    }
    path = out / f"{doc['experiment']['name']}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=3, help="Number of sites.")
    ap.add_argument("--per-class", type=int, default=60, help="Images per class and site.")
    ap.add_argument("--rounds", type=int, default=10, help="Federated rounds.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the image draw.")
    ap.add_argument(
        "--setting",
        action="append",
        metavar="NAME=JSON",
        help='Compare this [training] instead, e.g. adam-e5=\'{"optimizer": "adam", '
        '"learning_rate": 0.002, "local_epochs": 5}\' (repeatable).',
    )
    args = ap.parse_args()
    settings = SETTINGS
    if args.setting:
        settings = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.setting)}
    if not NPZ.is_file():
        sys.exit(f"PneumoniaMNIST not found at {NPZ} (set FEDHEALTH_SHARED_DATA)")
    from rich.console import Console

    from fedhealth.cli.run_cmd import run_experiments

    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - the summary is printed below
    with tempfile.TemporaryDirectory(prefix="fedhealth-image-recipe-") as tmp:
        out = Path(tmp)
        profiles = write_sites(out, args.sites, args.per_class, args.seed)
        n = args.sites * args.per_class * 2
        print(
            f"{args.sites} sites, {n} PNGs (28x28, 2 balanced classes: chance 0.50), "
            f"{args.rounds} rounds, small_cnn, 2 local epochs, batch 16"
        )
        print(f"{'setting':<30} {'accuracy (all)':>15} {'mean over sites':>16} {'seconds':>8}")
        for key, training in settings.items():
            path = experiment(out, profiles, key, training, args.rounds)
            start = time.perf_counter()
            [summary] = run_experiments(quiet, [path], f"sqlite:///{out}/mlflow.db", False)
            g = summary.global_metrics
            print(
                f"{key:<30} {g['accuracy']:>15.3f} {g['accuracy_site_mean']:>16.3f} "
                f"{time.perf_counter() - start:>8.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
