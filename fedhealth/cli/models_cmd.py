"""``fedhealth models``: read the model registry."""

from __future__ import annotations

import datetime as dt

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from fedhealth.cli.errors import guarded

app = typer.Typer(
    help="Browse registered global models and their provenance.", no_args_is_help=True
)
console = Console()
URI_HELP = "MLflow tracking URI (default: ./workspace/mlflow)."


def _uri(uri: str | None) -> str:
    from fedhealth.registry.store import default_tracking_uri

    return uri or default_tracking_uri()


@app.command("list")
@guarded
def list_(tracking_uri: str = typer.Option(None, "--tracking-uri", help=URI_HELP)) -> None:
    """List registered models with their latest version."""
    from fedhealth.registry.catalog import list_models

    rows = list_models(_uri(tracking_uri))
    table = Table(title=f"registered models in {_uri(tracking_uri)}")
    table.add_column("name", no_wrap=True)
    for col in ("versions", "latest", "accuracy"):
        table.add_column(col, justify="right")
    table.add_column("sites", overflow="fold")
    for r in rows:
        table.add_row(r["name"], str(r["versions"]), str(r["latest"]), r["accuracy"], r["sites"])
    console.print(table if rows else "no registered models yet: run `fedhealth run EXPERIMENT`")


@app.command()
@guarded
def show(
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Argument(..., help="Version number."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help=URI_HELP),
) -> None:
    """Show one model version's provenance and model card."""
    from fedhealth.registry.catalog import show_version

    v = show_version(_uri(tracking_uri), name, version)
    created = dt.datetime.fromtimestamp(v["created"] / 1000).isoformat(timespec="seconds")
    table = Table(title=f"{v['name']} version {v['version']}", show_header=False)
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("load with", f'mlflow.pyfunc.load_model("{v["uri"]}")')
    table.add_row("run", v["run_id"])
    table.add_row("created", created)
    table.add_row("source", v["source"])
    for k, val in sorted(v["tags"].items()):
        table.add_row(k, val)
    console.print(table)
    from fedhealth.registry.validation_record import list_validations

    validations = list_validations(v["tags"])
    if validations:
        vt = Table(title="external validations (AUROC, 95 % interval)")
        for col in ("#", "when", "sites", "AUROC", "MLflow run"):
            vt.add_column(col, overflow="fold")
        for e in validations:
            auroc = ", ".join(f"{s} {a}" for s, a in sorted(e["auroc"].items()))
            vt.add_row(str(e["k"]), e["at"], e["sites"], auroc, e["run_id"])
        console.print(vt)
    if v["model_card"]:
        console.print(Markdown(v["model_card"]))
