"""The coordinator's processes: the SuperLink and the MLflow tracking server.

Everything lives in one workspace folder::

    <workspace>/mlflow/mlflow.db          MLflow's backend store (SQLite default)
    <workspace>/mlflow/artifacts/         MLflow's artifact root (models, checkpoints)
    <workspace>/mlflow/auth.db            MLflow's user store (basic-auth app)
    <workspace>/logs/superlink.log        logs of each process
    <workspace>/logs/mlflow.log

The SuperLink keeps its state (runs, messages, SuperNode sessions) in memory, Flower's
default: what must outlive the coordinator is elsewhere. The SuperNode keys are registered
again from the consortium directory at every start, and a run resumes from its MLflow
checkpoints (``fedhealth run --resume``). ``state_db`` keeps that state in an SQLite file
instead, for operators who want Flower's run list (``flwr ls``) to survive a restart; it
makes every SuperLink request slower (SQLAlchemy, locking) and a deployed round about twice
as long on a 2-core machine (docs/benchmarks.md).

While it runs, :meth:`Coordinator.supervise` restarts the MLflow server if it exits (same
port, same store), at most ``mlflow_max_restarts`` times in ten minutes with a growing
pause; the SuperLink keeps running meanwhile, and the ServerApp's MLflow calls wait for
the server (:mod:`fedhealth.registry.retry`).

The SuperLink runs behind :mod:`fedhealth.deploy.superlink_gate` (its Control and Runtime
APIs answer only this machine), and the MLflow server with MLflow's basic-auth app
(:mod:`fedhealth.deploy.mlflow_auth`). :func:`check_coordinator_dir` refuses a consortium
directory that holds the CA's or a site's private keys.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedhealth.deploy.connection import register_node, write_connection
from fedhealth.deploy.mlflow_auth import Credentials, admin_path, ensure_admin, server_env
from fedhealth.deploy.processes import Child, ProcessError, ProcessGroup, venv_bin
from fedhealth.deploy.provision import TLSLayout, foreign_secrets
from fedhealth.errors import ConfigError

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
    mlflow_max_restarts : int
        How often the MLflow server is restarted within ten minutes before the coordinator
        gives up and stops.
    state_db : Path or None
        SQLite file for the SuperLink's state; ``None`` (default) keeps it in memory.
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
    mlflow_max_restarts: int = 5
    state_db: Path | None = None

    @property
    def mlflow_admin(self) -> Path:
        """The MLflow admin's credentials file (provisioned; else in the workspace)."""
        if self.consortium is not None:
            return admin_path(self.consortium)
        return self.workspace / "mlflow" / "admin.json"

    def superlink_database(self) -> str:
        """The SuperLink's ``--database``: the state file, or Flower's in-memory state."""
        from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

        return str(self.state_db.resolve()) if self.state_db else FLWR_IN_MEMORY_DB_NAME

    @property
    def logs(self) -> Path:
        """Folder of the process logs."""
        return self.workspace / "logs"

    @property
    def tracking_uri(self) -> str:
        """The MLflow server's URI, as the ServerApp should use it."""
        return f"http://{self.mlflow_connect_host}:{self.mlflow_port}"

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

    @property
    def mlflow_connect_host(self) -> str:
        """Where this machine reaches the MLflow server."""
        return "127.0.0.1" if self.mlflow_host in ("0.0.0.0", "::") else self.mlflow_host


def superlink_argv(s: CoordinatorSettings) -> list[str]:
    """The ``flower-superlink`` command line."""
    argv = [
        sys.executable, "-m", "fedhealth.deploy.superlink_gate",
        "--database", s.superlink_database(),
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
        "--app-name", "basic-auth",
    ]  # fmt: skip


def check_coordinator_dir(consortium: Path) -> None:
    """Refuse a consortium directory that holds secrets no coordinator may hold.

    Raises
    ------
    ConfigError
        Naming the first such file and what belongs on the coordinator's machine.
    """
    found = foreign_secrets(Path(consortium))
    if found:
        shown = ", ".join(str(p) for p in found[:3]) + (" ..." if len(found) > 3 else "")
        raise ConfigError(
            f"{consortium} holds secrets that must never be on the coordinator's machine: "
            f"{shown}. Start the coordinator from a directory with only the coordinator's "
            "files (coordinator/ and deployment.json): `fedhealth consortium coordinator-dir "
            f"OUT --dir {consortium}` copies them; keep the CA key offline and give each "
            "site only its own sites/<name>/ folder"
        )


def check_host(host: str) -> None:
    """The SuperLink must bind loopback or every interface: the operator's commands on this
    machine reach it at 127.0.0.1, which :mod:`~fedhealth.deploy.superlink_gate` trusts."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if host != "localhost" and (addr is None or not (addr.is_loopback or addr.is_unspecified)):
        raise ConfigError(
            f"--host {host}: bind the SuperLink to 0.0.0.0 (sites on other machines) or "
            "127.0.0.1; its Control API answers only this machine's loopback address"
        )


@dataclass
class RestartBudget:
    """At most ``limit`` restarts within ``window`` seconds; before each one a pause that
    doubles with every recent restart (1, 2, 4, 8, ... s, at most ``max_pause``)."""

    limit: int = 5
    window: float = 600.0
    first_pause: float = 1.0
    max_pause: float = 30.0
    times: list[float] = field(default_factory=list)

    def recent(self, now: float | None = None) -> int:
        """Restarts within the window before ``now`` (``time.monotonic()`` seconds)."""
        now = time.monotonic() if now is None else now
        self.times = [t for t in self.times if now - t < self.window]
        return len(self.times)

    def allows(self, now: float | None = None) -> bool:
        """Whether one more restart is within the budget."""
        return self.recent(now) < self.limit

    def pause(self, now: float | None = None) -> float:
        """Seconds to wait before the next restart."""
        return min(self.first_pause * 2 ** self.recent(now), self.max_pause)

    def record(self, now: float | None = None) -> int:
        """Count a restart; returns how many the window now holds."""
        self.times.append(time.monotonic() if now is None else now)
        return self.recent(now)


@dataclass
class Coordinator:
    """The running coordinator: its process group and where things are."""

    settings: CoordinatorSettings
    group: ProcessGroup
    superlink: Child
    mlflow: Child
    registered: dict[str, str]
    admin: Credentials
    mlflow_restarts: RestartBudget = field(default_factory=RestartBudget)

    def __post_init__(self) -> None:
        self.mlflow_restarts.limit = self.settings.mlflow_max_restarts

    def supervise(self, say: Callable[[str], None] = print) -> Child | None:
        """Run until SIGINT/SIGTERM (returns ``None``) or a child exits for good (returns it).

        The MLflow server is restarted when it exits, within :attr:`mlflow_restarts`;
        ``say`` reports each restart. The SuperLink exiting ends the supervision.
        """
        return self.group.supervise(restart=lambda dead: self._restart_mlflow(dead, say))

    def _restart_mlflow(self, dead: Child, say: Callable[[str], None]) -> bool:
        s = self.settings
        budget = self.mlflow_restarts
        if dead is not self.mlflow or not budget.allows():
            return False
        code = dead.proc.returncode
        pause = budget.pause()
        say(
            f"MLflow server exited unexpectedly (code {code}); restarting it in {pause:.0f} s "
            f"(log: {dead.log})"
        )
        if not self.group.pause(pause):
            return False
        n = budget.record()
        with dead.log.open("a") as fh:
            fh.write(
                f"\n--- fedhealth {time.strftime('%Y-%m-%d %H:%M:%S')}: the MLflow server "
                f"exited with code {code}; restarting it (restart {n} in "
                f"{budget.window / 60:.0f} minutes) ---\n"
            )
        self.mlflow = self.group.restart(dead)
        try:
            self.group.wait_port(self.mlflow, s.mlflow_connect_host, s.mlflow_port, timeout=120)
        except ProcessError as exc:
            if not self.group.stopping:
                say(f"the restarted MLflow server did not come up: {exc}")
            return True  # a restart that died is seen (and counted) on the next check
        say(
            f"restarted the MLflow server at {s.tracking_uri} with the same store (pid "
            f"{self.mlflow.pid}; restart {n} of at most {budget.limit} in "
            f"{budget.window / 60:.0f} minutes); the SuperLink kept running"
        )
        return True


def start_coordinator(s: CoordinatorSettings, timeout: float = 180.0) -> Coordinator:
    """Start the MLflow server and the SuperLink, write the flwr connection, and register
    every provisioned site's SuperNode key. On any failure, stop what was started.
    """
    check_host(s.host)
    if s.consortium is not None:
        check_coordinator_dir(s.consortium)
    s.workspace.mkdir(parents=True, exist_ok=True)
    if s.state_db is not None:
        s.state_db.parent.mkdir(parents=True, exist_ok=True)
    (s.workspace / "mlflow").mkdir(parents=True, exist_ok=True)
    if s.artifact_root is None:
        Path(s.artifacts()).mkdir(parents=True, exist_ok=True)
    admin, _ = ensure_admin(s.mlflow_admin)
    ml_env = {**s.extra_env, **server_env(s.workspace / "mlflow", admin)}
    link_env = {**s.extra_env, **admin.env()}  # the ServerApp records runs as the admin
    group = ProcessGroup()
    try:
        ml = group.start("mlflow server", mlflow_argv(s), s.logs / "mlflow.log", ml_env)
        link = group.start("SuperLink", superlink_argv(s), s.logs / "superlink.log", link_env)
        group.wait_port(link, s.connect_host, s.port, timeout)
        group.wait_port(ml, s.mlflow_connect_host, s.mlflow_port, timeout)
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
    return Coordinator(s, group, link, ml, registered, admin)
