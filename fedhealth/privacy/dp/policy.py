"""A site's privacy policy and the check a site runs before it trains a round.

The site operator writes the policy (``[privacy]`` of the site profile); the
site runtime builds a :class:`RoundRequest` from the experiment's plan, the
site's accountant (``PrivacyAccountant.project``) and its ledger
(``PrivacyLedger.spent_excluding``), and calls :func:`check_request` *before*
training. A refusal raises :class:`PolicyViolation` (a ``PolicyError``) whose
``rule`` names the policy key that refused.

Rules, checked in this order: ``allowed_experiments``, ``allowed_models``,
``require_dp``, ``require_he``, ``min_noise_multiplier``, ``max_delta``,
``max_epsilon_per_experiment``, ``lifetime_epsilon_budget``.

A round without DP has unbounded ε: a policy with an ε cap
(``max_epsilon_per_experiment`` or ``lifetime_epsilon_budget``) therefore
refuses it even when ``require_dp`` is false.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from fedhealth.errors import PolicyError

RULES = (
    "allowed_experiments",
    "allowed_models",
    "require_dp",
    "require_he",
    "min_noise_multiplier",
    "max_delta",
    "max_epsilon_per_experiment",
    "lifetime_epsilon_budget",
)


@dataclass(frozen=True)
class PrivacyPolicy:
    """What a site accepts, and how much privacy it may ever spend.

    Attributes
    ----------
    require_dp : bool
        Refuse rounds without record-level DP-SGD.
    require_he : bool
        Refuse rounds whose update is not homomorphically encrypted.
    min_noise_multiplier : float
        Smallest DP-SGD noise multiplier σ accepted.
    max_epsilon_per_experiment : float or None
        Cap on one experiment's ε (composed by the accountant).
    lifetime_epsilon_budget : float or None
        Cap on the ε of a dataset summed over all experiments (basic
        composition across experiments).
    max_delta : float or None
        Largest δ accepted.
    allowed_experiments : list of str or None
        Experiment names or ``fnmatch`` globs (``"heart-*"``); None = any.
    allowed_models : list of str or None
        Model names or globs; None = any.
    exempt_datasets : list of str
        Datasets without personal data (synthetic, public): only the
        participation rules apply to them (see :meth:`applies_to`).
    share_statistics : bool
        Answer consortium-normalisation queries (per-feature sums and sums of squares of
        the training split, clamped and noised under DP, charged; once per study).
    min_split_records : int
        Fewest records in a split anything is computed on or released from.
    release_metrics : str or None
        ``"dp"``, ``"withheld"`` or ``"exact"`` (see :meth:`metrics_release`).
    metrics_noise_multiplier, metrics_loss_bound, statistics_noise_multiplier : float
        The Gaussian mechanisms of metric and statistics releases.
    """

    require_dp: bool = True
    min_noise_multiplier: float = 0.0
    max_epsilon_per_experiment: float | None = None
    lifetime_epsilon_budget: float | None = None  # per dataset
    max_delta: float | None = None
    allowed_experiments: list[str] | None = None  # None = any; names or fnmatch globs
    allowed_models: list[str] | None = None
    require_he: bool = False
    exempt_datasets: tuple[str, ...] = ()
    share_statistics: bool = False
    min_split_records: int = 50
    release_metrics: str | None = None  # "dp" | "withheld" | "exact"; None: by dataset
    metrics_noise_multiplier: float = 5.0
    metrics_loss_bound: float = 5.0
    statistics_noise_multiplier: float = 5.0

    def metrics_release(self, dataset: str) -> str:
        """How metrics computed on ``dataset`` leave the site: ``"dp"``, ``"withheld"`` or
        ``"exact"`` (``release_metrics``; by default ``"dp"``, ``"exact"`` if exempt)."""
        if self.release_metrics is not None:
            return self.release_metrics
        return "dp" if self.applies_to(dataset) else "exact"

    def applies_to(self, dataset: str) -> bool:
        """Whether the DP rules and ε caps apply to ``dataset`` (not exempt).

        Parameters
        ----------
        dataset : str

        Returns
        -------
        bool
        """
        return dataset not in self.exempt_datasets

    @classmethod
    def from_mapping(cls, section: Any) -> PrivacyPolicy:
        """Build from a dict or an object with the same attribute names.

        Parameters
        ----------
        section : mapping or object
            E.g. the site profile's ``privacy`` section (a pydantic model).

        Returns
        -------
        PrivacyPolicy
        """
        if hasattr(section, "model_dump"):
            section = section.model_dump()
        elif not isinstance(section, dict):
            section = vars(section)
        names = cls.__dataclass_fields__
        values = {k: v for k, v in section.items() if k in names}
        if values.get("exempt_datasets") is not None:
            values["exempt_datasets"] = tuple(values["exempt_datasets"])
        return cls(**values)


@dataclass(frozen=True)
class RoundRequest:
    """What a round asks of a site, with the privacy it would cost.

    Attributes
    ----------
    site, dataset, experiment : str
        Who is asked, on which dataset, for which experiment.
    round : int
        Round number.
    model : str
        Model name from the experiment config.
    dp_enabled : bool
        Whether the round trains with record-level DP-SGD.
    noise_multiplier : float
        DP-SGD σ (ignored when DP is off).
    delta : float
        Target δ of the experiment.
    projected_epsilon_experiment : float
        Experiment-level ε after this round (``PrivacyAccountant.project``).
    spent_lifetime_other_experiments : float
        Ledger spend of this dataset in *other* experiments.
    he_enabled : bool
        Whether the update is homomorphically encrypted.
    """

    site: str
    dataset: str
    experiment: str
    round: int
    model: str
    dp_enabled: bool
    noise_multiplier: float
    delta: float
    projected_epsilon_experiment: float
    spent_lifetime_other_experiments: float
    he_enabled: bool = False


class PolicyViolation(PolicyError):
    """A site refused a round because of one rule of its privacy policy.

    Attributes
    ----------
    rule : str
        The refusing policy key (one of ``RULES``).
    site : str
        The refusing site.
    cap : object
        The policy's limit.
    value : object
        What the round asked for or would bring the spend to.
    """

    def __init__(self, message: str, *, rule: str, site: str, cap: Any, value: Any) -> None:
        super().__init__(message)
        self.rule = rule
        self.site = site
        self.cap = cap
        self.value = value


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "unknown"
    if math.isinf(x):
        return "unbounded"
    s = f"{x:.4g}"
    return s if any(c in s for c in ".e") else s + ".0"


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or fnmatchcase(name, p) for p in patterns)


def _refuser(site: str, who: str):
    def refuse(rule: str, why: str, todo: str, cap: Any, value: Any) -> PolicyViolation:
        return PolicyViolation(f"{who}: {why}. {todo}", rule=rule, site=site, cap=cap, value=value)

    return refuse


def check_participation(
    policy: PrivacyPolicy, site: str, experiment: str, model: str, what: str = "requests"
) -> None:
    """Refuse any request of an experiment or model the site does not take part in.

    The first two rules of :func:`check_request`, on their own: sites apply them
    to evaluation and statistics requests too, which spend no ε.

    Parameters
    ----------
    policy : PrivacyPolicy
        The site's policy.
    site, experiment, model : str
        Who is asked, for which experiment and model.
    what : str
        What is refused, for the message (e.g. ``"round 3"``).

    Raises
    ------
    PolicyViolation
        ``rule`` is ``allowed_experiments`` or ``allowed_models``.
    """
    refuse = _refuser(site, f"site {site!r} refuses {what} of experiment {experiment!r}")
    if policy.allowed_experiments is not None and not _matches(
        experiment, list(policy.allowed_experiments)
    ):
        raise refuse(
            "allowed_experiments",
            f"experiment {experiment!r} is not in the site's allowed experiments "
            f"{list(policy.allowed_experiments)}",
            "Ask the site operator to add it to `privacy.allowed_experiments`.",
            list(policy.allowed_experiments),
            experiment,
        )
    if policy.allowed_models is not None and not _matches(model, list(policy.allowed_models)):
        raise refuse(
            "allowed_models",
            f"model {model!r} is not in the site's allowed models {list(policy.allowed_models)}",
            "Use an allowed model, or ask the site operator to add it to `privacy.allowed_models`.",
            list(policy.allowed_models),
            model,
        )


# Without DP a round's ε is unbounded: no amount of rounds or noise fits an ε cap.
_NO_DP_TODO = (
    "Without differential privacy a round's ε is unbounded: enable DP in the experiment's "
    "`[privacy.dp]` section, or ask the site operator to exempt the dataset "
    "(`privacy.exempt_datasets`)."
)


def check_request(policy: PrivacyPolicy, req: RoundRequest) -> None:
    """Refuse a round that breaks the site's privacy policy.

    Parameters
    ----------
    policy : PrivacyPolicy
        The site's policy.
    req : RoundRequest
        The round asked for, with its projected privacy cost.

    Raises
    ------
    PolicyViolation
        At the first rule the round breaks; ``rule`` names it and the message
        names the site, the rule, the cap and the requested/projected value.
    """
    check_participation(policy, req.site, req.experiment, req.model, f"round {req.round}")
    refuse = _refuser(
        req.site, f"site {req.site!r} refuses round {req.round} of experiment {req.experiment!r}"
    )

    if policy.require_dp and not req.dp_enabled:
        raise refuse(
            "require_dp",
            "the site requires differential privacy (`privacy.require_dp = true`) but the "
            "experiment trains without DP-SGD",
            "Enable DP in the experiment's `[privacy]` section.",
            True,
            False,
        )
    if policy.require_he and not req.he_enabled:
        raise refuse(
            "require_he",
            "the site requires homomorphically encrypted updates (`privacy.require_he = true`) "
            "but the experiment sends them in the clear",
            "Enable homomorphic encryption in the experiment.",
            True,
            False,
        )
    sigma = float(req.noise_multiplier) if req.dp_enabled else 0.0
    if policy.min_noise_multiplier > 0 and sigma < policy.min_noise_multiplier:
        raise refuse(
            "min_noise_multiplier",
            f"minimum noise multiplier (`privacy.min_noise_multiplier`) is "
            f"{_num(policy.min_noise_multiplier)}, the round uses {_num(sigma)}"
            + ("" if req.dp_enabled else " (DP is off)"),
            "Raise the experiment's noise multiplier, or ask the site operator to lower "
            "`privacy.min_noise_multiplier`."
            if req.dp_enabled
            else "Enable DP in the experiment's `[privacy.dp]` section with at least that "
            "noise multiplier, or ask the site operator to exempt the dataset "
            "(`privacy.exempt_datasets`).",
            policy.min_noise_multiplier,
            sigma,
        )
    if req.dp_enabled and policy.max_delta is not None and req.delta > policy.max_delta:
        raise refuse(
            "max_delta",
            f"maximum δ (`privacy.max_delta`) is {policy.max_delta:g}, the experiment uses "
            f"δ={req.delta:g}",
            "Lower the experiment's δ, or ask the site operator to raise `privacy.max_delta`.",
            policy.max_delta,
            req.delta,
        )
    projected = float(req.projected_epsilon_experiment) if req.dp_enabled else math.inf
    if math.isnan(projected):
        projected = math.inf
    cap = policy.max_epsilon_per_experiment
    if cap is not None and projected > cap:
        raise refuse(
            "max_epsilon_per_experiment",
            f"ε cap per experiment (`privacy.max_epsilon_per_experiment`) on dataset "
            f"{req.dataset!r} is {_num(cap)}, this round would bring experiment "
            f"{req.experiment!r} to ε={_num(projected)}" + ("" if req.dp_enabled else " (no DP)"),
            "Ask the site operator to raise `privacy.max_epsilon_per_experiment` or plan fewer "
            "rounds / more noise."
            if req.dp_enabled
            else _NO_DP_TODO,
            cap,
            projected,
        )
    budget = policy.lifetime_epsilon_budget
    if budget is not None:
        other = float(req.spent_lifetime_other_experiments)
        total = other + projected
        if total > budget:
            raise refuse(
                "lifetime_epsilon_budget",
                f"lifetime ε budget (`privacy.lifetime_epsilon_budget`) for dataset "
                f"{req.dataset!r} is {_num(budget)}, already spent {_num(other)} in other "
                f"experiments, this round would bring it to {_num(total)}"
                + ("" if req.dp_enabled else " (no DP)"),
                "Ask the site operator to raise `privacy.lifetime_epsilon_budget` or plan fewer "
                "rounds / more noise."
                if req.dp_enabled
                else _NO_DP_TODO,
                budget,
                total,
            )
