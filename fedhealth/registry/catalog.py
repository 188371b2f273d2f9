"""Read the model registry: what versions exist and where each came from."""

from __future__ import annotations

from typing import Any

from mlflow.exceptions import MlflowException

from fedhealth.errors import FedHealthError
from fedhealth.registry.store import use_store


def list_models(tracking_uri: str) -> list[dict[str, Any]]:
    """Every registered model with its latest version and that version's key tags."""
    client = use_store(tracking_uri)
    out = []
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        latest = max(versions, key=lambda v: int(v.version)) if versions else None
        out.append(
            {
                "name": rm.name,
                "versions": len(versions),
                "latest": latest.version if latest else "-",
                "accuracy": latest.tags.get("accuracy", "") if latest else "",
                "sites": latest.tags.get("sites", "") if latest else "",
            }
        )
    return sorted(out, key=lambda r: r["name"])


def show_version(tracking_uri: str, name: str, version: str) -> dict[str, Any]:
    """One model version's provenance: tags, run, source and model card.

    Raises
    ------
    FedHealthError
        If the model or version does not exist (the message lists what does).
    """
    client = use_store(tracking_uri)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        known = [m.name for m in client.search_registered_models()]
        if name not in known:
            raise FedHealthError(
                f"no registered model {name!r} in {tracking_uri}; "
                f"known: {', '.join(known) or 'none'}"
            ) from None
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise FedHealthError(
            f"model {name!r} has no version {version}; versions: {versions}"
        ) from None
    return {
        "name": mv.name,
        "version": mv.version,
        "run_id": mv.run_id,
        "source": mv.source,
        "created": mv.creation_timestamp,
        "tags": dict(mv.tags),
        "model_card": mv.description or "",
        "uri": f"models:/{mv.name}/{mv.version}",
    }
