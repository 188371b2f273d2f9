"""Every check ``fedhealth run`` makes before it starts an engine, shared with ``validate``.

In simulation every site lives on this machine, so before any training the CLI reads each
site's data, computes each site's DP plan and policy verdict, loads every HE key, and counts
the sites that would take part in each round. Every problem is collected, so that one
``fedhealth validate`` (or a refused ``fedhealth run``) lists them all at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedhealth.cli.he_preflight import he_check
from fedhealth.cli.privacy_preflight import SitePrivacyOutlook, privacy_outlook
from fedhealth.config.experiment import ExperimentConfig
from fedhealth.config.site import SiteProfile
from fedhealth.errors import FederationError, FedHealthError

__all__ = ["Preflight", "PreflightError", "check_experiment"]


class PreflightError(FedHealthError):
    """Several problems at once; the exit code is that of the first.

    Parameters
    ----------
    problems : list of FedHealthError
        Each problem, its message naming what and where.
    """

    def __init__(self, problems: list[FedHealthError]) -> None:
        self.problems = list(problems)
        self.exit_code = self.problems[0].exit_code
        if len(self.problems) == 1:
            text = str(self.problems[0])
        else:
            text = f"{len(self.problems)} problems:\n" + "\n".join(
                f"  {i}. {p}" for i, p in enumerate(self.problems, start=1)
            )
        super().__init__(text)


@dataclass
class Preflight:
    """What the pre-flight found for one experiment."""

    cfg: ExperimentConfig
    sites: list[SiteProfile]
    sizes: dict[str, int] = field(default_factory=dict)
    outlook: list[SitePrivacyOutlook] = field(default_factory=list)
    he_line: str | None = None
    problems: list[FedHealthError] = field(default_factory=list)

    def raise_problems(self) -> None:
        """Raise the one problem found (its own type), or :class:`PreflightError` listing all."""
        if len(self.problems) == 1:
            raise self.problems[0]
        if self.problems:
            raise PreflightError(self.problems)


def check_experiment(cfg: ExperimentConfig, sites: list[SiteProfile]) -> Preflight:
    """Run every pre-flight check of ``cfg`` against its ``sites``; collect every problem.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (already validated as a config).
    sites : list of SiteProfile
        Its sites' profiles.

    Returns
    -------
    Preflight
        Each readable site's training records, DP plan and policy verdict, the encryption
        line, and the problems: a custom strategy that fails to build, unreadable data (a
        missing file, a missing label column, more classes than ``task.num_classes``), an
        impossible DP plan (δ >= 1/n, an unreachable ε), a missing or wrong HE key, and
        fewer than ``experiment.min_sites`` sites taking part in some round.
    """
    from fedhealth.coordinator.strategies import build_strategy
    from fedhealth.site.dataset import load_site_data

    out = Preflight(cfg, sites)
    try:
        build_strategy(cfg)  # a broken custom strategy fails here, not mid-run
    except FedHealthError as exc:
        out.problems.append(exc)
    task = cfg.task_spec().task
    out_of_run: dict[str, str] = {}  # site -> why it cannot take part at all
    for site in sites:
        try:
            out.sizes[site.name] = load_site_data(site, task).n_train
        except FedHealthError as exc:
            out.problems.append(exc)
            out_of_run[site.name] = "its data cannot be read"
            continue
        try:  # one site at a time, so that every impossible plan is reported
            out.outlook += privacy_outlook(cfg, [site], {site.name: out.sizes[site.name]})
        except FedHealthError as exc:
            out.problems.append(exc)
            out_of_run[site.name] = "its DP plan is impossible"
    out.he_line, he_problems = he_check(cfg, sites)
    for who, problem in he_problems.items():
        out.problems.append(problem)
        if who is not None:
            out_of_run.setdefault(who, "its encryption keys fail")
    short = _participation(cfg, sites, out.outlook, out_of_run)
    if short is not None:
        out.problems.append(short)
    return out


def _participation(
    cfg: ExperimentConfig,
    sites: list[SiteProfile],
    outlook: list[SitePrivacyOutlook],
    out_of_run: dict[str, str],
) -> FederationError | None:
    """The error of the first round in which fewer than ``min_sites`` sites take part."""
    need, rounds = cfg.experiment.min_sites, cfg.experiment.rounds
    refusing = {o.site: o for o in outlook if o.refusal_round is not None}
    for round_ in range(1, rounds + 1):
        taking = [s.name for s in sites if _takes_part(s.name, round_, refusing, out_of_run)]
        refused = [str(o.refusal) for o in refusing.values() if (o.refusal_round or 0) <= round_]
        if len(taking) >= need or not refused:  # unreadable data etc. is reported on its own
            continue
        why = [f"site {name!r}: {reason}" for name, reason in out_of_run.items()] + refused
        return FederationError(
            f"experiment {cfg.name!r}: only {len(taking)} of {len(sites)} site(s) would take "
            f"part in round {round_}"
            + (f" ({', '.join(taking)})" if taking else "")
            + f", but `experiment.min_sites` is {need}; the run would stop there. "
            + " ".join(f"{w.rstrip('.')}." for w in why)
            + " Do what each site asks, or lower `experiment.min_sites`."
        )
    return None


def _takes_part(
    site: str, round_: int, refusing: dict[str, SitePrivacyOutlook], out_of_run: dict[str, str]
) -> bool:
    if site in out_of_run:
        return False
    first = refusing[site].refusal_round if site in refusing else None
    return first is None or first > round_
