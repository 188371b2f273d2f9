"""``fedhealth consortium``: provision a consortium (TLS, SuperNode keys, HE key ceremony).

``init`` writes the consortium CA, the SuperLink's TLS certificate, one SuperNode
authentication key per site and (unless ``--no-he``) runs the HE key ceremony;
``add-site`` adds one hospital without touching any other site's files;
``coordinator-dir`` copies only what belongs on the coordinator's machine.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedhealth.cli.errors import guarded

app = typer.Typer(
    help="Provision a consortium: certificates, SuperNode keys, HE key ceremony.",
    no_args_is_help=True,
)
console = Console()

DEFAULT_DIR = Path("workspace/consortium")


def _site_name(value: str) -> str:
    """A site name, or the ``site.name`` of a site profile given by path."""
    if value.endswith(".toml"):
        from fedhealth.config.site import load_site

        return load_site(Path(value)).name
    return value


def _print_placements(root: Path, placed: list, he_manifest: bool) -> None:
    from fedhealth.deploy.provision import manifest

    console.print(f"[green]wrote the consortium under {root.resolve()}[/]")
    console.print("Copy each file only to the machine named (keep the relative paths):")
    console.print(manifest(placed, root), highlight=False, soft_wrap=True)
    if he_manifest:
        # Which HE key file goes to which machine (also in MANIFEST.txt).
        console.print((root / "MANIFEST.txt").read_text(), highlight=False, soft_wrap=True)
    console.print(
        "The coordinator registers each site's SuperNode key when it starts "
        "(`fedhealth coordinator start`); private keys are 0600 - never copy them elsewhere."
    )


@app.command()
@guarded
def init(
    sites: list[str] = typer.Argument(..., help="Site names, or site profiles (*.toml)."),
    out: Path = typer.Option(DEFAULT_DIR, "--dir", help="Consortium directory to create."),
    host: list[str] = typer.Option(
        [], "--host", help="Extra host name / IP of the coordinator (repeatable)."
    ),
    key_holder: str = typer.Option(
        None, "--key-holder", help="Site that generates the HE secret (default: the first)."
    ),
    he: bool = typer.Option(True, "--he/--no-he", help="Also run the HE key ceremony."),
) -> None:
    """Create the consortium CA, the SuperLink certificate, SuperNode and identity keys."""
    from fedhealth.deploy.provision import init_tls

    names = [_site_name(s) for s in sites]
    if he and (out / "coordinator" / "sites.json").is_file():
        from fedhealth.privacy.he.ceremony import Registry

        registry = Registry.load(out / "coordinator" / "sites.json")
        if sorted(registry.sites) != sorted(names):
            from fedhealth.errors import ConfigError

            raise ConfigError(
                f"{out} already holds HE keys for sites {sorted(registry.sites)}, not {names}; "
                "add sites with `fedhealth consortium add-site`, or use another --dir"
            )
        console.print(f"kept the existing HE key ceremony of {out} (same sites)")
    elif he:
        from fedhealth.privacy.he.ceremony import init_consortium

        init_consortium(out, names, key_holder or names[0])
    placed = init_tls(out, names, host)
    _print_placements(out, placed, he)


@app.command("add-site")
@guarded
def add_site(
    site: str = typer.Argument(..., help="The new site's name, or its profile (*.toml)."),
    out: Path = typer.Option(DEFAULT_DIR, "--dir", help="The consortium directory."),
    key_holder: str = typer.Option(
        None, "--key-holder", help="Site holding the HE secret (default: the registry's)."
    ),
    he: bool = typer.Option(True, "--he/--no-he", help="Also re-wrap the HE secret for it."),
) -> None:
    """Add one hospital without touching the other sites' keys or certificates."""
    from fedhealth.deploy.provision import add_site_tls

    name = _site_name(site)
    he = he and (out / "coordinator" / "sites.json").is_file()
    if he:
        from fedhealth.privacy.he.ceremony import Registry
        from fedhealth.privacy.he.ceremony import add_site as he_add_site

        holder = key_holder or Registry.load(out / "coordinator" / "sites.json").key_holder
        he_add_site(out, name, holder)
    placed = add_site_tls(out, name)
    _print_placements(out, placed, he)


@app.command("coordinator-dir")
@guarded
def coordinator_dir(
    out: Path = typer.Argument(..., help="Directory to create for the coordinator's machine."),
    root: Path = typer.Option(DEFAULT_DIR, "--dir", help="The consortium directory."),
) -> None:
    """Copy the coordinator's files (coordinator/, deployment.json): no CA key, no site key.
    `fedhealth coordinator start --consortium OUT` takes this directory; it refuses the whole
    consortium directory.
    """  # one paragraph: typer keeps the line breaks of later ones, mid-sentence
    from fedhealth.deploy.provision import copy_coordinator_files

    files = copy_coordinator_files(root, out)
    console.print(f"[green]wrote {len(files)} files under {out.resolve()}[/]", highlight=False)
    for path in files:
        console.print(f"  {path.relative_to(out)}", highlight=False)
