"""``fedhealth run``: validate, pre-flight every site's data, simulate, summarise."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedhealth.cli.live import LiveRun
from fedhealth.config.experiment import ExperimentConfig, load_experiment_with_sites
from fedhealth.config.site import SiteProfile
from fedhealth.coordinator.federation import RunSummary
from fedhealth.coordinator.progress import subscribe
from fedhealth.coordinator.strategies import build_strategy
from fedhealth.errors import FederationError
from fedhealth.registry.store import default_tracking_uri


def preflight(cfg: ExperimentConfig, sites: list[SiteProfile]) -> dict[str, int]:
    """Read every site's data once before any training, so bad data fails fast.

    In simulation all sites live on this machine; in a real deployment each
    site checks its own data when its node starts.
    """
    from fedhealth.site.dataset import load_site_data

    build_strategy(cfg)  # a broken custom strategy fails here, not mid-run
    task = cfg.task_spec()["task"]
    return {s.name: load_site_data(s, task).n_train for s in sites}


def run_experiments(
    console: Console, paths: list[Path], tracking_uri: str | None, verbose: bool
) -> list[RunSummary]:
    """Run each experiment in turn on the simulation engine."""
    loaded = [(p, *load_experiment_with_sites(p)) for p in paths]  # all configs first
    summaries = []
    for path, cfg, sites in loaded:
        uri = tracking_uri or cfg.tracking.uri or default_tracking_uri()
        sizes = preflight(cfg, sites)
        console.print(
            f"[bold]{cfg.name}[/]: {len(sites)} sites "
            f"({', '.join(f'{k} {v}' for k, v in sizes.items())} training records), "
            f"{cfg.experiment.rounds} rounds, strategy {cfg.strategy.name.rsplit('/', 1)[-1]}, "
            f"model {cfg.model.name}"
        )
        summaries.append(_simulate(console, path, cfg, uri, verbose))
    return summaries


def _simulate(
    console: Console, path: Path, cfg: ExperimentConfig, uri: str, verbose: bool
) -> RunSummary:
    from fedhealth.engines.simulation import run_simulation

    result: dict[str, RunSummary] = {}

    def grab(event) -> None:
        if event.kind == "run-finished":
            result["summary"] = event.data["summary"]

    unsub_grab = subscribe(grab)
    try:
        if verbose:
            run_simulation(path, cfg, uri, verbose=True)
        else:
            with LiveRun(console, cfg.name, cfg.experiment.rounds) as live:
                unsub = subscribe(live)
                try:
                    run_simulation(path, cfg, uri, verbose=False)
                finally:
                    unsub()
    finally:
        unsub_grab()
    if "summary" not in result:
        raise FederationError(f"experiment {cfg.name!r} ended without a result; rerun with -v")
    summary = result["summary"]
    print_summary(console, summary)
    return summary


def print_summary(console: Console, s: RunSummary) -> None:
    """The closing table: global and per-site metrics, and the registered version."""
    table = Table(title=f"{s.experiment}: final round ({s.rounds}) on each site's test split")
    for col in ("site", "test examples", "accuracy", "loss"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site, m in sorted(s.site_metrics.items()):
        table.add_row(site, str(int(m["num-examples"])), f"{m['accuracy']:.4f}", f"{m['loss']:.4f}")
    g = s.global_metrics
    if g:
        table.add_row(
            "[bold]all (weighted)",
            str(int(g["num-examples"])),
            f"[bold]{g['accuracy']:.4f}",
            f"{g['loss']:.4f}",
        )
        table.add_row(
            "[bold]mean over sites",
            "",
            f"{g['accuracy_site_mean']:.4f}",
            f"{g['loss_site_mean']:.4f}",
        )
    console.print(table)
    for r in s.refusals:
        console.print(f"[yellow]site {r.site} refused ({r.rule}):[/] {r.message}")
    console.print(f"MLflow store: [cyan]{s.tracking_uri}[/]  run {s.run_id}  ({s.seconds:.0f} s)")
    if s.version:
        console.print(
            f"Registered model: [bold green]{s.registered_model}[/] version "
            f"[bold green]{s.version}[/]  ->  "
            f'mlflow.pytorch.load_model("models:/{s.registered_model}/{s.version}")'
        )
