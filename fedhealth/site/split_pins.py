"""The site owns its data splits: split seed, test fraction and schema pinned per dataset.

The experiment's ``[task]`` *proposes* ``split_seed`` and ``test_fraction`` and declares a
schema; the site decides. For each dataset, each of the three is taken from the profile's
``[splits.NAME]`` table if the operator wrote it there, otherwise from ``splits.json`` in the
site's workspace, where the first request the site accepted pinned it (recorded once, with a
``split-pinned`` line in the audit log). A request that differs from a pinned value is
refused with rule ``split-mismatch`` before any data is read: a coordinator cannot re-split a
site's table to isolate records (a 1-row test split, or the same query over many seeds).

The refusal names the rule, the dataset and the key, never a value.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedhealth.config.site import SiteProfile
from fedhealth.errors import PolicyError
from fedhealth.jsonlines import append
from fedhealth.protocol import TaskSection

PINS_FILE = "splits.json"
KEYS = ("split_seed", "test_fraction", "schema_hash")


class SplitRefusal(PolicyError):
    """A request the site refuses because of how it would split or read a dataset.

    Attributes
    ----------
    rule : str
        ``split-mismatch`` or ``split-too-small``.
    """

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


def schema_hash(task: TaskSection) -> str:
    """SHA-256 of what decides which records a dataset yields and how they are encoded.

    The task's kind, number of classes, image size (images) and schema (tables), without the
    schema's ``bounds`` (they only clamp statistics) -- canonical JSON, sorted keys.

    Parameters
    ----------
    task : TaskSection
        The experiment's task.

    Returns
    -------
    str
        Hex digest.
    """
    data: dict[str, Any] = {"kind": task.kind, "num_classes": task.num_classes}
    if task.kind == "image":
        data["image_size"] = task.image_size
    if task.schema_ is not None:
        schema = task.schema_.model_dump(mode="json")
        schema.pop("bounds", None)
        data["schema"] = schema
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@contextmanager
def _locked(workspace: Path) -> Iterator[None]:
    workspace.mkdir(parents=True, exist_ok=True)
    with open(workspace / f".{PINS_FILE}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SplitRefusal(
            f"the site's split pins {path} cannot be read ({exc}); restore it from a backup "
            "(the site refuses to re-split its data)",
            rule="split-mismatch",
        ) from None
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def check_split(profile: SiteProfile, task: TaskSection, experiment: str) -> dict[str, Any]:
    """Check the task's split and schema against the site's pins; pin them on first use.

    Parameters
    ----------
    profile : SiteProfile
        The site (its ``[splits]`` table and workspace).
    task : TaskSection
        The experiment's task as the coordinator sent it.
    experiment : str
        The experiment name (recorded with a first-use pin).

    Returns
    -------
    dict
        The pinned ``split_seed``, ``test_fraction`` and ``schema_hash`` of the dataset.

    Raises
    ------
    SplitRefusal
        ``rule = "split-mismatch"``: the task asks for another split seed, test fraction or
        schema than the one pinned (the message names the key, not the values).
    """
    dataset = task.dataset
    asked: dict[str, Any] = {
        "split_seed": int(task.split_seed),
        "test_fraction": float(task.test_fraction),
        "schema_hash": schema_hash(task),
    }
    section = profile.splits.get(dataset)
    from_profile = {k: getattr(section, k) for k in KEYS} if section is not None else {}
    from_profile = {k: v for k, v in from_profile.items() if v is not None}
    workspace = profile.workspace
    path = workspace / PINS_FILE
    with _locked(workspace):
        pins = _read(path)
        recorded = pins.get(dataset) or {}
        pinned = {k: from_profile.get(k, recorded.get(k)) for k in KEYS}
        for key in KEYS:
            want = pinned[key]
            if want is None:
                continue
            same = (
                abs(float(want) - asked[key]) <= 1e-12
                if key == "test_fraction"
                else want == asked[key]
            )
            if not same:
                where = (
                    f"`splits.{dataset}.{key}` of its profile"
                    if key in from_profile
                    else f"pinned in its workspace ({PINS_FILE})"
                )
                raise SplitRefusal(
                    f"site {profile.name!r} refuses experiment {experiment!r}: the task's "
                    f"`{_task_key(key)}` for dataset {dataset!r} differs from the one the site "
                    f"uses ({where}). The site owns its splits: use its split, or ask the site "
                    "operator.",
                    rule="split-mismatch",
                )
        missing = [k for k in KEYS if pinned[k] is None]
        if missing:
            for key in missing:
                pinned[key] = asked[key]
            pins[dataset] = {**pinned, "pinned_at": time.time(), "experiment": experiment}
            _write(path, pins)
            append(
                workspace / "audit.log",
                {"ts": time.time(), "event": "split-pinned", "site": profile.name,
                 "dataset": dataset, "experiment": experiment, "keys": missing,
                 **{k: pinned[k] for k in KEYS}},
            )  # fmt: skip
    return pinned


def _task_key(key: str) -> str:
    return "task.schema" if key == "schema_hash" else f"task.{key}"


def check_split_size(profile: SiteProfile, dataset: str, split: str, n: int, minimum: int) -> None:
    """Refuse to compute on or release from a split smaller than the site's minimum.

    Parameters
    ----------
    profile : SiteProfile
        The site.
    dataset : str
        The dataset.
    split : str
        ``"training"`` or ``"test"``.
    n : int
        The split's records (not shown in the refusal).
    minimum : int
        ``privacy.min_split_records``.

    Raises
    ------
    SplitRefusal
        ``rule = "split-too-small"``.
    """
    if n < minimum:
        raise SplitRefusal(
            f"site {profile.name!r}: the {split} split of dataset {dataset!r} holds fewer "
            f"records than the site's minimum of {minimum} (`privacy.min_split_records`); "
            "nothing is computed on it or released from it.",
            rule="split-too-small",
        )
