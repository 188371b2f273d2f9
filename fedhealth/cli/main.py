"""The ``fedhealth`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from fedhealth import __version__
from fedhealth.cli import consortium_cmd, coordinator_cmd, models_cmd, site_cmd
from fedhealth.cli.errors import guarded, print_error
from fedhealth.errors import ConfigError

app = typer.Typer(
    name="fedhealth",
    help="Federated learning with differential privacy and encrypted aggregation "
    "for hospital consortia.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
app.add_typer(models_cmd.app, name="models")
app.add_typer(consortium_cmd.app, name="consortium")
app.add_typer(coordinator_cmd.app, name="coordinator")
app.add_typer(site_cmd.app, name="site")
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"fedhealth {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """fedhealth: train models across hospitals; raw data never leaves a site."""
    # Third-party warnings are filtered narrowly where they arise (registry/store.py for
    # MLflow's SQL store), not here for every library at once.


@app.command()
@guarded
def run(
    experiments: list[Path] = typer.Argument(..., help="Experiment config(s) to run, in order."),
    tracking_uri: str = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: ./workspace/mlflow)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's and Ray's logs."),
    federation: str = typer.Option(
        None,
        "--federation",
        help="Run on this real federation (a flwr SuperLink connection) instead of simulating.",
    ),
    resume: str = typer.Option(
        None,
        "--resume",
        help="Continue the interrupted MLflow run RUN_ID from its last checkpoint "
        "(on --federation NAME if it ran there, else in simulation).",
    ),
) -> None:
    """Run experiment(s) on a simulated consortium, or on a real one with --federation."""
    from fedhealth.cli.run_cmd import run_experiments

    if federation:
        from fedhealth.cli.federation_run import run_on_federation

        run_on_federation(console, experiments, federation, tracking_uri, resume)
        return
    run_experiments(console, experiments, tracking_uri, verbose, resume)


@app.command()
@guarded
def analyze(
    analysis: Path = typer.Argument(..., help="Analysis config (*.analysis.toml) to run."),
    tracking_uri: str = typer.Option(
        None,
        "--tracking-uri",
        help="MLflow tracking URI (default: the analysis's \\[tracking] uri, else "
        "./workspace/mlflow).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's and Ray's logs."),
    federation: str = typer.Option(
        None,
        "--federation",
        help="Run on this real federation (a flwr SuperLink connection) instead of simulating.",
    ),
) -> None:
    """Run a federated analysis (counts, statistics, survival) on the consortium's sites, each
    release noisy and charged to the site's privacy ledger; prints the answers and each site's
    ε, and records an MLflow run."""
    from fedhealth.cli import analyze_cmd

    if federation:
        analyze_cmd.analyze_on_federation(console, analysis, federation, tracking_uri)
        return
    analyze_cmd.analyze_simulated(console, analysis, tracking_uri, verbose)


@app.command()
@guarded
def validate(
    files: list[Path] = typer.Argument(..., help="Experiment configs or site profiles."),
) -> None:
    """Check configs and site profiles without training anything."""
    from fedhealth.cli.validate_cmd import validate_files

    validate_files(console, files)


@app.command()
@guarded
def evaluate(
    model: str = typer.Argument(..., help="The registered version: models:/NAME/VERSION."),
    sites: list[str] = typer.Option(
        None, "--sites", help="Site profile(s) to validate at (repeat, or comma-separated)."
    ),
    federation: str = typer.Option(
        None, "--federation", help="Validate at every site of this real federation instead."
    ),
    tracking_uri: str = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: ./workspace/mlflow)."
    ),
    split: str = typer.Option(
        "test", help="test: each site's pinned test split; all: every record."
    ),
    threshold: float = typer.Option(0.5, help="Threshold of accuracy, sensitivity, specificity."),
    dataset: str = typer.Option(None, help="Dataset name at the sites (default: the model's)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's and Ray's logs."),
) -> None:
    """External validation of a registered model at chosen sites; written back to the version."""
    from fedhealth.cli.evaluate_cmd import evaluate_model

    evaluate_model(
        console, model, sites or [], federation, tracking_uri, split, threshold, dataset, verbose
    )


@app.command("demo-data")
@guarded
def demo_data(
    out: Path = typer.Option(Path("workspace/demo-data"), help="Where to write the demo data."),
    seed: int = typer.Option(0, help="Seed of the split and of the phantoms."),
    keys_dir: Path = typer.Option(
        Path("workspace/consortium"),
        "--keys-dir",
        help="Where to run the quickstart consortium's key ceremony (kept if it exists).",
    ),
    heart_disease_sources: bool = typer.Option(
        False,
        "--heart-disease-sources",
        help="Also write Heart-Disease centres as EHR sources for "
        "experiments/heart-disease-mixed.toml: Hungary as FHIR R4 Bundles, Switzerland and VA "
        "as OMOP CDM databases (see docs/data-sources.md).",
    ),
    heart_data: Path = typer.Option(
        Path("../shared/data/uci-heart-disease"),
        help="The UCI Heart-Disease folder (processed.<centre>.data) to convert.",
    ),
    omop_url: str | None = typer.Option(
        None,
        help="SQLAlchemy URL to write VA's OMOP CDM into (e.g. postgresql+psycopg://"
        "postgres@127.0.0.1:5432/test); default: a SQLite file beside the others.",
    ),
    omop_schema: str = typer.Option("fedhealth_va_cdm", help="Schema for VA's OMOP CDM."),
) -> None:
    """Write the quickstart's site data: a non-IID split of a real breast-cancer table and
    DICOM phantoms for each of the three quickstart hospitals, and their consortium keys."""
    from fedhealth.data.demo import write_demo_data
    from fedhealth.privacy.he.demo import ensure_consortium

    sites = ["st-olav", "karolinska", "charite"]
    written = write_demo_data(out, sites, seed=seed)
    console.print(f"[green]wrote demo data for {len(sites)} sites under {out.resolve()}[/]")
    for site, paths in written.items():
        console.print(
            f"  {site}: {paths['tabular']}, {paths['dicom']}", highlight=False, soft_wrap=True
        )
    if heart_disease_sources:
        from fedhealth.data.heart_sources import write_heart_disease_sources

        schema = omop_schema if omop_url else None
        for centre, where in write_heart_disease_sources(out, heart_data, omop_url, schema).items():
            console.print(f"  {centre}: {where}", highlight=False, soft_wrap=True, markup=False)
    registry, created = ensure_consortium(keys_dir, sites, key_holder=sites[0])
    console.print(
        f"[green]{'created' if created else 'kept'} consortium {registry.consortium_id}[/] "
        f"(encrypted aggregation keys; key holder {registry.key_holder}) under "
        f"{keys_dir.resolve()}",
        highlight=False,
        soft_wrap=True,
    )


def main() -> None:  # pragma: no cover - console entry point
    """Entry point used by ``python -m fedhealth``."""
    try:
        app()
    except ConfigError as exc:
        print_error(exc)
        sys.exit(exc.exit_code)
