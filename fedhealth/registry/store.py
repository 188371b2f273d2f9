"""Where fedhealth keeps its MLflow store by default, and how it points MLflow at one.

Default: a SQLite tracking store and an artifact folder under the workspace
(``./workspace/mlflow``). Any tracking URI (an MLflow server, PostgreSQL) can be
given by config or ``--tracking-uri`` instead.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from fedhealth import settings


def workspace_dir() -> Path:
    """The workspace: ``$FEDHEALTH_WORKSPACE`` or ``./workspace``."""
    return settings.WORKSPACE.get().resolve()


def default_tracking_uri(workspace: Path | None = None) -> str:
    """``sqlite:///<workspace>/mlflow/mlflow.db``."""
    root = (workspace or workspace_dir()) / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> str | None:
    """Artifact folder beside a local SQLite store; ``None`` lets a server decide."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def use_store(tracking_uri: str) -> MlflowClient:
    """Point MLflow's fluent API at ``tracking_uri`` and return a client for it."""
    # Quiet MLflow's own chatter (alembic migrations, emoji run links) unless asked.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with warnings.catch_warnings():
        # Importing MLflow's SQL store (here: the client opens it) makes SQLAlchemy warn that
        # MLflow uses the deprecated ``noload`` strategy. MLflow's to fix, not the user's:
        # ignore exactly that one. A module-level filter would not do: Ray puts a "once"
        # filter for every DeprecationWarning in front of it.
        warnings.filterwarnings(
            "ignore",
            message=r"The ``noload`` loader strategy is deprecated",
            category=DeprecationWarning,
        )
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        _ = client._tracking_client.store
    return client


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Id of the MLflow experiment ``name``, created with a local artifact root if new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(tracking_uri))
