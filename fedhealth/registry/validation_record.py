"""Write an external validation back to the registered version it validated.

Each validation adds: an MLflow run (experiment ``fedhealth-validation``) tagged with the
model's name and version, holding the metrics per site and pooled, the released
histograms (JSON) and ROC and calibration plots; version tags ``validation/<k>/...``
(where, when, the run, AUROC per site); and an entry under the model card's "External
validation" section (the version's description). ``<k>`` counts this version's
validations: a later validation adds to the history, never rewrites it.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhealth.evaluation.metrics import flat_metrics
from fedhealth.registry.model_card import append_validation, render_validation
from fedhealth.registry.store import ensure_experiment, use_store

if TYPE_CHECKING:
    from fedhealth.evaluation.result import ValidationResult

EXPERIMENT = "fedhealth-validation"
COUNT_TAG = "validations"
MODEL_TAG = "fedhealth.validated_model"
VERSION_TAG = "fedhealth.validated_version"


def _ci(m: dict[str, float]) -> str:
    from fedhealth.evaluation.metrics import format_interval

    return format_interval(m)  # "-" where undefined (e.g. calibration under separation)


def record_validation(tracking_uri: str, result: ValidationResult) -> str:
    """Log ``result`` as an MLflow run linked to the version, tag the version, extend its card.

    Returns
    -------
    str
        The MLflow run id.
    """
    client = use_store(tracking_uri)
    name, version = result.model, result.version
    when = dt.datetime.fromtimestamp(result.finished, dt.UTC).isoformat(timespec="seconds")
    exp = ensure_experiment(client, EXPERIMENT, tracking_uri)
    run = client.create_run(
        exp,
        run_name=f"validate {name} v{version}",
        tags={
            MODEL_TAG: name,
            VERSION_TAG: version,
            "fedhealth.model_uri": f"models:/{name}/{version}",
            "fedhealth.sites": ",".join(result.sites),
        },
    )
    run_id = run.info.run_id
    for key, value in {
        "split": result.split,
        "threshold": result.threshold,
        "study_experiment": result.experiment,
        "interval_method": result.interval_method[:500],
    }.items():
        client.log_param(run_id, key, value)
    for key, value in flat_metrics(result.metrics).items():
        client.log_metric(run_id, key, value)
    refused = {r.site: r.rule for r in result.refusals}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "validation.json"
        path.write_text(
            json.dumps(
                {
                    "model": f"models:/{name}/{version}",
                    "metrics": result.metrics,
                    "releases": result.releases,
                    "epsilon": result.epsilon,
                    "refused": refused,
                },
                indent=1,
                sort_keys=True,
            )
        )
        client.log_artifact(run_id, str(path))
        from fedhealth.registry.report import validation_plots

        for png in validation_plots(result, Path(tmp)):
            client.log_artifact(run_id, str(png), artifact_path="plots")
    client.set_terminated(run_id, "FINISHED")
    mv = client.get_model_version(name, version)
    k = int(mv.tags.get(COUNT_TAG, "0") or 0) + 1
    tags = {
        COUNT_TAG: str(k),
        f"validation/{k}/at": when,
        f"validation/{k}/sites": ",".join(result.sites),
        f"validation/{k}/run_id": run_id,
        f"validation/{k}/auroc/pooled": _ci(result.metrics["pooled"]["auroc"]),
    }
    for site in result.sites:
        tags[f"validation/{k}/auroc/{site}"] = _ci(result.metrics[site]["auroc"])
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    entry = render_validation(
        k,
        {
            "when": when,
            "run_id": run_id,
            "experiment": result.experiment,
            "split": result.split,
            "threshold": result.threshold,
            "interval_method": result.interval_method,
            "metrics": result.metrics,
            "epsilon": result.epsilon,
            "refused": refused,
        },
    )
    card = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=append_validation(card, entry))
    return run_id


def list_validations(tags: dict[str, Any]) -> list[dict[str, Any]]:
    """A version's validations from its tags, oldest first: k, when, sites, run, AUROCs."""
    out = []
    for k in range(1, int(tags.get(COUNT_TAG, "0") or 0) + 1):
        prefix = f"validation/{k}/"
        auroc = {
            key.removeprefix(prefix + "auroc/"): val
            for key, val in tags.items()
            if key.startswith(prefix + "auroc/")
        }
        out.append(
            {
                "k": k,
                "at": tags.get(prefix + "at", "?"),
                "sites": tags.get(prefix + "sites", ""),
                "run_id": tags.get(prefix + "run_id", ""),
                "auroc": auroc,
            }
        )
    return out
