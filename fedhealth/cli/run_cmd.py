"""``fedhealth run``: validate, pre-flight every site's data, simulate, summarise."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedhealth.cli.live import LiveRun
from fedhealth.cli.preflight import check_experiment
from fedhealth.cli.privacy_preflight import SitePrivacyOutlook
from fedhealth.config.experiment import ExperimentConfig, load_experiment_with_sites
from fedhealth.config.site import SiteProfile
from fedhealth.coordinator.federation import RunSummary
from fedhealth.coordinator.privacy_report import format_epsilon
from fedhealth.errors import ConfigError, FederationError, FedHealthError
from fedhealth.privacy.dp.policy import PrivacyPolicy
from fedhealth.protocol import Metric
from fedhealth.registry.store import default_tracking_uri


def preflight(cfg: ExperimentConfig, sites: list[SiteProfile]) -> dict[str, int]:
    """Run every pre-flight check before any training, so bad input fails fast.

    In simulation all sites live on this machine; in a real deployment each
    site checks its own data when its node starts. The checks are those of
    ``fedhealth validate`` (:func:`fedhealth.cli.preflight.check_experiment`):
    data, DP plans, HE keys, and enough sites taking part in every round.

    Returns
    -------
    dict
        Site name -> training records.

    Raises
    ------
    PreflightError
        Every problem found, in one message.
    """
    checked = check_experiment(cfg, sites)
    checked.raise_problems()
    return checked.sizes


def _print_outlook(
    console: Console,
    cfg: ExperimentConfig,
    outlook: list[SitePrivacyOutlook],
    sites: list[SiteProfile],
) -> None:
    dp = cfg.privacy.dp
    if dp.enabled:
        mode = "record-level DP-SGD" if dp.mode == "record" else "site-level DP"
        console.print(
            f"  privacy: {mode}, δ={dp.delta:g}, {dp.accountant} accountant; each site plans:",
            highlight=False,
        )
        for o in outlook:
            p = o.plan
            assert p is not None
            console.print(
                f"    {o.site}: σ {p.noise_multiplier:.4g}, q {p.sample_rate:.4g}, "
                f"{p.steps_per_round} steps/round -> ε {p.planned_epsilon():.4g} this run, "
                f"{format_epsilon(o.epsilon_after_run)} in all runs",
                highlight=False,
            )
    else:
        console.print("  privacy: no DP-SGD in training (`\\[privacy.dp]` off)", highlight=False)
    noisy = [
        s.name
        for s in sites
        if PrivacyPolicy.from_mapping(s.privacy).metrics_release(cfg.task.dataset) == "dp"
    ]
    if noisy:
        console.print(
            f"  metrics: {', '.join(noisy)} release loss and accuracy with Gaussian noise "
            "charged to their ledgers (`privacy.release_metrics`), so their ε grows each round",
            highlight=False,
            soft_wrap=True,
        )
    for o in outlook:
        if o.refusal:
            console.print(f"  [yellow]will refuse:[/] {escape(o.refusal)}", highlight=False)


def run_experiments(
    console: Console,
    paths: list[Path],
    tracking_uri: str | None,
    verbose: bool,
    resume: str | None = None,
) -> list[RunSummary]:
    """Run each experiment in turn on the simulation engine; ``resume`` continues the
    interrupted MLflow run of the one experiment given from its last checkpoint."""
    if resume and len(paths) != 1:
        raise ConfigError("--resume continues one run: give exactly one experiment")
    loaded = [(p, *load_experiment_with_sites(p)) for p in paths]  # all configs first
    summaries = []
    for path, cfg, sites in loaded:
        uri = tracking_uri or cfg.tracking.uri or default_tracking_uri()
        checked = check_experiment(cfg, sites)
        checked.raise_problems()  # before any engine (Ray) starts
        sizes = checked.sizes
        console.print(
            f"[bold]{escape(cfg.name)}[/]: {len(sites)} sites "
            f"({', '.join(f'{k} {v}' for k, v in sizes.items())} training records), "
            f"{cfg.experiment.rounds} rounds, strategy {cfg.strategy.name.rsplit('/', 1)[-1]}, "
            f"model {cfg.model.name}",
            highlight=False,
            soft_wrap=True,  # one line when redirected (80 columns), as a terminal shows it
        )
        _print_outlook(console, cfg, checked.outlook, checked.sites)
        console.print(f"  {checked.he_line}", highlight=False, soft_wrap=True)
        if resume:
            console.print(f"  resuming MLflow run {resume} from its last checkpoint")
        summaries.append(_simulate(console, path, cfg, uri, verbose, resume))
    return summaries


def _simulate(
    console: Console,
    path: Path,
    cfg: ExperimentConfig,
    uri: str,
    verbose: bool,
    resume: str | None = None,
) -> RunSummary:
    from fedhealth.engines.simulation import run_simulation

    try:
        if verbose:
            summary = run_simulation(path, cfg, uri, verbose=True, resume_run_id=resume)
        else:
            with LiveRun(console, cfg.name, cfg.experiment.rounds) as live:
                summary = run_simulation(path, cfg, uri, resume_run_id=resume, on_event=live)
    except FedHealthError as exc:
        raise FederationError(f"experiment {cfg.name!r} stopped: {exc}") from None
    print_summary(console, summary)
    return summary


def print_summary(console: Console, s: RunSummary) -> None:
    """The closing table: global and per-site metrics, each site's ε, the registered version."""
    dp = s.privacy or {"mode": "off", "sites": {}}
    eps_col = dp["mode"] != "off" or bool(dp["sites"])
    table = Table(title=f"{s.experiment}: final round ({s.rounds}) on each site's test split")
    cols = ["site", "test examples", "accuracy", "loss"] + (["ε"] if eps_col else [])
    for col in cols:
        table.add_column(col, justify="left" if col == "site" else "right")
    for site in sorted(set(s.site_metrics) | set(dp["sites"])):
        m = s.site_metrics.get(site)
        row = [site, "", "-", "-"]
        if m is not None and Metric.ACCURACY not in m:  # the site's policy withheld them
            row = [site, str(int(m.get(Metric.NUM_EXAMPLES, 0))), "withheld", "withheld"]
        elif m is not None:
            n, acc, loss = m[Metric.NUM_EXAMPLES], m[Metric.ACCURACY], m[Metric.LOSS]
            noisy = "±" if Metric.ACCURACY_NOISE_STD in m else ""  # released under DP
            row = [site, str(int(n)), f"{noisy}{acc:.4f}", f"{noisy}{loss:.4f}"]
        if eps_col:
            row.append(format_epsilon(dp["sites"].get(site, {}).get("epsilon")))
        table.add_row(*row)
    g = s.global_metrics
    if g:
        pad = [""] if eps_col else []
        table.add_row(
            "[bold]all (weighted)",
            str(int(g[Metric.NUM_EXAMPLES])),
            f"[bold]{g['accuracy']:.4f}",
            f"{g['loss']:.4f}",
            *pad,
        )
        table.add_row(
            "[bold]mean over sites",
            "",
            f"{g['accuracy_site_mean']:.4f}",
            f"{g['loss_site_mean']:.4f}",
            *pad,
        )
    console.print(table)
    if any(Metric.ACCURACY_NOISE_STD in m for m in s.site_metrics.values()):
        console.print(
            "± : released with DP noise by the site (`privacy.release_metrics`), charged to "
            "its ledger; the global rows average the noisy values."
        )
    if eps_col:
        console.print(
            f"Privacy: {dp['description']}. ε per site is cumulative over every run of this "
            "experiment at that site, as charged to its ledger.",
            highlight=False,
            soft_wrap=True,
        )
        if dp.get("site_level_epsilon") is not None:
            console.print(
                f"Site-level ε of the global model: {format_epsilon(dp['site_level_epsilon'])} "
                f"(δ={dp['delta']:g})",
                highlight=False,
            )
    if s.final_auroc:
        from fedhealth.evaluation.metrics import format_interval

        console.print(
            "AUROC of the final model, from the score histograms the sites released: "
            + ", ".join(f"{site} {format_interval(m)}" for site, m in s.final_auroc.items()),
            highlight=False,
            soft_wrap=True,
        )
    _print_refusals(console, s.refusals)
    if s.statistics_declined:
        console.print(
            f"Statistics: {', '.join(map(escape, s.statistics_declined))} do not share "
            "per-feature sums (`privacy.share_statistics = false`, the default), so the "
            "registered model holds no standardisation statistics: its consumer passes them "
            "(`fedhealth models show` says how).",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"MLflow store: [cyan]{s.tracking_uri}[/]  run {s.run_id}  ({s.seconds:.0f} s)",
        soft_wrap=True,
    )
    if s.report:
        console.print(f"Run report: [cyan]{escape(s.report)}[/]", soft_wrap=True)
    if s.report_url:
        console.print(f"  in the MLflow UI: [cyan]{escape(s.report_url)}[/]", soft_wrap=True)
    if s.version:
        console.print(
            f"Registered model: [bold green]{s.registered_model}[/] version "
            f"[bold green]{s.version}[/]  ->  "
            f'mlflow.pyfunc.load_model("models:/{s.registered_model}/{s.version}")',
            soft_wrap=True,
        )


def _print_refusals(console: Console, refusals: list) -> None:
    """One line per refusing site and rule, with the rounds and the latest message."""
    grouped: dict[tuple[str, str], list] = {}
    for r in refusals:
        grouped.setdefault((r.site, r.rule), []).append(r)
    for (site, rule), rs in grouped.items():
        rounds = sorted({getattr(r, "round", 0) for r in rs})
        when = f" in round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))}"
        console.print(
            f"[yellow]site {escape(site)} refused ({escape(rule)}){when}:[/] "
            f"{escape(rs[-1].message)}",
            highlight=False,
            soft_wrap=True,
        )
