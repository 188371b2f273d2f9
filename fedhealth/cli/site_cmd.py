"""``fedhealth site``: what a hospital's site operator runs on the site's own machine.

``ledger`` prints the site's privacy spend per dataset and per experiment against
the caps of its policy, from the site's privacy ledger (verified on open).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedhealth.cli.errors import guarded

app = typer.Typer(
    help="Run and inspect a hospital site: start its SuperNode, approve studies, read its "
    "privacy ledger and its audit log.",
    no_args_is_help=True,
)
console = Console()


@app.command()
@guarded
def ledger(
    profile: Path = typer.Argument(..., help="The site profile (sites/NAME.toml)."),
    entries: bool = typer.Option(False, "--entries", help="Also list every charge, oldest first."),
) -> None:
    """Print privacy spend per dataset and per experiment against the site's caps."""
    from fedhealth.cli.ledger_view import print_ledger

    print_ledger(console, profile, entries)


@app.command()
@guarded
def start(
    profile: Path = typer.Argument(..., help="The site profile (sites/NAME.toml)."),
    superlink: str = typer.Option(
        None,
        "--superlink",
        help="Coordinator's SuperLink host:port (default: the profile's \\[deploy] table).",
    ),
    root_certificate: Path = typer.Option(
        None,
        "--root-certificate",
        help="Consortium CA certificate (default: the profile's \\[deploy] table).",
    ),
    auth_key: Path = typer.Option(
        None,
        "--auth-key",
        help="SuperNode authentication private key (default: the profile's \\[deploy] table).",
    ),
    port: int = typer.Option(None, "--port", help="This SuperNode's local API port."),
) -> None:
    """Start this hospital's SuperNode; runs until Ctrl-C or SIGTERM."""
    from fedhealth.config.site import load_site
    from fedhealth.deploy.site import NodeSettings, log_path, run_site

    site = load_site(profile)
    s = NodeSettings.from_profile(
        site, superlink=superlink, root_certificate=root_certificate, auth_key=auth_key, port=port
    )
    s.check(profile)
    tls = "TLS" if s.root_certificate else "[red]no TLS[/]"
    console.print(
        f"[green]site {site.name}[/]: SuperNode connecting to {s.superlink} ({tls}"
        f"{', authenticated' if s.auth_key else ''}); local API port {s.port}"
    )
    console.print(f"  log: {log_path(site)}", highlight=False)
    console.print(
        f"  audit log: {site.workspace / 'audit.log'}  (fedhealth site audit)", highlight=False
    )
    console.print("Ctrl-C stops the site.")
    run_site(profile, site, s, say=lambda m: console.print(m, highlight=False))
    console.print(f"site {site.name} stopped")


@app.command()
@guarded
def audit(
    profile: Path = typer.Argument(..., help="The site profile (sites/NAME.toml)."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON lines."),
    tracking_uri: str = typer.Option(
        None,
        "--tracking-uri",
        help="The consortium's MLflow server: also name the model version each round "
        "contributed to.",
    ),
) -> None:
    """Print the site's audit log: requests received, refused, and what left the site,
    linked to the privacy ledger's charge and the model version it contributed to."""
    from fedhealth.cli.audit_view import print_audit

    print_audit(console, profile, as_json, tracking_uri)


@app.command()
@guarded
def requests(
    profile: Path = typer.Argument(..., help="The site profile (sites/NAME.toml)."),
    show_all: bool = typer.Option(False, "--all", help="Also list approved and declined studies."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored records as JSON."),
) -> None:
    """List the study requests waiting for this site's decision, with what each asks for."""
    from fedhealth.cli.studies_view import print_requests

    print_requests(console, profile, show_all, as_json)


def _decide(profile: Path, study: str, verdict: str, by: str | None) -> None:
    from rich.markup import escape

    from fedhealth.config.site import load_site
    from fedhealth.site.approvals import decide

    site = load_site(profile)
    d = decide(site, study, verdict, by)  # type: ignore[arg-type]
    colour = "green" if verdict == "approved" else "red"
    console.print(
        f"site {escape(site.name)}: study {d.study} [{colour}]{verdict}[/] by {escape(d.by)} "
        f"at {d.at}; signed with the site's key and written to the audit log",
        highlight=False,
    )


@app.command()
@guarded
def approve(
    profile: Path = typer.Argument(..., help="The site profile (sites/NAME.toml)."),
    study: str = typer.Argument(..., help="Study hash (or a unique prefix of 8+ digits)."),
    by: str = typer.Option(None, "--by", help="Who approves (default: your user name)."),
) -> None:
    """Approve a study: its requests run under the site's policy from now on."""
    _decide(profile, study, "approved", by)


@app.command()
@guarded
def deny(
    profile: Path = typer.Argument(..., help="The site profile (sites/NAME.toml)."),
    study: str = typer.Argument(..., help="Study hash (or a unique prefix of 8+ digits)."),
    by: str = typer.Option(None, "--by", help="Who declines (default: your user name)."),
) -> None:
    """Decline a study: the coordinator is told `study-declined`, never why."""
    _decide(profile, study, "declined", by)


@app.command("console")
@guarded
def console_cmd(
    profile: Path = typer.Argument(..., help="The site profile (sites/NAME.toml)."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (keep 127.0.0.1: there is no TLS)."
    ),
    port: int = typer.Option(8765, "--port", help="Port to listen on (0: any free port)."),
    read_only_token: bool = typer.Option(
        False, "--read-only-token", help="Also print a token for viewers who cannot decide."
    ),
    set_password: bool = typer.Option(
        False,
        "--set-password",
        help="Set the operator password (asked twice; stored hashed, mode 0600), then exit.",
    ),
) -> None:
    """Serve the site console: a local web page with the site's policy, datasets, study
    requests (approve or deny), privacy spend and audit log."""
    from rich.markup import escape
    from werkzeug.serving import make_server

    from fedhealth.config.site import load_site
    from fedhealth.site.console.app import create_app
    from fedhealth.site.console.auth import Secrets
    from fedhealth.site.console.auth import set_password as store_password

    site = load_site(profile)
    if set_password:
        password = typer.prompt("Console password", hide_input=True, confirmation_prompt=True)
        path = store_password(site, password)
        console.print(f"password stored hashed in {escape(str(path))} (mode 0600)", highlight=False)
        return
    keys = Secrets.generate(site, read_only=read_only_token)
    server = make_server(host, port, create_app(profile, keys), threaded=True)
    url = f"http://{host}:{server.server_port}/"
    console.print(f"[green]site {escape(site.name)}[/]: console at {url}", highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            "[red]warning:[/] listening beyond this machine without TLS: the token crosses the "
            "network in clear; prefer an SSH tunnel to 127.0.0.1",
            highlight=False,
        )
    console.print(f"  operator login token: {keys.token}", highlight=False)
    if keys.read_only_token:
        console.print(f"  read-only login token: {keys.read_only_token}", highlight=False)
    if keys.password_hash:
        console.print("  or log in with the operator password", highlight=False)
    console.print("Ctrl-C stops the console; the tokens end with it.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    console.print(f"site {escape(site.name)}: console stopped")
