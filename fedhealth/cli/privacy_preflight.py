"""Pre-flight of an experiment's privacy plan against every site's data, policy and ledger.

In simulation every site lives on this machine, so before any training the CLI
computes each site's DP plan (which fails, naming the key and the site, when δ
is not below 1/n or a target ε is unreachable) and tells which sites' policies
will refuse, and from when. A real site makes the same checks itself before
every round (``fedhealth.site.privacy_guard``); this only moves the bad news
to before the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedhealth.config.experiment import ExperimentConfig
from fedhealth.config.site import SiteProfile
from fedhealth.privacy.dp.accounting import PrivacyAccountant
from fedhealth.privacy.dp.ledger import PrivacyLedger
from fedhealth.privacy.dp.plan import DPPlan, plan_for_site
from fedhealth.privacy.dp.policy import (
    PolicyViolation,
    PrivacyPolicy,
    check_participation,
    check_request,
)
from fedhealth.privacy.dp.policy import RoundRequest as PolicyRequest


@dataclass
class SitePrivacyOutlook:
    """One site's plan, what it will have spent after the run, and any refusal to expect
    (``refusal_round``: the first round the site refuses)."""

    site: str
    plan: DPPlan | None
    epsilon_after_run: float
    refusal: str | None = None
    refusal_round: int | None = None


def _history(site: SiteProfile, dataset: str, experiment: str, kind: str):
    """Earlier charges of this experiment and the dataset's lifetime spend (all kinds)."""
    if not site.ledger_path.exists():
        return [], 0.0, 0.0
    with PrivacyLedger(site.ledger_path) as ledger:
        history = [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in ledger.entries(dataset)
            if e.experiment == experiment and e.kind == kind
        ]
        before = ledger.spent_in_experiment(dataset, experiment, kind)
        lifetime = ledger.spent(dataset, "record") + ledger.spent(dataset, "site")
    return history, before, lifetime


@dataclass
class _Projection:
    """What a site would know about an experiment before its first round."""

    cfg: ExperimentConfig
    site: str
    policy: PrivacyPolicy
    plan: DPPlan | None
    accountant: PrivacyAccountant | None
    before: float  # the experiment's ε at this site so far (earlier runs)
    other: float  # the dataset's lifetime ε in other experiments

    def verdict(self, round_: int) -> tuple[float, str | None]:
        """The experiment's ε after ``round_`` rounds, and the site's refusal (or None)."""
        plan, cfg = self.plan, self.cfg
        projected = math.inf
        if plan is not None and self.accountant is not None:
            steps = plan.steps_per_round * round_
            sigma, q = plan.noise_multiplier, plan.sample_rate
            projected = max(self.accountant.project(sigma, q, steps, plan.delta), self.before)
        request = PolicyRequest(
            site=self.site,
            dataset=cfg.task.dataset,
            experiment=cfg.name,
            round=round_,
            model=cfg.model.name,
            dp_enabled=plan is not None,
            noise_multiplier=plan.noise_multiplier if plan else 0.0,
            delta=plan.delta if plan else 0.0,
            projected_epsilon_experiment=projected,
            spent_lifetime_other_experiments=self.other,
            he_enabled=cfg.privacy.he.enabled,
        )
        try:
            if self.policy.applies_to(cfg.task.dataset):
                check_request(self.policy, request)
            else:
                check_participation(self.policy, self.site, cfg.name, cfg.model.name, "requests")
        except PolicyViolation as exc:
            return projected, str(exc)
        return projected, None

    def first_refusal(self, rounds: int) -> tuple[float, str | None, int | None]:
        """ε after all ``rounds``, and the refusal and number of the first round the site
        refuses (``None, None`` when it takes part in every round)."""
        projected, refusal = self.verdict(rounds)
        if refusal is None:
            return projected, None, None
        lo, hi = 0, rounds  # spend only grows with rounds: bisect for the first refusal
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.verdict(mid)[1] else (mid, hi)
        return projected, self.verdict(hi)[1], hi


def privacy_outlook(
    cfg: ExperimentConfig, sites: list[SiteProfile], sizes: dict[str, int]
) -> list[SitePrivacyOutlook]:
    """Each site's DP plan and policy verdict for the whole run.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    sites : list of SiteProfile
        Its sites.
    sizes : dict
        Site name -> training records (from the data pre-flight).

    Returns
    -------
    list of SitePrivacyOutlook

    Raises
    ------
    ConfigError
        A site's plan is impossible (δ >= 1/n, unreachable target ε); the message
        names the key and the site and states the smallest feasible ε.
    """
    spec = cfg.task_spec()
    dp, rounds = spec.dp, spec.rounds
    out = []
    for site in sites:
        plan, acc, before, other = None, None, 0.0, 0.0
        if dp.enabled:
            plan = plan_for_site(dp, spec.training, rounds, sizes[site.name], site.name)
            history, before, lifetime = _history(site, cfg.task.dataset, cfg.name, plan.mode)
            acc = PrivacyAccountant(site.name, cfg.task.dataset, cfg.name, plan.accountant, history)
            other = lifetime - before
        policy = PrivacyPolicy.from_mapping(site.privacy)
        projection = _Projection(cfg, site.name, policy, plan, acc, before, other)
        projected, refusal, when = projection.first_refusal(rounds)
        out.append(SitePrivacyOutlook(site.name, plan, projected, refusal, when))
    return out
