"""The embedded engine: every site of a consortium on one machine, on Flower's simulation.

The ClientApp is loaded by its ``module:attribute`` string exactly as ``flwr run`` loads
it; the ServerApp is the same app built by ``fedhealth.coordinator.server_app.make_app``
with this process's progress observer, so that the run's summary comes back as
:func:`run_simulation`'s return value. Flower's and Ray's log noise is kept out of the way
unless ``verbose``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhealth import settings
from fedhealth.config.experiment import ExperimentConfig
from fedhealth.errors import FederationError

if TYPE_CHECKING:
    from fedhealth.config.analysis import AnalysisConfig
    from fedhealth.coordinator.analysis_run import AnalysisOutcome
    from fedhealth.coordinator.federation import RunSummary
    from fedhealth.coordinator.progress import Observer
    from fedhealth.evaluation.result import ValidationResult

SERVER_APP = "fedhealth.coordinator.server_app:app"
CLIENT_APP = "fedhealth.site.client_app:app"
SIM_ROSTER_ENV = settings.SIM_SITE_PROFILES.name


def _quiet(verbose: bool) -> None:
    if not verbose:
        warnings.filterwarnings("ignore", module=r"mlflow(\..*)?")
        warnings.filterwarnings("ignore", message=r".*noload.*")
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    for name in ("mlflow", "alembic", "ray", "filelock", "urllib3"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def run_simulation(
    experiment_path: Path,
    cfg: ExperimentConfig,
    tracking_uri: str,
    verbose: bool = False,
    cpus_per_site: float = 1.0,
    resume_run_id: str | None = None,
    on_event: Observer | None = None,
) -> RunSummary:
    """Run ``cfg`` with one simulated SuperNode per site; returns the run's summary.

    Parameters
    ----------
    experiment_path : Path
        The experiment file (passed to the ServerApp in its run config).
    cfg : ExperimentConfig
        The validated experiment.
    tracking_uri : str
        MLflow store for the run.
    verbose : bool
        Show Flower's and Ray's own logs.
    cpus_per_site : float
        CPU share of each simulated site; with 2 cores, two sites train at once.
    resume_run_id : str, optional
        MLflow run to continue from its last checkpoint (``fedhealth run --resume``).
    on_event : callable, optional
        Observer of progress events (the CLI's live table).

    Returns
    -------
    RunSummary

    Raises
    ------
    FedHealthError
        The run stopped (the coordinator's error, e.g. fewer than ``min_sites`` replies).
    """
    _quiet(verbose)
    from fedhealth.coordinator.server_app import make_app

    results: list[RunSummary] = []
    run_config = {
        "experiment": str(Path(experiment_path).resolve()),
        "tracking-uri": tracking_uri,
        "site-profiles": json.dumps([str(p) for p in cfg.experiment.sites]),
        "resume-run-id": resume_run_id or "",
    }
    _simulate(make_app(on_event, results), run_config, len(cfg.experiment.sites), verbose,
              cpus_per_site)  # fmt: skip
    if not results:
        raise FederationError(f"experiment {cfg.name!r} ended without a result; rerun with -v")
    return results[0]


def run_analysis_simulation(
    analysis_path: Path,
    cfg: AnalysisConfig,
    tracking_uri: str,
    verbose: bool = False,
    cpus_per_site: float = 1.0,
) -> AnalysisOutcome:
    """Run an analysis with one simulated SuperNode per site; returns its outcome.

    The same ServerApp and ClientApp as a deployment: the spec travels as a
    ``query.analysis`` message and each simulated site answers from its own profile.

    Parameters
    ----------
    analysis_path : Path
        The analysis file (passed to the ServerApp in its run config).
    cfg : AnalysisConfig
        The validated analysis.
    tracking_uri : str
        MLflow store for the run.
    verbose : bool
        Show Flower's and Ray's own logs.
    cpus_per_site : float
        CPU share of each simulated site.

    Returns
    -------
    AnalysisOutcome

    Raises
    ------
    FedHealthError
        The analysis stopped (e.g. fewer than ``min_sites`` sites answered).
    """
    _quiet(verbose)
    from fedhealth.coordinator.server_app import make_app

    results: list[AnalysisOutcome] = []
    run_config = {
        "analysis": str(Path(analysis_path).resolve()),
        "tracking-uri": tracking_uri,
        "site-profiles": json.dumps([str(p) for p in cfg.analysis.sites]),
    }
    _simulate(make_app(None, results), run_config, len(cfg.analysis.sites), verbose,
              cpus_per_site)  # fmt: skip
    if not results:
        raise FederationError(f"analysis {cfg.name!r} ended without a result; rerun with -v")
    return results[0]


def run_validation_simulation(
    model_uri: str,
    sites: list[Path],
    tracking_uri: str,
    split: str = "test",
    threshold: float = 0.5,
    dataset: str | None = None,
    verbose: bool = False,
) -> ValidationResult:
    """An evaluation-only study of ``model_uri`` at ``sites``, one simulated SuperNode each.

    Returns
    -------
    ValidationResult
        The metrics per site and pooled, as written back to the version.
    """
    _quiet(verbose)
    from fedhealth.coordinator.server_app import make_app

    results: list[ValidationResult] = []
    run_config = {
        "validate-model": model_uri,
        "validate-split": split,
        "validate-threshold": str(threshold),
        "validate-dataset": dataset or "",
        "tracking-uri": tracking_uri,
        "site-profiles": json.dumps([str(Path(p).resolve()) for p in sites]),
    }
    _simulate(make_app(None, results), run_config, len(sites), verbose, 1.0)
    if not results:
        raise FederationError(f"the validation of {model_uri} ended without a result; rerun -v")
    return results[0]


def _simulate(
    server_app: Any,
    run_config: dict[str, Any],
    num_sites: int,
    verbose: bool,
    cpus_per_site: float,
) -> None:
    """Run ``server_app`` against fedhealth's ClientApp on ``num_sites`` simulated nodes
    (:func:`_quiet` has run before Flower was imported)."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.object_ref import load_app
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    client_app = load_app(CLIENT_APP, AttributeError)
    # Flower's public run_simulation() has no run config; build the Run it would build,
    # with ours, so that every simulated site reads it from its Context like `flwr run`.
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = run_config
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server_context = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
        "init_args": {
            "logging_level": "info" if verbose else "error",
            "log_to_driver": verbose,
            "include_dashboard": False,
            "configure_logging": True,
        },
    }
    # Flower fuses run-config overrides only with a FAB's declared keys, so the roster
    # reaches the simulated sites through the environment, which Ray's workers inherit.
    os.environ[SIM_ROSTER_ENV] = run_config["site-profiles"]
    _run_simulation(
        num_supernodes=num_sites,
        exit_event=_exit_event(),
        client_app=client_app,
        server_app=server_app,
        backend_config=backend,
        server_app_context=server_context,
        run=run,
        verbose_logging=verbose,
    )


def _exit_event():
    from flwr.supercore.telemetry import EventType

    return EventType.PYTHON_API_RUN_SIMULATION_LEAVE
