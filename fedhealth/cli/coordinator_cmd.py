"""``fedhealth coordinator start``: the SuperLink and the MLflow tracking server."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedhealth.cli.errors import guarded

app = typer.Typer(help="Run the coordinator: SuperLink and MLflow server.", no_args_is_help=True)
console = Console()


@app.command()
@guarded
def start(
    consortium: Path = typer.Option(
        Path("workspace/consortium"), "--consortium", help="Directory of `consortium init`."
    ),
    workspace: Path = typer.Option(
        Path("workspace/coordinator"), "--workspace", help="State, MLflow store and logs."
    ),
    host: str = typer.Option(
        "127.0.0.1",
        help="Address the SuperLink binds (0.0.0.0: all); its Control API answers only "
        "this machine.",
    ),
    port: int = typer.Option(9093, help="The SuperLink's HTTPS port (all its APIs)."),
    mlflow_host: str = typer.Option("127.0.0.1", help="Address the MLflow server binds."),
    mlflow_port: int = typer.Option(5000, help="The MLflow server's port."),
    backend_store_uri: str = typer.Option(
        None, help="MLflow backend store (default SQLite in the workspace; PostgreSQL URI ok)."
    ),
    artifact_root: str = typer.Option(None, help="MLflow artifact destination."),
    federation: str = typer.Option(
        "fedhealth", "--federation", help="Name of the flwr connection to write."
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="No TLS, no SuperNode authentication (testing only)."
    ),
    mlflow_max_restarts: int = typer.Option(
        5,
        "--mlflow-max-restarts",
        min=0,
        help="Restart the MLflow server if it exits, at most this often in 10 minutes.",
    ),
    state_db: Path = typer.Option(
        None,
        "--state-db",
        help="Keep the SuperLink's state (runs, sessions) in this SQLite file instead of in "
        "memory, so `flwr ls` survives a restart; rounds take about twice as long.",
    ),
) -> None:
    """Start the SuperLink (TLS, SuperNode auth) and the MLflow server.
    The consortium directory must hold only the coordinator's files (`fedhealth consortium
    coordinator-dir`); the SuperLink's Control API (run, list, register) answers only this
    machine, and the MLflow server requires a user name and password. Both run until Ctrl-C
    or SIGTERM, then stop cleanly. If the MLflow server exits, it is restarted on the same
    port with the same store (runs retry their MLflow calls meanwhile); the SuperLink keeps
    running.
    """  # one paragraph: typer keeps the line breaks of later ones, mid-sentence
    from fedhealth.coordinator.runconfig import TRACKING_ENV
    from fedhealth.deploy.coordinator import CoordinatorSettings, start_coordinator
    from fedhealth.deploy.submit import remember_tracking_uri, write_app_dir

    s = CoordinatorSettings(
        workspace=workspace,
        consortium=None if insecure else consortium,
        host=host,
        port=port,
        mlflow_host=mlflow_host,
        mlflow_port=mlflow_port,
        backend_store_uri=backend_store_uri,
        artifact_root=artifact_root,
        federation=federation,
        mlflow_max_restarts=mlflow_max_restarts,
        state_db=state_db,
    )
    s.extra_env[TRACKING_ENV] = s.tracking_uri
    coord = start_coordinator(s)
    try:
        remember_tracking_uri(federation, s.tracking_uri, s.mlflow_admin)
        app_dir = write_app_dir(workspace / "flwr-app")
        console.print(f"[green]coordinator running[/]: SuperLink on {s.host}:{s.port}"
                      f"{'' if insecure else ' (TLS, SuperNode authentication)'}, "
                      "Control API for this machine only, "
                      f"MLflow at {s.tracking_uri} (basic auth)")  # fmt: skip
        console.print(f"  MLflow admin account: {s.mlflow_admin.resolve()}  (readers: "
                      "fedhealth coordinator add-reader NAME)", highlight=False)  # fmt: skip
        for site, what in coord.registered.items():
            console.print(f"  SuperNode key of {site}: {what}")
        where = s.state_db.resolve() if s.state_db else "in memory (models and checkpoints: MLflow)"
        console.print(f"  SuperLink state: {where}", highlight=False)
        console.print(f"  MLflow store:   {s.backend()}  artifacts: {s.artifacts()}",
                      highlight=False)  # fmt: skip
        console.print(f"  logs:           {s.logs.resolve()}/{{superlink,mlflow}}.log",
                      highlight=False)  # fmt: skip
        console.print(
            f"Submit: fedhealth run EXPERIMENT --federation {federation}   "
            f"(or: flwr run {app_dir} {federation} -c 'experiment=\"/abs/exp.toml\"')",
            highlight=False,
            soft_wrap=True,
        )
        console.print("Ctrl-C stops the coordinator.")
        dead = coord.supervise(
            say=lambda line: console.print(line, highlight=False, soft_wrap=True)
        )
        if dead is not None:
            why = f"{dead.name} exited (code {dead.proc.returncode})"
            if dead is coord.mlflow:
                budget = coord.mlflow_restarts
                why += (
                    f" and was restarted {budget.recent()} time(s) in the last "
                    f"{budget.window / 60:.0f} minutes (at most {budget.limit})"
                )
            console.print(
                f"[red]{why}; stopping the coordinator. Its log: {dead.log}[/]\n{dead.tail()}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1)
    finally:
        coord.group.stop()
        console.print("coordinator stopped")


@app.command("add-reader")
@guarded
def add_reader(
    name: str = typer.Argument(..., help="User name of the new read-only MLflow account."),
    out: Path = typer.Option(
        None, "--out", help="Where to write its credentials (0600; default NAME.mlflow.json)."
    ),
    consortium: Path = typer.Option(
        Path("workspace/consortium"), "--consortium", help="The coordinator's directory."
    ),
    workspace: Path = typer.Option(
        Path("workspace/coordinator"), "--workspace", help="The coordinator's workspace."
    ),
    tracking_uri: str = typer.Option(
        "http://127.0.0.1:5000", "--tracking-uri", help="The running MLflow server."
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="The coordinator was started with --insecure."
    ),
) -> None:
    """Create a read-only MLflow account for a registry consumer (the coordinator must run).
    The consumer sets MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD from the file
    written; it reads every run and model version and changes none.
    """  # one paragraph: typer keeps the line breaks of later ones, mid-sentence
    from fedhealth.deploy.coordinator import CoordinatorSettings
    from fedhealth.deploy.mlflow_auth import Credentials
    from fedhealth.deploy.mlflow_auth import add_reader as create_reader

    s = CoordinatorSettings(workspace=workspace, consortium=None if insecure else consortium)
    admin = Credentials.load(s.mlflow_admin)
    out = out or Path(f"{name}.mlflow.json")
    if out.exists():
        from fedhealth.errors import ConfigError

        raise ConfigError(f"{out} exists; choose another --out (nothing was created)")
    creds = create_reader(tracking_uri, admin, name)
    creds.save(out)
    console.print(
        f"created read-only MLflow user {name!r}; credentials in {out.resolve()} (0600). "
        "Give them to the consumer: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.",
        highlight=False,
        soft_wrap=True,
    )


@app.command("app-dir")
@guarded
def app_dir(
    out: Path = typer.Argument(Path("workspace/coordinator/flwr-app"), help="Folder to write."),
) -> None:
    """Write the Flower App folder that `flwr run` submits (fedhealth's installed apps)."""
    from fedhealth.deploy.submit import write_app_dir

    console.print(f"wrote {write_app_dir(out) / 'pyproject.toml'}", highlight=False)
