"""``fedhealth evaluate models:/NAME/VERSION``: external validation of a registered version.

In simulation the sites are the given profiles (sites that never trained the model
included); with ``--federation`` every site connected to the federation's SuperLink is
asked. Each site admits the evaluation study like any study and releases only score
histograms; the result is written back to the version (an MLflow run, tags, and an entry
in its model card) and printed here.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedhealth.errors import ConfigError, FederationError
from fedhealth.registry.model_card import _SHOWN


def _sites(values: list[str]) -> list[Path]:
    paths = [Path(v.strip()) for item in values for v in item.split(",") if v.strip()]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"site profile(s) not found: {', '.join(missing)}")
    return paths


def evaluate_model(
    console: Console,
    model_uri: str,
    sites: list[str],
    federation: str | None,
    tracking_uri: str | None,
    split: str,
    threshold: float,
    dataset: str | None,
    verbose: bool = False,
) -> None:
    """Run the evaluation-only study and print its metrics per site and pooled."""
    from fedhealth.coordinator.validation import parse_model_uri
    from fedhealth.registry.store import default_tracking_uri

    name, version = parse_model_uri(model_uri)
    if split not in ("test", "all"):
        raise ConfigError(f"--split {split!r}: use test (the pinned test split) or all")
    if not 0 <= threshold <= 1:
        raise ConfigError(f"--threshold {threshold}: a probability in [0, 1]")
    if federation:
        _on_federation(console, model_uri, federation, tracking_uri, split, threshold, dataset)
        return
    if not sites:
        raise ConfigError(
            "name the sites to validate at: --sites sites/a.toml --sites sites/b.toml"
        )
    uri = tracking_uri or default_tracking_uri()
    from fedhealth.engines.simulation import run_validation_simulation

    profiles = _sites(sites)
    console.print(
        f"validating models:/{escape(name)}/{version} at {len(profiles)} simulated site(s) "
        f"on their {'test splits' if split == 'test' else 'records'}",
        highlight=False,
    )
    result = run_validation_simulation(
        model_uri, profiles, uri, split, threshold, dataset, verbose=verbose
    )
    print_result(console, result.metrics, result.refusals)
    console.print(
        f"written back to models:/{escape(name)}/{version}: MLflow run {result.run_id}, "
        "version tags validation/*, model card (`fedhealth models show "
        f"{escape(name)} {version}`)",
        highlight=False,
        soft_wrap=True,
    )


def print_result(console: Console, metrics: dict, refusals: list | None = None) -> None:
    """One row per site and the pooled row: every metric with its 95 % interval."""
    from fedhealth.evaluation.metrics import format_interval

    table = Table(title="external validation (95 % intervals)")
    table.add_column("site")
    table.add_column("n", justify="right")
    for _, label in _SHOWN:
        table.add_column(label, justify="right")
    for site in [*sorted(s for s in metrics if s != "pooled"), "pooled"]:
        m = metrics[site]
        cells = [format_interval(m[k]) for k, _ in _SHOWN]  # "-" where undefined
        dp = " (DP)" if m.get("noise_std") else ""
        table.add_row(escape(site) + dp, str(m["n"]), *cells)
    console.print(table)
    for r in refusals or []:
        console.print(
            f"[yellow]site {escape(r.site)} refused ({escape(r.rule)}):[/] {escape(r.message)}",
            highlight=False,
            soft_wrap=True,
        )


def _on_federation(
    console: Console,
    model_uri: str,
    federation: str,
    tracking_uri: str | None,
    split: str,
    threshold: float,
    dataset: str | None,
    timeout: float = 3600.0,
) -> None:
    from fedhealth.deploy.submit import (
        known_tracking_uri,
        run_state,
        start_run,
        use_known_credentials,
    )

    use_known_credentials(federation)
    config = {
        "validate-model": model_uri,
        "validate-split": split,
        "validate-threshold": str(threshold),
        "validate-dataset": dataset or "",
    }
    if tracking_uri:
        config["tracking-uri"] = tracking_uri
    run_id = start_run(federation, config)
    console.print(f"submitted the validation of {model_uri} as Flower run {run_id}")
    start = time.monotonic()
    while not (state := run_state(federation, run_id)).done:
        if time.monotonic() - start > timeout:
            raise FederationError(f"run {run_id} did not finish in {timeout:.0f} s")
        time.sleep(2.0)
    if not state.ok:
        raise FederationError(
            f"run {run_id} ended {state.status}:{state.sub_status}; see `flwr log {run_id} "
            f"{federation}`"
        )
    uri = tracking_uri or known_tracking_uri(federation)
    console.print(
        f"[green]validated[/]; see `fedhealth models show` with --tracking-uri {uri}",
        highlight=False,
    )
