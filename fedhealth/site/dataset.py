"""Turn a site's registered dataset and an experiment's task into train/test tensors.

Everything here runs at the site: raw rows and pixels stay in this process.
What leaves is built elsewhere (model updates, counts, metrics, and — for
consortium normalisation — per-feature sums and counts).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.catalogue import READERS
from fedhealth.config.site import SiteProfile
from fedhealth.data.normalisation import Moments, Standardizer, local_moments
from fedhealth.data.splits import train_test_split_indices
from fedhealth.errors import DataError
from fedhealth.site.audit import record_skipped_files

log = logging.getLogger("fedhealth.site")


@dataclass
class SiteData:
    """A site's data for one task, split and encoded (not yet normalised)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    input_dim: int
    feature_names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_train(self) -> int:
        """Number of training records."""
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        """Number of test records."""
        return len(self.y_test)

    def train_moments(self) -> Moments:
        """Per-feature (or per-channel) sums and counts of the training split."""
        return local_moments(self.x_train)

    def counts(self) -> dict[str, int]:
        """Aggregate counts a site may report: sizes and label counts, never rows."""
        # Skipped bad files are counted, never named: a file name can identify a patient.
        out = {"n-train": self.n_train, "n-test": self.n_test, "skipped-files": len(self.skipped)}
        for label, n in zip(*np.unique(self.y_train, return_counts=True), strict=True):
            out[f"n-train-label-{int(label)}"] = int(n)
        return out


def _read(profile: SiteProfile, task: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list, list]:
    name = task["dataset"]
    source = profile.datasets.get(name)
    if source is None:
        raise DataError(
            f"site {profile.name!r} has no dataset named {name!r}; it registers "
            f"{', '.join(sorted(profile.datasets))}"
        )
    # The reader of the source's kind, from the catalogue (fedhealth/data/ registers them).
    return READERS.get(source.kind).load()(source, task)


def _class_count_error(
    profile: SiteProfile, task: dict[str, Any], y: np.ndarray, n_classes: int
) -> DataError:
    """Labels outside 0..num_classes-1: name the file, the label column, the classes, the fix."""
    name = task["dataset"]
    source = profile.datasets[name]
    labels = getattr(source, "labels", None)  # image folders: a labels CSV (file,label)
    if task.get("schema"):
        where = f"{source.path}, label column {task['schema']['label']!r}"
    elif labels is not None:
        labels_csv = labels if Path(labels).is_absolute() else Path(source.path) / labels
        where = f"{labels_csv}, label column 'label'"
    else:
        where = f"{source.path}, its labels"
    classes = [int(c) for c in np.unique(y)]
    shown = ", ".join(map(str, classes[:20])) + (", …" if len(classes) > 20 else "")
    fix = (
        f"Set `task.num_classes = {int(y.max()) + 1}` in the experiment"
        if y.min() >= 0
        else "Labels must be 0..num_classes-1: give a `task.schema.label_map`"
    )
    return DataError(
        f"site {profile.name!r}, dataset {name!r} ({where}): {len(classes)} classes found "
        f"({shown}) but the experiment declares `task.num_classes = {n_classes}` (labels "
        f"0..{n_classes - 1}). {fix}, or map the labels to fewer classes "
        "(`task.schema.label_map` / `binarize_label_above` for a table)."
    )


_CACHE: dict[str, SiteData] = {}


def load_site_data(profile: SiteProfile, task: Any) -> SiteData:
    """Read, encode and split the site's dataset for ``task`` (cached per process).

    Parameters
    ----------
    profile : SiteProfile
        The site's profile (where its data is).
    task : TaskSection or dict
        The experiment's ``[task]`` section as sent by the coordinator.

    Returns
    -------
    SiteData
        Stratified train/test split (``task.test_fraction``, ``task.split_seed``).
    """
    if hasattr(task, "model_dump"):  # the spec's TaskSection; the readers take its dict form
        task = task.model_dump(mode="json", by_alias=True)
    key = hashlib.sha256(
        json.dumps([profile.model_dump(mode="json"), task], sort_keys=True).encode()
    ).hexdigest()
    if key in _CACHE:
        return _CACHE[key]
    x, y, names, skipped = _read(profile, task)
    if skipped:  # named in the site's own log and audit log, never sent anywhere
        log.warning(
            "site %s, dataset %s: skipped %d unreadable file(s) (skip_bad_files = true): %s",
            profile.name, task["dataset"], len(skipped),
            "; ".join(f"{name} ({why})" for name, why in skipped),
        )  # fmt: skip
        record_skipped_files(profile.workspace, profile.name, str(task["dataset"]), skipped)
    n_classes = int(task.get("num_classes", 2))
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise _class_count_error(profile, task, y, n_classes)
    if len(y) < 4:
        raise DataError(
            f"site {profile.name!r}, dataset {task['dataset']!r}: only {len(y)} usable records"
        )
    tr, te = train_test_split_indices(
        y, test_fraction=float(task["test_fraction"]), seed=int(task["split_seed"])
    )
    input_dim = x.shape[1]
    data = SiteData(x[tr], y[tr], x[te], y[te], input_dim, names, skipped)
    _CACHE[key] = data
    return data


def standardizer_for(
    data: SiteData, mode: str, consortium: dict[str, Any] | None
) -> Standardizer | None:
    """The normaliser a site applies: its own statistics, the consortium's, or none."""
    if mode == "none":
        return None
    if mode == "consortium":
        if consortium is None:
            raise DataError("consortium normalisation requested but no statistics were sent")
        return Standardizer.from_dict(consortium)
    return Standardizer.from_moments(data.train_moments())
