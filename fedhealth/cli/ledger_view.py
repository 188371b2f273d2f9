"""Render a site's privacy ledger against its policy's caps (``fedhealth site ledger``)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedhealth.config.site import load_site
from fedhealth.privacy.dp.ledger import LedgerEntry, PrivacyLedger
from fedhealth.privacy.dp.ledger_anchor import LedgerFiles, site_history
from fedhealth.privacy.dp.policy import PrivacyPolicy


def _eps(x: float | None) -> str:
    if x is None:
        return "none"
    return "unbounded" if math.isinf(x) else f"{x:.4g}"


def _policy_line(policy: PrivacyPolicy) -> str:
    parts = [
        f"DP {'required' if policy.require_dp else 'not required'}",
        f"min noise multiplier {policy.min_noise_multiplier:g}",
        f"max ε per experiment {_eps(policy.max_epsilon_per_experiment)}",
        f"lifetime ε budget per dataset {_eps(policy.lifetime_epsilon_budget)}",
        f"max δ {policy.max_delta:g}" if policy.max_delta is not None else "max δ none",
    ]
    if policy.allowed_experiments is not None:
        parts.append(f"experiments {', '.join(policy.allowed_experiments)}")
    if policy.allowed_models is not None:
        parts.append(f"models {', '.join(policy.allowed_models)}")
    return "; ".join(parts)


def _dataset_line(ds: str, policy: PrivacyPolicy, rows: list[dict]) -> str:
    rec = sum(r["epsilon_total"] for r in rows if r["kind"] == "record")
    sit = sum(r["epsilon_total"] for r in rows if r["kind"] == "site")
    total, budget = rec + sit, policy.lifetime_epsilon_budget
    over = budget is not None and total > budget
    left = "" if budget is None else f", {_eps(max(budget - total, 0.0))} left"
    colour = "red" if over else "green" if budget is not None else "default"
    return (
        f"dataset [bold]{ds}[/]: lifetime ε [{colour}]{_eps(total)}[/] of budget {_eps(budget)}"
        f"{left} (record-level {_eps(rec)}, site-level {_eps(sit)}; experiments add up)"
    )


def _experiments_table(policy: PrivacyPolicy, rows: list[dict]) -> Table:
    cap = policy.max_epsilon_per_experiment
    table = Table(box=None, pad_edge=False, padding=(0, 1))
    cols = ("experiment", "DP", "ε", "cap", "δ", "acct.", "rounds", "last (UTC)")
    width = max(len(r["experiment"]) for r in rows)
    for col in cols:
        left = col in ("experiment", "DP")
        table.add_column(
            col, justify="left" if left else "right", min_width=width if col == cols[0] else None
        )
    for r in rows:
        style = "red" if cap is not None and r["epsilon_total"] > cap else None
        table.add_row(
            r["experiment"],
            r["kind"],
            _eps(r["epsilon_total"]),
            _eps(cap),
            f"{r['delta']:g}",
            r["accountant"],
            str(r["charges"]),
            r["last_timestamp"][5:16].replace("T", " "),
            style=style,
        )
    return table


def _entries_table(entries: list[LedgerEntry]) -> Table:
    table = Table(title="every charge, oldest first", box=None, pad_edge=False, padding=(0, 1))
    cols = ("id", "time (UTC)", "dataset/experiment", "round")
    names = [
        f"{e.dataset}/{e.experiment}" + (" (site-level)" if e.kind == "site" else "")
        for e in entries
    ]
    for col in (*cols, "+ε", "ε total", "σ", "q", "steps"):
        table.add_column(
            col,
            justify="left" if col in cols[1:3] else "right",
            no_wrap=True,
            min_width=max(map(len, names)) if col == cols[2] else None,
        )
    for e, name in zip(entries, names, strict=True):
        table.add_row(
            str(e.id),
            e.timestamp[5:16].replace("T", " "),
            name,
            str(e.round),
            f"{e.epsilon_increment:.4g}",
            f"{e.epsilon_experiment_total:.4g}",
            f"{e.noise_multiplier:.4g}",
            f"{e.sample_rate:.4g}",
            str(e.steps),
        )
    return table


def print_ledger(console: Console, profile_path: Path, show_entries: bool = False) -> None:
    """Print the site's spend per dataset and per experiment against its caps.

    Parameters
    ----------
    console : Console
        Where to print.
    profile_path : Path
        The site profile.
    show_entries : bool
        Also list every charge.

    Raises
    ------
    ConfigError
        The profile is invalid.
    LedgerCorruptError
        The ledger's hash chain does not verify (names the first bad entry).
    LedgerIntegrityError
        The ledger is missing, truncated, rolled back or replaced, or its key is bad.
    """
    site = load_site(profile_path)
    policy = PrivacyPolicy.from_mapping(site.privacy)
    path = site.ledger_path
    console.print(f"[bold]{site.name}[/] policy: {_policy_line(policy)}", highlight=False)
    if not path.exists() and site_history(LedgerFiles.beside(path)) is None:
        console.print(
            f"no privacy ledger yet at {path}: this site has spent no privacy budget.",
            highlight=False,
            soft_wrap=True,
        )
        for ds in sorted(site.datasets):
            console.print(_dataset_line(ds, policy, []), highlight=False, soft_wrap=True)
        return
    # Opening re-verifies the keyed chain against the key, the head file and the audit log;
    # a missing ledger next to a site that had one is refused, not recreated.
    with PrivacyLedger(path) as ledger:
        rows = ledger.summary()
        all_entries = ledger.entries()
        head = ledger.head_hash
        report = ledger.integrity
    for ds in sorted(set(site.datasets) | {r["dataset"] for r in rows}):
        mine = [r for r in rows if r["dataset"] == ds]
        console.print(_dataset_line(ds, policy, mine), highlight=False, soft_wrap=True)
        if mine:
            console.print(_experiments_table(policy, mine))
    if show_entries and all_entries:
        console.print(_entries_table(all_entries))
    console.print(
        escape(
            f"ledger {path}: {len(all_entries)} entries, keyed hash chain verified, "
            f"head {head[:16]}…; checked:"
        ),
        highlight=False,
        soft_wrap=True,
    )
    for line in report.lines():
        console.print(escape(f"  · {line}"), highlight=False, soft_wrap=True)
