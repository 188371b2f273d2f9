"""A study's identity: one hash over everything that decides what leaves a site.

A site approves a *study*, not an experiment name: the hash covers the task spec's digest
(task, data schema, model, training, DP and encrypted-aggregation parameters, seed and
rounds), the aggregation strategy with the SHA-256 of a custom strategy's source, the
dataset and the columns it reads, and the fedhealth version that runs at the site. Any
change to any of them is a new study, which a site with manual approval holds for a
person again (:mod:`fedhealth.site.approvals`).

The site and the coordinator compute it the same way from the same canonical spec, so the
coordinator can print the hash a site operator pins in ``[privacy] approved_studies``.
Standard library and the protocol only.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from fedhealth import __version__
from fedhealth.protocol import TaskSpec

if TYPE_CHECKING:
    from fedhealth.config.analysis import AnalysisSpec

__all__ = [
    "analysis_study_document",
    "analysis_study_hash",
    "columns_read",
    "normalise_hash",
    "study_document",
    "study_hash",
]


def columns_read(spec: TaskSpec) -> list[str]:
    """The dataset columns a study reads (tabular: its schema's columns; images: pixels, label).

    Parameters
    ----------
    spec : TaskSpec

    Returns
    -------
    list of str
        Sorted column names.
    """
    schema = spec.task.schema_
    if schema is None:
        return ["image", "label"]
    return sorted({*schema.numeric, *schema.categorical, schema.label})


def study_document(spec: TaskSpec, version: str = __version__) -> dict[str, Any]:
    """What the study hash is computed over (JSON-ready).

    Parameters
    ----------
    spec : TaskSpec
        The spec the coordinator sends with every request.
    version : str
        The fedhealth version that runs the study at the site.

    Returns
    -------
    dict
        ``spec_sha256``, ``strategy`` (name, code SHA-256, options; ``None`` if the
        coordinator declared none), ``dataset``, ``columns``, ``fedhealth_version``.
    """
    strategy = spec.strategy.model_dump(mode="json") if spec.strategy is not None else None
    return {
        "spec_sha256": spec.digest(),
        "strategy": strategy,
        "dataset": spec.task.dataset,
        "columns": columns_read(spec),
        "fedhealth_version": version,
    }


def _sha256(document: dict[str, Any]) -> str:
    blob = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def analysis_study_document(spec: AnalysisSpec, version: str = __version__) -> dict[str, Any]:
    """What an analysis's study hash is computed over (JSON-ready).

    An analysis is a study like a training: its hash covers the analysis spec (cohort,
    queries, bounds, ε and δ), the dataset, the columns it reads and the fedhealth version
    at the site; ``kind`` keeps it apart from any training study.

    Parameters
    ----------
    spec : AnalysisSpec
        The analysis as the coordinator sends it.
    version : str
        The fedhealth version that answers it at the site.

    Returns
    -------
    dict
        ``kind`` ("analysis"), ``analysis``, ``analysis_sha256``, ``dataset``,
        ``columns`` (sorted), ``fedhealth_version``.
    """
    return {
        "kind": "analysis",
        "analysis": spec.name,
        "analysis_sha256": spec.spec_hash(),
        "dataset": spec.dataset,
        "columns": sorted(spec.columns),
        "fedhealth_version": version,
    }


def analysis_study_hash(spec: AnalysisSpec, version: str = __version__) -> str:
    """SHA-256 (hex) of the canonical JSON of :func:`analysis_study_document`."""
    return _sha256(analysis_study_document(spec, version))


def study_hash(spec: TaskSpec, version: str = __version__) -> str:
    """SHA-256 (hex) of the canonical JSON of :func:`study_document`.

    Parameters
    ----------
    spec : TaskSpec
    version : str

    Returns
    -------
    str
        64 hex digits.
    """
    return _sha256(study_document(spec, version))


def normalise_hash(text: str) -> str:
    """A study hash as typed by a person: strip a ``sha256:`` prefix and spaces, lower-case."""
    text = text.strip().lower()
    return text[len("sha256:") :] if text.startswith("sha256:") else text
