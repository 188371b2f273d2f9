"""``fedhealth run EXPERIMENT --federation NAME [--resume RUN_ID]``: a real federation.

Submits the experiment to the federation's SuperLink, streams each completed round
(from the run's status and the MLflow server's metrics) and exits non-zero when the
run failed — ``flwr run`` alone exits 0 even then.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from fedhealth.config.experiment import load_experiment
from fedhealth.errors import ConfigError, FederationError


def run_on_federation(
    console: Console,
    experiments: list[Path],
    federation: str,
    tracking_uri: str | None,
    resume: str | None,
    timeout: float | None = None,
) -> None:
    """Submit each experiment in turn and watch it to the end."""
    from fedhealth.deploy.submit import (
        known_tracking_uri,
        stop_stale_run,
        submit,
        use_known_credentials,
        watch,
    )

    if federation:
        use_known_credentials(federation)
    if resume and len(experiments) != 1:
        raise ConfigError("--resume continues one run: give exactly one experiment")
    for path in experiments:
        cfg = load_experiment(path)
        watch_uri = tracking_uri or known_tracking_uri(federation)
        if resume:
            stale = stop_stale_run(federation, watch_uri, resume)
            if stale:
                console.print(f"stopped Flower run {stale}, left running by the interrupted run")
        run_id = submit(federation, path, tracking_uri, resume)
        what = f"resuming MLflow run {resume}" if resume else "submitted"
        console.print(
            f"[bold]{cfg.name}[/]: {what} as Flower run {run_id} on federation {federation!r} "
            f"({cfg.experiment.rounds} rounds); logs: flwr log {run_id} {federation}",
            highlight=False,
        )

        def emit(
            kind: str,
            round_: int,
            data: dict,
            run_id=run_id,
            uri=watch_uri,
            rounds=cfg.experiment.rounds,
        ) -> None:
            if kind == "status":
                console.print(f"  run {run_id}: {data['status']}")
            elif kind == "mlflow-run":
                console.print(f"  MLflow run {data['run_id']} at {uri}", highlight=False)
            elif kind == "round":
                acc = data.get("accuracy")
                shown = "withheld" if acc is None else f"{acc:.4f}"  # every site withheld it
                console.print(f"  round {round_}/{rounds}: accuracy {shown}")

        state, seen = watch(
            federation, run_id, cfg.name, watch_uri, emit, timeout=timeout, mlflow_run_id=resume
        )
        if not state.ok:
            raise FederationError(
                f"run {run_id} of {cfg.name!r} ended {state.status}:{state.sub_status}"
                f"{' - ' + state.details if state.details else ''}. See `flwr log {run_id} "
                f"{federation}` and the coordinator's logs; continue it with `fedhealth run "
                f"{path} --federation {federation} --resume {seen.mlflow_run_id or 'RUN_ID'}`"
            )
        console.print(
            f"[green]run {run_id} of {cfg.name} completed[/]"
            + (f"; MLflow run {seen.mlflow_run_id}" if seen.mlflow_run_id else ""),
            highlight=False,
        )
