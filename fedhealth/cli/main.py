"""The ``fedhealth`` command line."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console

from fedhealth import __version__
from fedhealth.cli import models_cmd
from fedhealth.cli.errors import guarded
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
    # Library deprecation chatter (SQLAlchemy under MLflow) is not the user's business.
    warnings.filterwarnings("ignore", message=r".*noload.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@app.command()
@guarded
def run(
    experiments: list[Path] = typer.Argument(..., help="Experiment config(s) to run, in order."),
    tracking_uri: str = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: ./workspace/mlflow)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's and Ray's logs."),
) -> None:
    """Run experiment(s) on a simulated consortium: every site on this machine."""
    from fedhealth.cli.run_cmd import run_experiments

    run_experiments(console, experiments, tracking_uri, verbose)


@app.command()
@guarded
def validate(
    files: list[Path] = typer.Argument(..., help="Experiment configs or site profiles."),
) -> None:
    """Check configs and site profiles without training anything."""
    from fedhealth.cli.validate_cmd import validate_files

    validate_files(console, files)


@app.command("demo-data")
@guarded
def demo_data(
    out: Path = typer.Option(Path("workspace/demo-data"), help="Where to write the demo data."),
    seed: int = typer.Option(0, help="Seed of the split and of the phantoms."),
) -> None:
    """Write the quickstart's site data: a non-IID split of a real breast-cancer table and
    DICOM phantoms for each of the three quickstart hospitals."""
    from fedhealth.data.demo import write_demo_data

    sites = ["st-olav", "karolinska", "charite"]
    written = write_demo_data(out, sites, seed=seed)
    console.print(f"[green]wrote demo data for {len(sites)} sites under {out.resolve()}[/]")
    for site, paths in written.items():
        console.print(
            f"  {site}: {paths['tabular']}, {paths['dicom']}", highlight=False, soft_wrap=True
        )


def main() -> None:  # pragma: no cover - console entry point
    """Entry point used by ``python -m fedhealth``."""
    try:
        app()
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(exc.exit_code)
