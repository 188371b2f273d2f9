"""``fedhealth site audit``: the site's audit log as a table."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedhealth.config.site import load_site
from fedhealth.deploy.audit import audit_path, read


def print_audit(console: Console, profile_path: Path, as_json: bool = False) -> None:
    """Print every audit record of the site, oldest first."""
    profile = load_site(profile_path)
    path = audit_path(profile.workspace)
    records = list(read(path))
    if as_json:
        for r in records:
            console.print(json.dumps(r, sort_keys=True), highlight=False, soft_wrap=True)
        return
    if not records:
        console.print(f"site {profile.name}: the audit log {path} is empty (no request yet)")
        return
    table = Table(title=f"site {profile.name}: audit log {path}")
    for col in ("time", "event", "request", "experiment", "round", "what left / why refused"):
        table.add_column(col)
    for r in records:
        when = dt.datetime.fromtimestamp(r.get("ts", 0)).strftime("%Y-%m-%d %H:%M:%S")
        event = r.get("event", "?")
        if event == "sent":
            eps = r.get("epsilon")
            detail = (
                f"{r.get('bytes', 0)} B sha256 {str(r.get('sha256', ''))[:16]}… "
                f"({', '.join(r.get('records', []))})"
                + (f" ε={eps:.4g}" if isinstance(eps, (int, float)) else "")
            )
        elif event == "refused":
            detail = f"[yellow]{r.get('rule')}[/]: {r.get('message', '')}"
        else:
            detail = ""
        table.add_row(
            when, event, str(r.get("message_type", "")), str(r.get("experiment") or ""),
            str(r.get("round", "")), detail,
        )  # fmt: skip
    console.print(table)
