"""``fedhealth analyze ANALYSIS [--federation NAME]``: a federated analysis, end to end.

In simulation every listed site answers on this machine through the same ClientApp as a
deployment; with ``--federation`` the analysis is submitted to the federation's SuperLink
(:func:`fedhealth.deploy.submit.submit`) and its result read back from the MLflow run. Either
way the terminal shows the consortium answers, each site's ε and where the run is.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fedhealth.config.analysis import AnalysisConfig, load_analysis, load_analysis_with_sites
from fedhealth.errors import FederationError, FedHealthError


def _header(console: Console, cfg: AnalysisConfig, where: str) -> None:
    eps = cfg.privacy.epsilon
    budget = f"ε {eps:g}" if eps is not None else "ε per query"
    console.print(
        f"[bold]{escape(cfg.name)}[/]: {len(cfg.queries)} queries on dataset "
        f"{escape(cfg.analysis.dataset)} at {len(cfg.analysis.sites)} sites ({where}); "
        f"each site spends {budget}, δ {cfg.privacy.delta:g}, needs min_sites = "
        f"{cfg.analysis.min_sites}",
        highlight=False,
        soft_wrap=True,
    )


def _footer(console: Console, result: dict, uri: str, run_id: str) -> None:
    for site, why in result.get("refused", {}).items():
        console.print(
            f"[yellow]site {escape(site)} refused ({escape(why['rule'])}):[/] "
            f"{escape(why['message'])}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"MLflow store: [cyan]{escape(uri)}[/]  run {run_id} (result.json, one CSV per query, "
        "PNG plots)",
        highlight=False,
        soft_wrap=True,
    )


def analyze_simulated(
    console: Console, path: Path, tracking_uri: str | None, verbose: bool
) -> dict:
    """Run the analysis with every listed site simulated here; print and return the result.

    Raises
    ------
    ConfigError
        The file, a site profile or a key is invalid (named).
    FederationError
        Fewer than ``min_sites`` sites answered (each refusal named).
    """
    from fedhealth.analytics.report import render
    from fedhealth.engines.simulation import run_analysis_simulation
    from fedhealth.registry.store import default_tracking_uri

    cfg, _ = load_analysis_with_sites(path)
    uri = tracking_uri or cfg.tracking.uri or default_tracking_uri()
    _header(console, cfg, "simulated")
    try:
        outcome = run_analysis_simulation(path, cfg, uri, verbose=verbose)
    except FedHealthError as exc:
        raise FederationError(f"analysis {cfg.name!r} stopped: {exc}") from None
    render(outcome.result, console)
    _footer(console, outcome.result, outcome.tracking_uri, outcome.run_id)
    return outcome.result


def analyze_on_federation(
    console: Console,
    path: Path,
    federation: str,
    tracking_uri: str | None,
    timeout: float | None = None,
) -> dict | None:
    """Submit the analysis to a real federation, watch it, print the result from MLflow.

    Returns
    -------
    dict or None
        The pooled result, or None when no MLflow server is known to read it from.

    Raises
    ------
    FederationError
        The run failed (the command to read its log is named).
    """
    from fedhealth.deploy.submit import known_tracking_uri, submit, use_known_credentials, watch

    use_known_credentials(federation)
    cfg = load_analysis(path)
    _header(console, cfg, f"federation {federation}")
    watch_uri = tracking_uri or known_tracking_uri(federation)
    run_id = submit(federation, path, tracking_uri, kind="analysis")
    console.print(
        f"  submitted as Flower run {run_id}; logs: flwr log {run_id} {federation}",
        highlight=False,
    )

    def emit(kind: str, round_: int, data: dict) -> None:
        if kind == "status":
            console.print(f"  run {run_id}: {data['status']}")
        elif kind == "mlflow-run":
            console.print(f"  MLflow run {data['run_id']} at {watch_uri}", highlight=False)

    experiment = cfg.tracking.experiment or cfg.name
    state, seen = watch(federation, run_id, experiment, watch_uri, emit, timeout=timeout)
    if not state.ok:
        raise FederationError(
            f"run {run_id} of analysis {cfg.name!r} ended {state.status}:{state.sub_status}"
            f"{' - ' + state.details if state.details else ''}. See `flwr log {run_id} "
            f"{federation}` (a refusal by too many sites is named there)"
        )
    if not (watch_uri and seen.mlflow_run_id):
        console.print(
            f"[green]run {run_id} of {escape(cfg.name)} completed[/]; its MLflow run is in the "
            "coordinator's store (give --tracking-uri to show the result here)",
            highlight=False,
        )
        return None
    result = _fetch_result(watch_uri, seen.mlflow_run_id)
    from fedhealth.analytics.report import render

    render(result, console)
    _footer(console, result, watch_uri, seen.mlflow_run_id)
    return result


def _fetch_result(uri: str, run_id: str) -> dict:
    import mlflow

    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, "result.json", tmp)
        return json.loads(Path(local).read_text())
