"""The coordinator as a Flower ServerApp: ``fedhealth.coordinator.server_app:app``.

The run config carries ``experiment`` (path of the experiment TOML on the
coordinator's machine) and ``tracking-uri``; the same app runs in simulation
and on a SuperLink.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhealth.config.experiment import load_experiment
from fedhealth.coordinator.federation import Federation
from fedhealth.registry.store import default_tracking_uri

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment named in the run config."""
    cfg = load_experiment(Path(str(context.run_config["experiment"])))
    uri = str(context.run_config.get("tracking-uri") or cfg.tracking.uri or default_tracking_uri())
    Federation(cfg, uri).run(grid)
