"""``fedhealth site audit``: the site's audit log as a table."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedhealth.config.site import load_site
from fedhealth.site.audit import audit_path, read

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


def ledger_links(ledger_path: Path, records: list[dict]) -> dict[int, str]:
    """For each ``sent`` record that reported an ε: ``"#<id>"`` of the privacy-ledger charge
    it spent (same dataset, experiment and round; the newest charge committed before the
    update left). Keyed by the record's index in ``records``."""
    from fedhealth.privacy.dp.ledger import PrivacyLedger

    if not ledger_path.is_file():
        return {}
    with PrivacyLedger(ledger_path) as ledger:
        entries = ledger.entries()
    stamps = [dt.datetime.fromisoformat(e.timestamp).timestamp() for e in entries]
    out: dict[int, str] = {}
    for i, r in enumerate(records):
        if r.get("event") != "sent" or r.get("epsilon") is None:
            continue
        match = [
            e.id
            for e, t in zip(entries, stamps, strict=True)
            if e.experiment == r.get("experiment")
            and e.round == r.get("round")
            and (r.get("dataset") in (None, e.dataset))
            and t <= float(r.get("ts", 0)) + 1.0
        ]
        if match:
            out[i] = f"#{match[-1]}"
    return out


def model_versions(tracking_uri: str, runs: set[str]) -> dict[str, str]:
    """``run id -> "<registered model> v<version>"`` for the runs that registered one."""
    from fedhealth.registry.store import use_store

    client = use_store(tracking_uri)  # (quiet about MLflow's SQLAlchemy warning)
    out: dict[str, str] = {}
    for run in sorted(runs):
        found = client.search_model_versions(f"run_id = '{run}'")
        if found:
            out[run] = ", ".join(f"{v.name} v{v.version}" for v in found)
    return out


def print_audit(
    console: Console,
    profile_path: Path,
    as_json: bool = False,
    tracking_uri: str | None = None,
) -> None:
    """Print every audit record of the site, oldest first, each round linked to its
    privacy-ledger charge and (with ``tracking_uri``) the model version it contributed to."""
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
    charges = ledger_links(profile.ledger_path, records)
    runs = {str(r["mlflow_run"]) for r in records if r.get("mlflow_run")}
    versions = model_versions(tracking_uri, runs) if tracking_uri and runs else {}
    table = audit_table(records, charges, versions)
    console.print(f"site {profile.name}: audit log {path}", highlight=False, soft_wrap=True)
    console.print(table)
    if runs and not tracking_uri:
        console.print(
            "model versions: add --tracking-uri URI (the consortium's MLflow server) to name "
            "the version each run registered",
            highlight=False,
        )


def audit_table(records: list[dict], charges: dict[int, str], versions: dict[str, str]) -> Table:
    """The audit records as a table that stays readable at 100 columns: the short columns
    never wrap, and what left (or why refused), the ledger charge, the model version and
    where the site's time went share one wide column, one line each."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("time", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("experiment", overflow="fold", max_width=16)
    table.add_column("round", justify="right", no_wrap=True)
    table.add_column(
        "what left / why refused; ledger charge, model; where time went",
        min_width=30,
        overflow="fold",
    )
    table.add_column("site s", justify="right", no_wrap=True)
    for i, r in enumerate(records):
        when = dt.datetime.fromtimestamp(r.get("ts", 0)).strftime("%m-%d %H:%M:%S")
        event = r.get("event", "?")
        lines = [_detail(r)]
        link = _link(r, charges.get(i), versions)
        if link:
            lines.append(f"→ {escape(link)}")
        timing = r.get("timing")
        if isinstance(timing, dict):
            lines.append(f"[dim]{escape(timing_summary(timing).partition(': ')[2])}[/]")
        total = timing_summary(timing).partition(" s:")[0]
        table.add_row(
            when, escape(f"{event}\n{r.get('message_type', '')}".strip()),
            escape(str(r.get("experiment") or "")), str(r.get("round", "")),
            "\n".join(line for line in lines if line), total,
        )  # fmt: skip
    return table


def _detail(r: dict) -> str:
    """What left the site, why it refused, or which files it skipped (Rich markup)."""
    event = r.get("event")
    if event == "sent":
        eps = r.get("epsilon")
        return escape(
            f"{r.get('bytes', 0)} B sha256 {str(r.get('sha256', ''))[:16]}… "
            f"({', '.join(r.get('records', []))})"
            + (f" ε={eps:.4g}" if isinstance(eps, (int, float)) else "")
        )
    if event == "refused":
        return f"[yellow]{escape(str(r.get('rule')))}[/]: {escape(str(r.get('message', '')))}"
    if event == "skipped-files":
        names = ", ".join(str(f.get("file")) for f in r.get("files", []))
        return escape(f"dataset {r.get('dataset')}: {r.get('count', 0)} file(s) skipped: {names}")
    if str(event).startswith("ledger-"):  # the privacy ledger's head, anchored here
        head = str(r.get("head"))[:16]
        return escape(f"{r.get('ledger')} counter {r.get('counter')} head {head}…")
    return ""


def _link(record: dict, charge: str | None, versions: dict[str, str]) -> str:
    if record.get("event") != "sent":
        return ""
    run = record.get("mlflow_run")
    parts = [f"ledger {charge}"] if charge else []
    if run:
        parts.append(versions.get(str(run), f"run {str(run)[:8]}"))
    return " · ".join(parts)
