"""An evaluation-only study of a registered model version at chosen sites (``query.validate``).

The coordinator reads the version's network and preprocessing from the registry (the
safetensors weights and the JSON spec, nothing unpickled), builds the study's task spec
from them (the task the model was trained for, at its split; experiment
``<training experiment>-v<version>-validation``, so each site admits it as a study of its
own) and sends the weights, the spec and the model's standardisation statistics to every
site. Each site answers with score histograms only (:mod:`fedhealth.site.validation`);
the coordinator derives the metrics per site and pooled
(:func:`fedhealth.evaluation.metrics.derive`) and writes them back to the version
(:mod:`fedhealth.registry.validation_record`).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedhealth.coordinator.exchange import send_and_receive
from fedhealth.errors import ConfigError, FederationError
from fedhealth.evaluation.metrics import derive
from fedhealth.evaluation.result import ValidationResult
from fedhealth.protocol import (
    MessageKind,
    ModelSection,
    NormStats,
    Record,
    Refusal,
    RoundConfig,
    SiteKey,
    TaskSection,
    TaskSpec,
    TrainingSection,
    ValidationKey,
)

MODEL_URI = re.compile(r"^models:/(?P<name>[^/]+)/(?P<version>[0-9]+)$")


def parse_model_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME/VERSION`` -> (name, version); ConfigError otherwise."""
    m = MODEL_URI.match(uri.strip())
    if not m:
        raise ConfigError(
            f"{uri!r} is not a registered model version: write models:/NAME/VERSION "
            "(see `fedhealth models list`)"
        )
    return m["name"], m["version"]


@dataclass
class RegisteredModel:
    """A registered version's weights, preprocessing spec and tags."""

    name: str
    version: str
    spec: dict[str, Any]
    weights: dict[str, np.ndarray]
    tags: dict[str, str]

    @classmethod
    def load(cls, tracking_uri: str, uri: str) -> RegisteredModel:
        """Read ``models:/NAME/VERSION`` from the registry (safetensors + JSON, no pickle)."""
        import mlflow
        from safetensors.numpy import load_file

        from fedhealth.registry.catalog import show_version
        from fedhealth.registry.pyfunc_model import SPEC_FILE, WEIGHTS_FILE

        name, version = parse_model_uri(uri)
        shown = show_version(tracking_uri, name, version)  # a clear error when absent
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{name}/{version}", dst_path=tmp
                )
            )
            spec_files, weight_files = list(root.rglob(SPEC_FILE)), list(root.rglob(WEIGHTS_FILE))
            if len(spec_files) != 1 or len(weight_files) != 1:
                raise ConfigError(
                    f"models:/{name}/{version} is not a fedhealth model (no {SPEC_FILE} and "
                    f"{WEIGHTS_FILE}); only versions fedhealth registered can be validated"
                )
            spec = json.loads(spec_files[0].read_text())
            weights = load_file(str(weight_files[0]))
        return cls(name, version, spec, weights, dict(shown["tags"]))

    def task_spec(self, dataset: str | None = None) -> TaskSpec:
        """The evaluation study's spec: the model's task, at the split it was trained with."""
        s = self.spec
        if int(s["num_classes"]) != 2:
            raise ConfigError(
                f"models:/{self.name}/{self.version} has {s['num_classes']} classes; "
                "external validation (ROC, calibration) is defined for binary models"
            )
        data = dataset or self.tags.get("dataset")
        if not data:
            raise ConfigError(
                f"models:/{self.name}/{self.version} names no dataset (tag `dataset`); "
                "pass --dataset NAME (the name the sites register the data under)"
            )
        split = s.get("split") or {}
        task = TaskSection(  # type: ignore[call-arg]  # populated by its alias `schema`
            dataset=data,
            kind=s["kind"],
            num_classes=2,
            test_fraction=split.get("test_fraction", 0.25),
            split_seed=split.get("split_seed", 43),
            normalisation=s["normalisation"],
            image_size=s.get("image_size") or 32,
            schema=s.get("schema"),
        )
        base = re.sub(r"[^a-z0-9_-]", "-", str(self.tags.get("experiment") or self.name).lower())
        suffix = f"-v{self.version}-validation"
        experiment = (base[: 63 - len(suffix)] + suffix).lstrip("-_") or f"model{suffix}"
        return TaskSpec(
            experiment=experiment,
            task=task,
            model=ModelSection(**s["model"]),
            training=TrainingSection(),
            seed=0,
            rounds=1,
        )


def run_validation(
    grid: Grid,
    tracking_uri: str,
    model_uri: str,
    *,
    split: str = "test",
    threshold: float = 0.5,
    dataset: str | None = None,
    timeout: float = 600.0,
    record: bool = True,
) -> ValidationResult:
    """Ask every connected site to evaluate ``model_uri``; derive and record the metrics.

    Parameters
    ----------
    grid : Grid
        The Flower grid (simulation or a SuperLink); every connected site is asked.
    tracking_uri : str
        The MLflow store with the registered model.
    model_uri : str
        ``models:/NAME/VERSION``.
    split : str
        ``"test"`` (each site's pinned test split) or ``"all"`` (every record: for sites
        that never trained the model).
    threshold : float
        Decision threshold of accuracy, sensitivity and specificity.
    dataset : str, optional
        The dataset name the sites register the data under (default: the version's tag).
    timeout : float
        Seconds to wait for the sites' replies.
    record : bool
        Write the result back to the version (MLflow run, tags, model card).

    Returns
    -------
    ValidationResult

    Raises
    ------
    FederationError
        No site released statistics (every refusal is named).
    """
    model = RegisteredModel.load(tracking_uri, model_uri)
    spec = model.task_spec(dataset)
    stats = model.spec.get("statistics")
    config = RoundConfig(
        spec=spec,
        server_round=1,
        norm_stats=NormStats(**stats) if stats else None,
        registered_model=f"{model.name}/{model.version}",
    ).to_record()
    weights = ArrayRecord({k: Array(np.asarray(v)) for k, v in model.weights.items()})
    messages = [
        Message(
            RecordDict(
                {
                    Record.CONFIG: ConfigRecord(config),
                    Record.ARRAYS: weights,
                    Record.VALIDATION: ConfigRecord({ValidationKey.SPLIT: split}),
                }
            ),
            dst_node_id=node,
            message_type=MessageKind.VALIDATE,
        )
        for node in grid.get_node_ids()
    ]
    releases, epsilon, refusals = _collect(send_and_receive(grid, messages, timeout))
    if not releases:
        why = "; ".join(f"{r.site} ({r.rule}): {r.message}" for r in refusals) or "no reply"
        raise FederationError(f"no site released validation statistics for {model_uri}: {why}")
    result = ValidationResult(
        model=model.name,
        version=model.version,
        experiment=spec.experiment,
        split=split,
        threshold=threshold,
        metrics=derive(releases, threshold),
        releases=releases,
        epsilon=epsilon,
        refusals=refusals,
    )
    if record:
        from fedhealth.registry.validation_record import record_validation

        result.run_id = record_validation(tracking_uri, result)
    return result


def _collect(
    replies: Iterable[Message],
) -> tuple[dict[str, dict[str, Any]], dict[str, float], list[Refusal]]:
    releases: dict[str, dict[str, Any]] = {}
    epsilon: dict[str, float] = {}
    refusals: list[Refusal] = []
    for msg in replies:
        if msg.has_error():
            refusals.append(
                Refusal.decode(msg.error.reason, node=f"node {msg.metadata.src_node_id}")
            )
            continue
        site = str(msg.content[Record.SITE][SiteKey.NAME])
        releases[site] = json.loads(str(msg.content[Record.VALIDATION][ValidationKey.RELEASE]))
        metrics = dict(msg.content.get(Record.METRICS) or {})
        if "epsilon" in metrics:
            epsilon[site] = float(cast(float, metrics["epsilon"]))
    return releases, epsilon, refusals
