"""Authentication of the coordinator's MLflow server: MLflow's own ``basic-auth`` app.

The server runs ``mlflow server --app-name basic-auth``; every request needs a user name
and password (HTTP basic auth), an anonymous one gets 401. Accounts:

* the **admin** (reads and writes everything): created at provisioning in
  ``<consortium>/coordinator/mlflow/admin.json`` (0600, coordinator machine only; with
  ``coordinator start --insecure`` in ``<workspace>/mlflow/admin.json``). The coordinator's
  ServerApp records runs and registers models with it, through MLflow's own
  ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``.
* **readers** for registry consumers (``fedhealth coordinator add-reader NAME``): ordinary
  MLflow users; the server's default permission is ``READ``, so they read every experiment
  and model version and change none of the consortium's.

The user store is ``<workspace>/mlflow/auth.db`` (SQLite, beside the tracking store), the
server's config ``<workspace>/mlflow/basic_auth.ini`` and its CSRF key
``<workspace>/mlflow/flask-secret`` (0600). Clients name their account with
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (MLflow reads them itself);
``fedhealth run --federation`` on the coordinator's machine uses the admin file that
``coordinator start`` recorded for the federation.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from fedhealth.deploy.pki import write_private
from fedhealth.errors import ConfigError, FederationError

ADMIN = "admin"
USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


@dataclass
class Credentials:
    """One MLflow account: user name and password."""

    username: str
    password: str

    def env(self) -> dict[str, str]:
        """The environment variables MLflow's client reads its credentials from."""
        return {USER_ENV: self.username, PASSWORD_ENV: self.password}

    def save(self, path: Path) -> Path:
        """Write the credentials to a new file, mode 0600."""
        blob = {"username": self.username, "password": self.password}
        return write_private(Path(path), json.dumps(blob, indent=2).encode() + b"\n")

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """Read credentials written by :meth:`save`."""
        try:
            blob = json.loads(Path(path).read_text())
            return cls(str(blob["username"]), str(blob["password"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path}: not an MLflow credentials file ({exc}); it holds "
                '{"username": ..., "password": ...}'
            ) from exc

    @classmethod
    def new(cls, username: str) -> Credentials:
        """A fresh random password for ``username``."""
        return cls(username, secrets.token_urlsafe(24))


def admin_path(consortium: Path) -> Path:
    """Where provisioning puts the MLflow admin's credentials (coordinator machine)."""
    return Path(consortium) / "coordinator" / "mlflow" / "admin.json"


def ensure_admin(path: Path) -> tuple[Credentials, bool]:
    """The admin credentials at ``path``, created (0600) if missing; ``(creds, created)``."""
    if Path(path).is_file():
        return Credentials.load(path), False
    creds = Credentials.new(ADMIN)
    creds.save(path)
    return creds, True


def _secret_file(path: Path) -> str:
    if not path.is_file():
        write_private(path, secrets.token_hex(32).encode())
    return path.read_text().strip()


#: Seconds the MLflow server remembers a verified user name and password (its
#: ``auth_cache_ttl_seconds``). Without it every request of a run pays one scrypt password
#: check (tens of milliseconds, most of a second on a loaded machine; a round makes dozens
#: of requests). The cost: a password change or deletion made through another worker, or
#: out of band, takes effect up to this long later.
AUTH_CACHE_SECONDS = 60


def server_env(mlflow_dir: Path, admin: Credentials) -> dict[str, str]:
    """Environment of ``mlflow server --app-name basic-auth``: its config file (user store in
    ``mlflow_dir``, verified credentials cached :data:`AUTH_CACHE_SECONDS`), the admin it
    creates on first start, its CSRF key, and MLflow's job execution off.

    MLflow 3 starts a job runner and seven job-queue consumers with its server (for GenAI
    evaluation jobs and trace roll-ups, which fedhealth does not use): eight more processes
    holding about 1.9 GB between them on the coordinator's machine, and a gateway token
    shared with job subprocesses. fedhealth's registry needs none of them.
    """
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    ini = mlflow_dir / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{(mlflow_dir / 'auth.db').resolve()}\n"
        f"admin_username = {admin.username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini.resolve()),
        "MLFLOW_AUTH_ADMIN_USERNAME": admin.username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin.password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": _secret_file(mlflow_dir / "flask-secret"),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }


def add_reader(tracking_uri: str, admin: Credentials, username: str) -> Credentials:
    """Create a read-only account on the MLflow server; returns its credentials."""
    import requests

    creds = Credentials.new(username)
    res = requests.post(
        f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/users/create",
        json={"username": creds.username, "password": creds.password},
        auth=(admin.username, admin.password),
        timeout=30,
    )
    if res.status_code != 200:
        raise FederationError(
            f"the MLflow server at {tracking_uri} did not create user {username!r} "
            f"(HTTP {res.status_code}: {res.text[:200]}); is the coordinator running, and "
            "does the user exist already?"
        )
    return creds


def export_credentials(path: Path) -> None:
    """Put the account in ``path`` into this process's environment for MLflow's client,
    unless ``MLFLOW_TRACKING_USERNAME`` names one already."""
    if not os.environ.get(USER_ENV):
        os.environ.update(Credentials.load(Path(path)).env())
