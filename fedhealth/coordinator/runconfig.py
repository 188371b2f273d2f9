"""What a deployed run's config carries to the ServerApp, and how the ServerApp reads it.

Keys (declared in the FAB's ``[tool.flwr.app.config]``):

``experiment``       absolute path of the experiment TOML on the submitting machine
``experiment-toml``  its content, used when the path is not readable by the ServerApp
``tracking-uri``     MLflow tracking URI (default: ``$FEDHEALTH_TRACKING_URI`` set by
                     ``fedhealth coordinator start``, then the experiment's own)
``resume-run-id``    MLflow run id of an interrupted run to continue
``analysis``         instead of an experiment: absolute path of an analysis TOML
``analysis-toml``    its content (``fedhealth analyze ANALYSIS --federation NAME``)
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from fedhealth import settings
from fedhealth.errors import ConfigError

TRACKING_ENV = settings.TRACKING_URI.name
KEYS = (
    "experiment",
    "experiment-toml",
    "tracking-uri",
    "resume-run-id",
    "analysis",
    "analysis-toml",
)


def experiment_path(run_config: dict[str, Any]) -> Path:
    """The experiment file: the submitted path if readable here, else a copy of its content."""
    return _config_file(run_config, "experiment", "fedhealth run EXPERIMENT")


def is_analysis(run_config: dict[str, Any]) -> bool:
    """Whether the run is an analysis (``fedhealth analyze``) rather than an experiment."""
    return bool(run_config.get("analysis") or run_config.get("analysis-toml"))


def analysis_path(run_config: dict[str, Any]) -> Path:
    """The analysis file: the submitted path if readable here, else a copy of its content."""
    return _config_file(run_config, "analysis", "fedhealth analyze ANALYSIS")


def _config_file(run_config: dict[str, Any], key: str, command: str) -> Path:
    path = Path(str(run_config.get(key) or ""))
    if str(path) and path.is_file():
        return path
    text = str(run_config.get(f"{key}-toml") or "")
    if not text:
        raise ConfigError(
            f"the run config names {key} {str(path)!r}, which the coordinator cannot "
            f"read, and carries no `{key}-toml`; submit with `{command} "
            "--federation NAME`, which sends both"
        )
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / "fedhealth-experiments" / digest
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / (path.name or f"{key}.toml")
    copy.write_text(text)
    return copy


def tracking_uri(run_config: dict[str, Any], configured: str | None, default: str) -> str:
    """Run config, then the coordinator's MLflow server, then the experiment, then default."""
    return str(
        run_config.get("tracking-uri") or settings.TRACKING_URI.get() or configured or default
    )


def resume_run(run_config: dict[str, Any]) -> str | None:
    """The MLflow run id to continue, if this run resumes one."""
    value = str(run_config.get("resume-run-id") or "").strip()
    return value or None
