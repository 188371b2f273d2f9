"""Submit an experiment to a real federation and watch it to the end.

The run is a Flower App Bundle (FAB) holding only a ``pyproject.toml`` whose
components point at the installed ``fedhealth`` apps — the coordinator and every site
already run the same fedhealth version, so nothing is installed at run time. The same
folder works with ``flwr run`` (:func:`write_app_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhealth import __version__
from fedhealth.deploy.connection import read_connection
from fedhealth.errors import FederationError

SERVER_APP = "fedhealth.coordinator.server_app:app"
CLIENT_APP = "fedhealth.site.client_app:app"
FEDERATIONS_FILE = "fedhealth-federations.json"  # beside flwr's config.toml

APP_PYPROJECT = f"""\
# A Flower App that runs the installed fedhealth apps (no code of its own).
# Submit with:  flwr run <this folder> <connection> -c 'experiment="/abs/path/exp.toml"'
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedhealth-app"
version = "{__version__}"
description = "fedhealth coordinator and site apps"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedhealth"

[tool.flwr.app.components]
serverapp = "{SERVER_APP}"
clientapp = "{CLIENT_APP}"

[tool.flwr.app.config]
experiment = ""
experiment-toml = ""
tracking-uri = ""
resume-run-id = ""
validate-model = ""
validate-split = ""
validate-threshold = ""
validate-dataset = ""
analysis = ""
analysis-toml = ""
"""


def write_app_dir(folder: Path) -> Path:
    """Write the app folder (``pyproject.toml``) that ``flwr run`` builds into a FAB."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def _flwr_home() -> Path:
    from flwr.supercore.utils import get_flwr_home

    return Path(get_flwr_home())


def remember_tracking_uri(federation: str, uri: str, credentials: Path | None = None) -> None:
    """Record the federation's MLflow server (and the file of the account to use) so that
    ``fedhealth run`` can stream its metrics."""
    path = _flwr_home() / FEDERATIONS_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[federation] = {"tracking-uri": uri}
    if credentials is not None:
        data[federation]["credentials"] = str(Path(credentials).resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def known_tracking_uri(federation: str) -> str | None:
    """The MLflow server recorded for ``federation`` by ``fedhealth coordinator start``."""
    path = _flwr_home() / FEDERATIONS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(federation, {}).get("tracking-uri")


def use_known_credentials(federation: str) -> None:
    """Export the MLflow account ``coordinator start`` recorded for ``federation`` (see
    :func:`fedhealth.deploy.mlflow_auth.export_credentials`), if any."""
    from fedhealth.deploy.mlflow_auth import export_credentials

    path = _flwr_home() / FEDERATIONS_FILE
    blob = json.loads(path.read_text()).get(federation, {}) if path.is_file() else {}
    if blob.get("credentials") and Path(blob["credentials"]).is_file():
        export_credentials(Path(blob["credentials"]))


def _client(federation: str):
    from flwr.cli.utils import init_http_client_from_connection

    conn = read_connection(federation)
    with contextlib.redirect_stdout(io.StringIO()):  # flwr prints "Using SuperLink: ..."
        return init_http_client_from_connection(conn)


def submit(
    federation: str,
    experiment: Path,
    tracking_uri: str | None = None,
    resume_run_id: str | None = None,
    kind: str = "experiment",
) -> int:
    """Start a run of ``experiment`` on the federation's SuperLink; returns Flower's run id.

    ``kind = "analysis"`` submits ``experiment`` as an analysis TOML (``fedhealth analyze``):
    the same app, whose ServerApp runs the analysis its run config names.
    """
    if kind not in ("experiment", "analysis"):
        raise ValueError(f"kind is 'experiment' or 'analysis', not {kind!r}")
    path = Path(experiment).resolve()
    config: dict[str, Any] = {kind: str(path), f"{kind}-toml": path.read_text()}
    if tracking_uri:
        config["tracking-uri"] = tracking_uri
    if resume_run_id:
        config["resume-run-id"] = resume_run_id
    return start_run(federation, config)


def start_run(federation: str, config: dict[str, Any]) -> int:
    """Start fedhealth's apps on the federation with run config ``config``; Flower's run id
    (``fedhealth evaluate --federation`` passes the ``validate-*`` keys)."""
    from flwr.cli.build import build_fab_from_files
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab_bytes, _ = build_fab_from_files({"pyproject.toml": APP_PYPROJECT.encode()})
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    client = _client(federation)
    try:
        res = client.StartRun(
            StartRunRequest(
                fab=fab_to_proto(fab),
                override_config=user_config_to_proto(config),
                federation="",
            )
        )
    except BaseException as exc:
        raise FederationError(
            f"the SuperLink of federation {federation!r} refused the run: {exc}. Is the "
            "coordinator running (`fedhealth coordinator start`)?"
        ) from exc
    finally:
        client.close()
    if not res.HasField("run_id"):
        raise FederationError(f"the SuperLink of federation {federation!r} started no run")
    return int(res.run_id)


@dataclass
class RunState:
    """A Flower run's status, as ``flwr ls`` shows it."""

    status: str  # pending | starting | running | finished
    sub_status: str  # completed | failed | stopped | ""
    details: str = ""

    @property
    def done(self) -> bool:
        """Whether the run has ended."""
        return self.status == "finished"

    @property
    def ok(self) -> bool:
        """Whether the run ended successfully."""
        return self.done and self.sub_status == "completed"


def run_state(federation: str, run_id: int) -> RunState:
    """The status of Flower run ``run_id``."""
    from flwr.proto.control_pb2 import ListRunsRequest

    client = _client(federation)
    try:
        res = client.ListRuns(ListRunsRequest(run_id=run_id))
    finally:
        client.close()
    run = res.run_dict.get(run_id)
    if run is None:
        raise FederationError(f"the SuperLink of {federation!r} knows no run {run_id}")
    return RunState(run.status.status, run.status.sub_status, run.status.details)


@dataclass
class Progress:
    """What the watcher has seen of the MLflow run so far."""

    mlflow_run_id: str | None = None
    rounds_seen: set[int] = field(default_factory=set)


def _mlflow_progress(uri: str, experiment: str, flwr_run_id: int, seen: Progress, emit) -> None:
    """Emit each newly completed round's global metrics from the MLflow server."""
    import mlflow

    from fedhealth.registry.retry import retrying

    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    if seen.mlflow_run_id is None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return
        runs = client.search_runs(
            [exp.experiment_id], f"tags.`fedhealth.flwr_run_id` = '{flwr_run_id}'"
        )
        if not runs:
            return
        seen.mlflow_run_id = runs[0].info.run_id
        emit("mlflow-run", 0, {"run_id": seen.mlflow_run_id})
    hist = retrying(client.get_metric_history, seen.mlflow_run_id, "global/accuracy", deadline=5)
    for m in sorted(hist, key=lambda m: m.step):
        if m.step not in seen.rounds_seen:
            seen.rounds_seen.add(m.step)
            emit("round", m.step, {"accuracy": m.value})


def watch(
    federation: str,
    run_id: int,
    experiment: str,
    tracking_uri: str | None,
    emit: Callable[[str, int, dict], None],
    poll: float = 2.0,
    timeout: float | None = None,
    mlflow_run_id: str | None = None,
) -> tuple[RunState, Progress]:
    """Poll the run's status (and MLflow's per-round metrics) until it ends."""
    seen = Progress(mlflow_run_id)
    start = time.monotonic()
    last = ""
    while True:
        state = run_state(federation, run_id)
        if state.status != last:
            emit("status", 0, {"status": state.status})
            last = state.status
        if tracking_uri:
            try:
                _mlflow_progress(tracking_uri, experiment, run_id, seen, emit)
            except Exception as exc:  # noqa: BLE001 - progress display only
                emit("warning", 0, {"message": f"MLflow not reachable: {exc}"})
        if state.done:
            return state, seen
        if timeout is not None and time.monotonic() - start > timeout:
            raise FederationError(f"run {run_id} did not finish within {timeout:.0f} s")
        time.sleep(poll)


def env_flwr_home() -> str | None:
    """``$FLWR_HOME`` if set (where connections live)."""
    return os.environ.get("FLWR_HOME")


def stop_stale_run(federation: str, tracking_uri: str | None, mlflow_run_id: str) -> int | None:
    """Stop the Flower run an interrupted MLflow run came from, if the SuperLink still
    counts it as running (its ServerApp died with the coordinator). Returns its id."""
    from flwr.proto.control_pb2 import StopRunRequest

    if not tracking_uri:
        return None
    try:
        import mlflow

        client = mlflow.tracking.MlflowClient(tracking_uri, registry_uri=tracking_uri)
        run = client.get_run(mlflow_run_id)
        old = int(run.data.tags.get("fedhealth.flwr_run_id", "0"))
        if not old or run_state(federation, old).done:
            return None
        client = _client(federation)
        try:
            client.StopRun(StopRunRequest(run_id=old))
        finally:
            client.close()
        return old
    except Exception:  # noqa: BLE001 - best effort: the resumed run works either way
        return None
