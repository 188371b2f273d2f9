"""The coordinator as a Flower ServerApp: ``fedhealth.coordinator.server_app:app``.

The run config carries ``experiment`` (path of the experiment TOML on the
coordinator's machine) and ``tracking-uri``; the same app runs in simulation
and on a SuperLink. The simulation engine builds its own with :func:`make_app`, to
watch the run's progress and to get its :class:`RunSummary` back.
"""

from __future__ import annotations

from typing import cast

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhealth.config.experiment import load_experiment
from fedhealth.coordinator.federation import Federation, RunSummary
from fedhealth.coordinator.guard import GuardedGrid
from fedhealth.coordinator.progress import Observer
from fedhealth.coordinator.runconfig import experiment_path, resume_run, tracking_uri
from fedhealth.registry.retry import configure_mlflow_http
from fedhealth.registry.store import default_tracking_uri


def run_experiment(grid: Grid, context: Context, on_event: Observer | None = None) -> RunSummary:
    """Run the experiment named in the run config; returns its summary."""
    configure_mlflow_http()  # before any MLflow call of this coordinator process
    rc = dict(context.run_config)
    cfg = load_experiment(experiment_path(rc))
    uri = tracking_uri(rc, cfg.tracking.uri, default_tracking_uri())
    federation = Federation(cfg, uri, on_event)
    federation.run_tags = {"fedhealth.flwr_run_id": str(context.run_id)}
    federation.resume_from = resume_run(rc)
    # Never wait forever for sites: Flower's sampler would (see fedhealth.coordinator.guard).
    exp = cfg.experiment
    guarded = GuardedGrid(grid, exp.min_sites, len(exp.sites), exp.round_timeout)
    return federation.run(cast(Grid, guarded))  # it delegates the rest of Grid to `grid`


def make_app(
    on_event: Observer | None = None, results: list[RunSummary] | None = None
) -> ServerApp:
    """A ServerApp running the experiment of its run config.

    Parameters
    ----------
    on_event : callable, optional
        Observer of the run's progress events (a live display).
    results : list, optional
        The run's :class:`RunSummary` is appended here when it finishes (Flower drops a
        ServerApp's return value; an in-process caller reads it from this list).
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        summary = run_experiment(grid, context, on_event)
        if results is not None:
            results.append(summary)

    return server


app = make_app()
