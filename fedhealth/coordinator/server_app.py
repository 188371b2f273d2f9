"""The coordinator as a Flower ServerApp: ``fedhealth.coordinator.server_app:app``.

The run config carries ``experiment`` (path of the experiment TOML on the
coordinator's machine) and ``tracking-uri``; the same app runs in simulation
and on a SuperLink.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhealth.config.experiment import load_experiment
from fedhealth.coordinator.federation import Federation
from fedhealth.coordinator.guard import GuardedGrid
from fedhealth.coordinator.runconfig import experiment_path, resume_run, tracking_uri
from fedhealth.registry.retry import configure_mlflow_http
from fedhealth.registry.store import default_tracking_uri

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment named in the run config."""
    configure_mlflow_http()  # before any MLflow call of this coordinator process
    rc = dict(context.run_config)
    cfg = load_experiment(experiment_path(rc))
    uri = tracking_uri(rc, cfg.tracking.uri, default_tracking_uri())
    federation = Federation(cfg, uri)
    federation.run_tags = {"fedhealth.flwr_run_id": str(context.run_id)}
    federation.resume_from = resume_run(rc)
    # Never wait forever for sites: Flower's sampler would (see fedhealth.coordinator.guard).
    exp = cfg.experiment
    federation.run(GuardedGrid(grid, exp.min_sites, len(exp.sites), exp.round_timeout))
