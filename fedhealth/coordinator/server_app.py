"""The coordinator as a Flower ServerApp: ``fedhealth.coordinator.server_app:app``.

The run config carries ``experiment`` (path of the experiment TOML on the
coordinator's machine) and ``tracking-uri``; the same app runs in simulation
and on a SuperLink. The simulation engine builds its own with :func:`make_app`, to
watch the run's progress and to get its :class:`RunSummary` back.

A run config naming an ``analysis`` instead runs that federated analysis
(:mod:`fedhealth.coordinator.analysis_run`); its result is an
:class:`~fedhealth.coordinator.analysis_run.AnalysisOutcome`.
"""

from __future__ import annotations

from typing import cast

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhealth.config.experiment import load_experiment
from fedhealth.coordinator.federation import Federation, RunSummary
from fedhealth.coordinator.guard import GuardedGrid
from fedhealth.coordinator.progress import Observer
from fedhealth.coordinator.runconfig import (
    experiment_path,
    is_analysis,
    resume_run,
    tracking_uri,
)
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


def validate_model(grid: Grid, context: Context):
    """Run the evaluation-only study the run config names (``validate-model`` and
    ``validate-split``, ``validate-threshold``, ``validate-dataset``)."""
    from fedhealth.coordinator.validation import run_validation

    configure_mlflow_http()
    rc = dict(context.run_config)
    uri = tracking_uri(rc, None, default_tracking_uri())
    return run_validation(
        grid,
        uri,
        str(rc["validate-model"]),
        split=str(rc.get("validate-split") or "test"),
        threshold=float(rc.get("validate-threshold") or 0.5),
        dataset=str(rc.get("validate-dataset") or "") or None,
    )


def make_app(on_event: Observer | None = None, results: list | None = None) -> ServerApp:
    """A ServerApp running the experiment, the analysis or the validation of its run config.

    Parameters
    ----------
    on_event : callable, optional
        Observer of the run's progress events (a live display).
    results : list, optional
        The run's :class:`RunSummary` (an analysis: its ``AnalysisOutcome``) is appended
        here when it finishes (Flower drops a ServerApp's return value; an in-process
        caller reads it from this list).
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        from fedhealth.flower_object_pulls import pace_object_pulls

        pace_object_pulls()  # replies' objects trail their headers by milliseconds
        if context.run_config.get("validate-model"):  # `fedhealth evaluate models:/NAME/V`
            summary = validate_model(grid, context)
        elif is_analysis(dict(context.run_config)):
            from fedhealth.coordinator.analysis_run import run_from_context

            summary = run_from_context(grid, context)
        else:
            summary = run_experiment(grid, context, on_event)
        if results is not None:
            results.append(summary)

    return server


app = make_app()
