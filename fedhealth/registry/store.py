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
from sqlalchemy.exc import SADeprecationWarning

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
    _ignore_mlflow_noload_warning()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _ignore_mlflow_noload_warning() -> None:
    """Silence the one SQLAlchemy deprecation MLflow's SQL stores trigger, and only it.

    MLflow's tracking store maps a relationship with ``lazy="noload"``, which SQLAlchemy
    2.1 deprecates; every store opened (tracking, registry, the one ``log_model`` opens)
    printed it to the user. It is MLflow's to fix, so this filter matches that message and
    category exactly; every other warning still shows.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"The ``noload`` loader strategy is deprecated",
        category=SADeprecationWarning,
    )


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Id of the MLflow experiment ``name``, created with a local artifact root if new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(tracking_uri))
