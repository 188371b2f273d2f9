"""The coordinator's processes: the SuperLink and the MLflow tracking server.

Everything lives in one workspace folder::

    <workspace>/superlink/state.db        the SuperLink's persistent state (back it up)
    <workspace>/mlflow/mlflow.db          MLflow's backend store (SQLite default)
    <workspace>/mlflow/artifacts/         MLflow's artifact root (models, checkpoints)
    <workspace>/logs/superlink.log        logs of each process
    <workspace>/logs/mlflow.log
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedhealth.deploy.connection import register_node, write_connection
from fedhealth.deploy.processes import Child, ProcessGroup, venv_bin
from fedhealth.deploy.provision import TLSLayout

DEFAULT_FEDERATION = "fedhealth"


@dataclass
class CoordinatorSettings:
    """How to run the coordinator.

    Parameters
    ----------
    workspace : Path
        Folder for state, MLflow store and logs.
    consortium : Path or None
        Provisioned consortium directory (TLS, SuperNode keys); ``None`` runs without
        TLS and authentication (tests of the transport only).
    host : str
        Address the SuperLink binds (``0.0.0.0`` to accept other machines).
    port : int
        The SuperLink's one HTTPS port (Fleet, Control and Runtime APIs).
    mlflow_host, mlflow_port : str, int
        Where the MLflow tracking server listens.
    backend_store_uri : str or None
        MLflow backend store; default SQLite in the workspace; a PostgreSQL URI works.
    artifact_root : Path or str or None
        MLflow artifact destination; default ``<workspace>/mlflow/artifacts``.
    federation : str
        Name of the flwr SuperLink connection written for ``flwr run``/``fedhealth run``.
    connect_host : str
        Host name clients on this machine use to reach the SuperLink.
    """

    workspace: Path
    consortium: Path | None
    host: str = "127.0.0.1"
    port: int = 9093
    mlflow_host: str = "127.0.0.1"
    mlflow_port: int = 5000
    backend_store_uri: str | None = None
    artifact_root: Path | str | None = None
    federation: str = DEFAULT_FEDERATION
    connect_host: str = "127.0.0.1"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def state_db(self) -> Path:
        """The SuperLink's state database."""
        return self.workspace / "superlink" / "state.db"

    @property
    def logs(self) -> Path:
        """Folder of the process logs."""
        return self.workspace / "logs"

    @property
    def tracking_uri(self) -> str:
        """The MLflow server's URI, as the ServerApp should use it."""
        host = "127.0.0.1" if self.mlflow_host in ("0.0.0.0", "::") else self.mlflow_host
        return f"http://{host}:{self.mlflow_port}"

    @property
    def address(self) -> str:
        """``host:port`` clients use to reach the SuperLink."""
        return f"{self.connect_host}:{self.port}"

    def backend(self) -> str:
        """The MLflow backend store URI."""
        db = self.workspace / "mlflow" / "mlflow.db"
        return self.backend_store_uri or f"sqlite:///{db.resolve()}"

    def artifacts(self) -> str:
        """The MLflow artifact destination."""
        return str(self.artifact_root or (self.workspace / "mlflow" / "artifacts").resolve())


def superlink_argv(s: CoordinatorSettings) -> list[str]:
    """The ``flower-superlink`` command line."""
    argv = [
        str(venv_bin() / "flower-superlink"),
        "--database", str(s.state_db.resolve()),
        "--disable-runtime-dependency-installation",
        "--host", s.host,
        "--port", str(s.port),
    ]  # fmt: skip
    if s.consortium is None:
        return [*argv, "--insecure"]
    tls = TLSLayout.load(s.consortium)
    return [
        *argv,
        "--ssl-certfile", str(tls.server_cert.resolve()),
        "--ssl-keyfile", str(tls.server_key.resolve()),
        "--ssl-ca-certfile", str(tls.ca_cert.resolve()),
        "--enable-supernode-auth",
    ]  # fmt: skip


def mlflow_argv(s: CoordinatorSettings) -> list[str]:
    """The ``mlflow server`` command line."""
    return [
        str(venv_bin() / "mlflow"), "server",
        "--backend-store-uri", s.backend(),
        "--artifacts-destination", s.artifacts(),
        "--serve-artifacts",
        "--host", s.mlflow_host,
        "--port", str(s.mlflow_port),
        "--workers", "1",
    ]  # fmt: skip


@dataclass
class Coordinator:
    """The running coordinator: its process group and where things are."""

    settings: CoordinatorSettings
    group: ProcessGroup
    superlink: Child
    mlflow: Child
    registered: dict[str, str]


def start_coordinator(s: CoordinatorSettings, timeout: float = 90.0) -> Coordinator:
    """Start the MLflow server and the SuperLink, write the flwr connection, and register
    every provisioned site's SuperNode key. On any failure, stop what was started.
    """
    s.workspace.mkdir(parents=True, exist_ok=True)
    s.state_db.parent.mkdir(parents=True, exist_ok=True)
    (s.workspace / "mlflow").mkdir(parents=True, exist_ok=True)
    if s.artifact_root is None:
        Path(s.artifacts()).mkdir(parents=True, exist_ok=True)
    group = ProcessGroup()
    try:
        ml = group.start("mlflow server", mlflow_argv(s), s.logs / "mlflow.log", s.extra_env)
        link = group.start("SuperLink", superlink_argv(s), s.logs / "superlink.log", s.extra_env)
        group.wait_port(link, s.connect_host, s.port, timeout)
        group.wait_port(ml, "127.0.0.1" if s.mlflow_host == "0.0.0.0" else s.mlflow_host,
                        s.mlflow_port, timeout)  # fmt: skip
        root_cert = TLSLayout.load(s.consortium).ca_cert if s.consortium else None
        write_connection(s.federation, s.address, root_cert)
        registered = {}
        if s.consortium is not None:
            tls = TLSLayout.load(s.consortium)
            for site in tls.sites:
                registered[site] = register_node(tls.node_public_key(site), s.federation, site)
    except BaseException:
        group.stop()
        raise
    return Coordinator(s, group, link, ml, registered)
