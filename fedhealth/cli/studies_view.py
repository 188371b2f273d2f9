"""Render a site's study requests and decisions (``fedhealth site requests``)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedhealth.config.site import load_site
from fedhealth.site.approvals import list_studies

_COLOUR = {"pending": "yellow", "approved": "green", "declined": "red", "unknown": "default"}


def _num(x: Any) -> str:
    if isinstance(x, float):
        return "unbounded" if math.isinf(x) else f"{x:.4g}"
    return "none" if x is None else str(x)


def _when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (TypeError, ValueError):
        return "?"


def _options(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items() if v is not None) or "none"


def study_lines(record: dict[str, Any]) -> list[str]:
    """What a stored request asks for, as plain lines (no markup), for a person to check."""
    asks = record.get("asks")
    if not isinstance(asks, dict):
        return ["(no stored request: decided by hash)"]
    if asks.get("kind") == "analysis":
        return _analysis_lines(asks, record.get("privacy", {}))
    model = dict(asks["model"])
    name = model.pop("name")
    strategy = dict(asks["strategy"])
    code = strategy.get("code_sha256") or "built in (covered by the fedhealth version)"
    dp = asks["dp"]
    dp_text = "off" if not dp.get("enabled") else _options({k: v for k, v in dp.items()
                                                            if k != "enabled"})  # fmt: skip
    he = asks["he"]
    privacy = record.get("privacy", {})
    projected = (
        f"ε {_num(privacy.get('epsilon'))} over {asks['rounds']} rounds"
        f" (δ {_num(privacy.get('delta'))})"
        if dp.get("enabled")
        else "unbounded: no differential privacy"
    )
    caps = (
        f"cap per experiment {_num(privacy.get('max_epsilon_per_experiment'))}, lifetime budget "
        f"{_num(privacy.get('lifetime_epsilon_budget'))}, spent on the dataset "
        f"{_num(privacy.get('spent_on_dataset', 0.0))}"
    )
    return [
        f"experiment   {asks['experiment']}  (fedhealth {asks['fedhealth_version']})",
        f"dataset      {asks['dataset']}: columns {', '.join(asks['columns'])}",
        f"task         {_options(asks['task'])}",
        f"model        {name} ({_options(model)})",
        f"training     {_options(asks['training'])}; {asks['rounds']} rounds, seed {asks['seed']}",
        f"strategy     {strategy.get('name')} ({_options(strategy.get('options') or {})}); "
        f"code sha256 {code}",
        f"DP           {dp_text}",
        f"HE           {'off' if he == 'off' else _options(he)}",
        f"privacy      projected {projected}; {caps}",
    ]


def _analysis_lines(asks: dict[str, Any], privacy: dict[str, Any]) -> list[str]:
    """What a stored analysis request asks for (``fedhealth analyze``)."""

    def column(c: dict[str, Any]) -> str:
        if c.get("type") != "numeric":
            return str(c.get("type"))
        return _options({n: v for n, v in c.items() if n != "type"})

    cols = ", ".join(f"{k} ({column(c)})" for k, c in asks["columns"].items())
    where = asks["cohort"].get("where") or []
    cohort = "; ".join(f"{p['column']} {p['op']} {p.get('value', '')}".strip() for p in where)
    queries = "; ".join(f"{name} ({q['kind']})" for name, q in asks["queries"].items())
    return [
        f"analysis     {asks['experiment']}  (fedhealth {asks['fedhealth_version']})",
        f"dataset      {asks['dataset']}: columns {cols}",
        f"cohort       {cohort or 'every record'}",
        f"queries      {queries}",
        f"privacy      ε {_num(privacy.get('epsilon'))} for the whole analysis (δ "
        f"{_num(asks.get('delta'))}); cap per experiment "
        f"{_num(privacy.get('max_epsilon_per_experiment'))}, lifetime budget "
        f"{_num(privacy.get('lifetime_epsilon_budget'))}, spent on the dataset "
        f"{_num(privacy.get('spent_on_dataset', 0.0))}",
    ]


def print_requests(console: Console, profile: Path, show_all: bool, as_json: bool) -> None:
    """Print the site's pending study requests (``show_all``: decided ones too)."""
    site = load_site(profile)
    studies = [s for s in list_studies(site) if show_all or s["status"] in ("pending", "unknown")]
    if as_json:
        console.print_json(json.dumps(studies, default=str))
        return
    mode = site.privacy.approval
    console.print(
        f"site [bold]{escape(site.name)}[/]: approval = {mode!r}"
        + (" (studies the rules allow run without a decision)" if mode == "rules" else ""),
        highlight=False,
    )
    if not studies:
        console.print("no pending study requests" if not show_all else "no studies seen yet")
        return
    for s in studies:
        colour = _COLOUR.get(s["status"], "default")
        console.print(
            f"\n[{colour}]{s['status']}[/] study [bold]{s['study']}[/]  first seen "
            f"{_when(s.get('first_seen'))}",
            highlight=False,
        )
        for line in study_lines(s):
            console.print("  " + escape(line), highlight=False, soft_wrap=True)
        d = s.get("decision")
        if d:
            console.print(f"  decided      {d['decision']} by {escape(d['by'])} at {d['at']} "
                          "(signature verified)", highlight=False)  # fmt: skip
        elif s.get("decision_problem"):
            console.print(
                f"  [red]a decision file is present but does not count:[/] "
                f"{escape(s['decision_problem'])}",
                highlight=False,
            )
    if any(s["status"] in ("pending", "unknown") for s in studies):
        console.print(
            f"\ndecide with `fedhealth site approve {escape(str(profile))} STUDY_HASH` or "
            f"`fedhealth site deny {escape(str(profile))} STUDY_HASH` (--by NAME)",
            highlight=False,
        )
