"""``fedhealth site audit``: the site's audit log as a table."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedhealth.config.site import load_site
from fedhealth.deploy.audit import audit_path, read

#: Short names of the handler phases in the table (fedhealth.site.timing).
PHASE_LABELS = {
    "import_s": "imports",
    "load_s": "data",
    "privacy_s": "DP",
    "train_s": "training",
    "evaluate_s": "evaluation",
    "encrypt_s": "HE encrypt",
    "decrypt_s": "HE decrypt",
    "serialise_s": "reply",
    "other_s": "other",
}


def timing_summary(timing: dict | None, top: int = 3) -> str:
    """``"1.92 s: start 0.46, imports 1.35, data 0.03"``: the process start plus handler
    time, then the process start and the ``top`` largest phases (seconds)."""
    if not isinstance(timing, dict):
        return ""
    start = float(timing.get("process_start_s", 0.0))
    total = start + float(timing.get("handler_s", 0.0))
    parts = [(PHASE_LABELS[k], float(timing.get(k, 0.0))) for k in PHASE_LABELS]
    parts = sorted((p for p in parts if p[1] >= 0.005), key=lambda p: -p[1])[:top]
    if start >= 0.005:
        parts.insert(0, ("start", start))
    return f"{total:.2f} s: " + ", ".join(f"{name} {v:.2f}" for name, v in parts)


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
    table.add_column("site time (process start + handler)")
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
            str(r.get("round", "")), detail, timing_summary(r.get("timing")),
        )  # fmt: skip
    console.print(table)
