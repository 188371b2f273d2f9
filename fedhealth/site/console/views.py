"""What each console page shows, read from the site's own files (no Flask here).

Every function takes a :class:`SiteProfile` and returns plain data for a template. None of
them returns a record of a dataset: datasets appear as names, kinds and counts.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

from fedhealth.config.site import SiteProfile
from fedhealth.errors import FedHealthError
from fedhealth.site.approvals import list_studies
from fedhealth.site.audit import audit_path, read


def _eps(x: float | None) -> str:
    if x is None:
        return "none"
    return "unbounded" if math.isinf(x) else f"{x:.4g}"


def number(x: Any) -> str:
    """A float to 4 significant digits (``unbounded`` for infinity); anything else as text."""
    if isinstance(x, float):
        return _eps(x)
    return "none" if x is None else str(x)


def when(ts: Any) -> str:
    """A UNIX time or ISO timestamp as ``YYYY-MM-DD HH:MM:SS UTC``."""
    try:
        if isinstance(ts, str):
            t = dt.datetime.fromisoformat(ts)
        else:
            t = dt.datetime.fromtimestamp(float(ts), dt.UTC)
        return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OSError):
        return "?"


# -- overview ----------------------------------------------------------------------------------


def policy_sentences(profile: SiteProfile) -> list[str]:
    """The site's privacy policy, one plain sentence per rule."""
    p = profile.privacy
    out = [
        "Every study waits for a person's decision here (approval = manual)."
        if p.approval == "manual"
        else "A study the rules below allow runs without a person's decision (approval = rules).",
        "Differential privacy is required for every training round."
        if p.require_dp
        else "Rounds without differential privacy are accepted.",
        "Encrypted aggregation is required."
        if p.require_he
        else "Encrypted aggregation is optional.",
    ]
    if p.min_noise_multiplier:
        out.append(f"DP-SGD needs a noise multiplier of at least {p.min_noise_multiplier:g}.")
    out.append(
        f"One experiment may spend at most ε = {_eps(p.max_epsilon_per_experiment)} on a dataset; "
        f"all experiments together at most ε = {_eps(p.lifetime_epsilon_budget)} per dataset, ever."
    )
    out.append(f"Largest δ accepted: {p.max_delta:g}." if p.max_delta else "No cap on δ.")
    out.append(
        "Experiments accepted: " + ", ".join(p.allowed_experiments) + "."
        if p.allowed_experiments is not None
        else "Any experiment name is accepted."
    )
    if p.allowed_models is not None:
        out.append("Models accepted: " + ", ".join(p.allowed_models) + ".")
    if p.exempt_datasets:
        out.append(
            "Datasets without personal data (no DP rules or ε caps): "
            + ", ".join(p.exempt_datasets)
            + "."
        )
    release = p.release_metrics or "dp"
    out.append(
        {
            "dp": "Losses and accuracies leave only with Gaussian noise charged to the ledger.",
            "withheld": "Losses and accuracies never leave the site.",
            "exact": "Losses and accuracies leave exactly (for public or synthetic data).",
        }[release]
    )
    out.append(
        "Noisy, clamped feature sums are shared once per study for consortium normalisation."
        if p.share_statistics
        else "Feature statistics are never shared."
    )
    out.append(f"No metric or release is computed on fewer than {p.min_split_records} records.")
    if p.approved_studies:
        out.append(f"{len(p.approved_studies)} study hash(es) are approved in advance.")
    return out


@functools.lru_cache(maxsize=64)
def _count(kind: str, path: str, mtime: float, options: str) -> str:
    """Records of one dataset, read by the project's own readers (cached per file
    modification time, so a page load does not re-read an unchanged table)."""
    from fedhealth.data.tabular import read_raw_table

    opts = json.loads(options)
    if kind == "tabular":
        return f"{len(read_raw_table(Path(path), opts.get('columns'))):,} records"
    if kind in ("dicom", "images"):
        return f"{len(read_raw_table(Path(opts['labels']))):,} labelled images"
    if kind == "npz":
        import numpy as np

        with np.load(path) as z:
            split = opts.get("split", "all")
            keys = (
                [k for k in z.files if k.endswith("_labels")]
                if split == "all"
                else [f"{split}_labels"]
            )
            return f"{sum(len(z[k]) for k in keys):,} images"
    return ""


def datasets(profile: SiteProfile) -> list[dict[str, object]]:
    """Each offered dataset: name, kind, path and how many records (never a record)."""
    out = []
    for name, source in sorted(profile.datasets.items()):
        kind = source.kind
        path = Path(source.path)
        try:
            mtime = path.stat().st_mtime if path.exists() else -1.0
            if kind in ("fhir", "omop"):
                from fedhealth.data.ehr import check_ehr

                count = check_ehr(source)  # type: ignore[arg-type]
            else:
                extra = source.model_dump(mode="json")
                if hasattr(source, "labels_path"):
                    extra["labels"] = str(source.labels_path())
                count = _count(kind, str(path), mtime, json.dumps(extra, sort_keys=True))
            count = count or "not counted for this kind"
        except (FedHealthError, OSError, ValueError, KeyError) as exc:
            count = f"unreadable: {exc}"
        out.append({"name": name, "kind": kind, "path": str(path), "records": count,
                    "exempt": name in profile.privacy.exempt_datasets})  # fmt: skip
    return out


def connection(profile: SiteProfile, profile_path: Path | None) -> dict[str, str]:
    """Whether this site's SuperNode runs on this machine.

    ``fedhealth site start`` runs Flower's SuperNode (``python -m
    fedhealth.deploy.flower_pacing``; by hand, ``flower-supernode``) with ``--node-config
    profile="<this profile>"``: the processes are looked up by that argument in ``/proc``.
    Without ``/proc`` (not Linux) the state is ``unknown``.
    """
    proc = Path("/proc")
    if not proc.is_dir() or profile_path is None:
        return {"state": "unknown", "detail": "this machine has no /proc to look the process up"}
    marker = f'profile="{Path(profile_path).resolve()}"'.encode()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in argv and any(
            a.endswith(b"flower-supernode") or a == b"fedhealth.deploy.flower_pacing"
            for a in argv[:3]
        ):
            found.append(entry.name)
    # fedhealth.deploy.site.log_path (not imported: deploy imports the site package)
    log = profile.workspace / "logs" / "supernode.log"
    seen = f"; its log {log} was last written {when(log.stat().st_mtime)}" if log.exists() else ""
    if found:
        return {"state": "running", "detail": f"SuperNode process {', '.join(found)}{seen}"}
    return {"state": "not running", "detail": f"no SuperNode of this profile on this machine{seen}"}


# -- studies -----------------------------------------------------------------------------------


def studies(profile: SiteProfile) -> tuple[list[dict], list[dict]]:
    """(pending, decided) studies, newest first; each with ``first_seen_text``."""
    pending: list[dict] = []
    decided: list[dict] = []
    for s in list_studies(profile):
        s["first_seen_text"] = when(s.get("first_seen"))
        (pending if s["status"] in ("pending", "unknown") else decided).append(s)
    return pending, decided


# -- privacy -----------------------------------------------------------------------------------


def privacy(profile: SiteProfile) -> dict[str, Any]:
    """The ledger's entries, per-dataset cumulative spend and its integrity check.

    Returns
    -------
    dict
        ``entries`` (oldest first), ``series`` (dataset -> list of (entry, cumulative ε)),
        ``ok`` (bool or None when there is no ledger), ``checks`` (lines), ``error``.
    """
    from fedhealth.privacy.dp.ledger import LedgerError, PrivacyLedger

    path = profile.ledger_path
    out: dict[str, Any] = {"path": str(path), "entries": [], "series": {}, "ok": None,
                           "checks": [], "error": ""}  # fmt: skip
    if not path.exists():
        from fedhealth.privacy.dp.ledger_anchor import LedgerFiles, site_history

        if site_history(LedgerFiles.beside(path)) is None:
            return out
    try:
        with PrivacyLedger(path) as ledger:
            entries = ledger.entries()
            out["checks"] = list(ledger.integrity.lines())
            out["head"] = ledger.head_hash
    except (LedgerError, FedHealthError, OSError) as exc:
        out.update(ok=False, error=str(exc))
        return out
    out.update(ok=True, entries=entries)
    totals: dict[str, float] = {}
    for e in entries:
        totals[e.dataset] = totals.get(e.dataset, 0.0) + e.epsilon_increment
        out["series"].setdefault(e.dataset, []).append((e, totals[e.dataset]))
    return out


# -- audit -------------------------------------------------------------------------------------


def _ledger_link(entries: list, record: dict) -> int | None:
    """The ledger charge a ``sent`` record spent: same experiment and round (and dataset when
    named), the newest committed before the update left."""
    if record.get("event") != "sent" or record.get("epsilon") is None:
        return None
    match = [
        e.id
        for e in entries
        if e.experiment == record.get("experiment")
        and e.round == record.get("round")
        and record.get("dataset") in (None, e.dataset)
        and dt.datetime.fromisoformat(e.timestamp).timestamp() <= float(record.get("ts", 0)) + 1
    ]
    return match[-1] if match else None


def audit(profile: SiteProfile, entries: list) -> dict[str, Any]:
    """The audit log newest first, each ``sent`` record linked to its ledger charge; and the
    refusals with their rule and reason."""
    path = audit_path(profile.workspace)
    records = list(read(path)) if path.exists() else []
    timeline = []
    for r in reversed(records):
        event = str(r.get("event", "?"))
        item = {
            "when": when(r.get("ts")),
            "event": event,
            "experiment": r.get("experiment") or "",
            "round": r.get("round", ""),
            "study": r.get("study") or "",
            "charge": _ledger_link(entries, r),
            "run": str(r.get("mlflow_run") or ""),
            "detail": _detail(r),
        }
        timeline.append(item)
    refusals = [t for t in timeline if t["event"] == "refused"]
    return {"path": str(path), "timeline": timeline, "refusals": refusals,
            "sent": sum(t["event"] == "sent" for t in timeline)}  # fmt: skip


def _detail(r: dict) -> str:
    event = r.get("event")
    if event == "sent":
        eps = r.get("epsilon")
        return (
            f"{r.get('bytes', 0):,} B, sha256 {str(r.get('sha256', ''))[:16]}… "
            f"({', '.join(r.get('records', []))})"
            + (f", ε {eps:.4g}" if isinstance(eps, (int, float)) else ", no ε reported")
        )
    if event == "refused":
        return f"{r.get('rule')}: {r.get('message', '')}"
    if event == "received":
        return str(r.get("message_type", ""))
    if event == "skipped-files":
        return f"dataset {r.get('dataset')}: {r.get('count', 0)} file(s) skipped (names kept here)"
    if str(event).startswith("study-"):
        by = f" by {r['by']}" if r.get("by") else ""
        return f"study {str(r.get('study', ''))[:16]}…{by}"
    if str(event).startswith("ledger-"):
        return f"{r.get('ledger')} counter {r.get('counter')} head {str(r.get('head'))[:16]}…"
    return ""


def env_user() -> str:
    """The operating-system user, the default name on a decision (as the CLI's)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "operator")
