"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (DP-SGD).

One obvious entry point over accountants swappable by name, as Opacus's
``PrivacyEngine`` does it: every function takes ``accountant="rdp"`` or
``"prv"`` and computes with Opacus's own ``RDPAccountant`` /
``PRVAccountant`` fed a history of ``(noise_multiplier, sample_rate, steps)``.

* ``rdp`` -- Rényi DP (Mironov et al.), converted to (ε, δ) with Balle et al.
  2020, Thm. 21. Fast and slightly loose.
* ``prv`` -- numerical composition of privacy-loss random variables (Gopi et
  al. 2021); tighter, slower (tenths of a second per call), and returns the
  *upper* bound of its estimate (absolute ε error 0.01).

Both were checked against Google's independent ``dp_accounting`` package
(``tests/test_dp_accounting.py``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fedhealth.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv")

#: Largest noise multiplier ``noise_for_target`` will propose. Beyond this the
#: model learns essentially nothing, so the plan itself has to change.
MAX_NOISE_MULTIPLIER = 100.0

Step = tuple[float, float, int]


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(
            f"unknown privacy accountant {accountant!r}; choose one of "
            f"{', '.join(repr(a) for a in ACCOUNTANTS)} (`privacy.dp.accountant` in the experiment)"
        )
    return accountant


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"δ (delta) must be in (0, 1), got {delta!r}")
    return delta


def _check_step(noise_multiplier: float, sample_rate: float, steps: float) -> Step:
    sigma, q = float(noise_multiplier), float(sample_rate)
    if not math.isfinite(sigma) or sigma < 0:
        raise ConfigError(
            f"noise multiplier must be a finite number >= 0, got {noise_multiplier!r}"
        )
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"sample rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ConfigError(f"number of steps must be a whole number >= 0, got {steps!r}")
    return sigma, q, int(steps)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one step at Opacus's default orders (cached: it is the slow part)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    return analysis.compute_rdp(
        q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )


def _rdp_epsilon(phases: list[Step], delta: float) -> float:
    """Exactly Opacus's ``RDPAccountant.get_epsilon``, with the per-step RDP cached.

    Opacus computes ``compute_rdp(q, σ, steps) = steps * compute_rdp(q, σ, 1)`` afresh
    on every call, which takes tenths of a second for large σ; a site asks after
    every round, so the per-step vector is cached per (σ, q).
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    rdp = sum(_rdp_per_step(sigma, q) * steps for sigma, q, steps in phases)
    eps, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _opacus_accountant(accountant: str) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if accountant == "rdp" else PRVAccountant()


def epsilon_for_history(
    history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp"
) -> float:
    """ε spent by a sequence of Poisson-subsampled Gaussian phases.

    Parameters
    ----------
    history : iterable of (noise_multiplier, sample_rate, steps)
        The phases, composed together (tightly, within the accountant).
    delta : float
        Target δ.
    accountant : {"rdp", "prv"}
        Which Opacus accountant composes the history.

    Returns
    -------
    float
        ε; ``0.0`` for an empty history, ``math.inf`` if a phase ran with no noise.
    """
    _check_accountant(accountant)
    delta = _check_delta(delta)
    phases = [_check_step(*h) for h in history]
    phases = [p for p in phases if p[2] > 0]
    if not phases:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in phases):
        return math.inf
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # RDP warns when the optimum sits at the edge of its order grid (the bound is
        # still valid, only possibly loose); PRV takes log(0) harmlessly when q = 1.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        if accountant == "rdp":
            return _rdp_epsilon(phases, delta)
        acc = _opacus_accountant(accountant)
        acc.history = list(phases)
        return float(acc.get_epsilon(delta=delta))


def epsilon_spent(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε after ``steps`` DP-SGD steps with one noise multiplier and sample rate.

    Parameters
    ----------
    noise_multiplier : float
        σ: noise std divided by the clipping norm.
    sample_rate : float
        q: Poisson sampling probability of each record per step.
    steps : int
        Number of optimiser steps (noisy releases).
    delta : float
        Target δ.
    accountant : {"rdp", "prv"}
        Which Opacus accountant to use.

    Returns
    -------
    float
        ε (``math.inf`` if ``noise_multiplier`` is 0 and ``steps`` > 0).

    Raises
    ------
    ConfigError
        Unknown accountant, or parameters out of range.
    """
    return epsilon_for_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Smallest noise multiplier that keeps ``steps`` steps within ``target_epsilon``.

    Uses Opacus's ``get_noise_multiplier`` (binary search to ε tolerance 0.01),
    so ``epsilon_spent(result, ...) <= target_epsilon``.

    Parameters
    ----------
    target_epsilon : float
        ε budget of the whole plan (e.g. one experiment).
    delta : float
        Target δ.
    sample_rate : float
        q per step.
    steps : int
        Total planned steps (rounds × local steps per round).
    accountant : {"rdp", "prv"}
        Which Opacus accountant to use.

    Returns
    -------
    float
        σ, at most ``MAX_NOISE_MULTIPLIER``.

    Raises
    ------
    ConfigError
        If the target cannot be reached with σ <= ``MAX_NOISE_MULTIPLIER``; the
        message states the smallest ε reachable and what to change.
    """
    _check_accountant(accountant)
    delta = _check_delta(delta)
    _, q, steps = _check_step(1.0, sample_rate, steps)
    target = float(target_epsilon)
    if not math.isfinite(target) or target <= 0:
        raise ConfigError(f"target ε must be a finite number > 0, got {target_epsilon!r}")
    if steps == 0:
        raise ConfigError("cannot calibrate noise for 0 steps: the plan trains nothing")
    floor = epsilon_spent(MAX_NOISE_MULTIPLIER, q, steps, delta, accountant)
    advice = (
        "Raise the ε target, or plan fewer rounds / local steps, or lower the sample rate "
        "(smaller batches relative to the dataset)."
    )
    if floor > target:
        raise ConfigError(
            f"target ε={target:g} (δ={delta:g}) is unreachable for {steps} steps at sample rate "
            f"q={q:.4g} with the {accountant} accountant: even noise multiplier "
            f"{MAX_NOISE_MULTIPLIER:g} spends ε={floor:.4g}. {advice}"
        )
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=target,
                    target_delta=delta,
                    sample_rate=q,
                    steps=steps,
                    accountant=accountant,
                )
            )
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise ConfigError(
            f"target ε={target:g} (δ={delta:g}) is unreachable for {steps} steps at sample rate "
            f"q={q:.4g} ({exc}). {advice}"
        ) from exc
    if sigma > MAX_NOISE_MULTIPLIER:
        raise ConfigError(
            f"target ε={target:g} (δ={delta:g}) for {steps} steps at q={q:.4g} needs noise "
            f"multiplier {sigma:.4g}, above the sane maximum {MAX_NOISE_MULTIPLIER:g}. {advice}"
        )
    return sigma


def check_delta(delta: float, n_records: int, site: str) -> None:
    """Refuse a δ that is not below 1/n for a site's dataset of ``n_records``.

    With δ >= 1/n, "release one random record in the clear" satisfies
    (0, δ)-DP, so such a guarantee protects nobody.

    Parameters
    ----------
    delta : float
        Proposed δ.
    n_records : int
        Number of records at the site (the privacy unit's population).
    site : str
        Site name, for the message.

    Raises
    ------
    ConfigError
        If δ >= 1/n; the message names the site, n and the admissible range.
    """
    delta = _check_delta(delta)
    n = int(n_records)
    if n < 1:
        raise ConfigError(f"site {site!r} has no records (n={n_records!r}); cannot account DP")
    if delta >= 1.0 / n:
        raise ConfigError(
            f"δ={delta:g} is too large for site {site!r}: it has n={n} records, and δ must be "
            f"below 1/n = {1.0 / n:.3g} (a common choice is at most 1/(10·n) = {0.1 / n:.3g}). "
            f"Lower `privacy.dp.delta` in the experiment."
        )


class PrivacyAccountant:
    """Stateful accountant of one (site, dataset, experiment).

    Composes every DP-SGD phase of an experiment tightly (one Opacus
    accountant over the whole history). Persist it with ``to_dict`` after each
    round and restore it with ``from_dict`` so a restarted site resumes its
    spend instead of starting from zero.

    Parameters
    ----------
    site, dataset, experiment : str
        What is being accounted.
    accountant : {"rdp", "prv"}
        Which Opacus accountant composes the history.
    history : list of (noise_multiplier, sample_rate, steps), optional
        Phases already spent.
    """

    def __init__(
        self,
        site: str,
        dataset: str,
        experiment: str,
        accountant: str = "rdp",
        history: Iterable[Sequence[float]] = (),
    ) -> None:
        self.site = site
        self.dataset = dataset
        self.experiment = experiment
        self.accountant = _check_accountant(accountant)
        self._history: list[Step] = []
        for h in history:
            self._append(self._history, *h)

    @staticmethod
    def _append(history: list[Step], noise_multiplier: float, sample_rate: float, steps: float):
        sigma, q, n = _check_step(noise_multiplier, sample_rate, steps)
        if n == 0:
            return
        if history and history[-1][0] == sigma and history[-1][1] == q:
            history[-1] = (sigma, q, history[-1][2] + n)
        else:
            history.append((sigma, q, n))

    @property
    def history(self) -> list[Step]:
        """Phases spent so far, as ``(noise_multiplier, sample_rate, steps)``."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Total number of steps spent."""
        return sum(s for _, _, s in self._history)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` DP-SGD steps with noise σ and sample rate q.

        Parameters
        ----------
        noise_multiplier : float
            σ of these steps.
        sample_rate : float
            q of these steps.
        num_steps : int
            How many steps ran (every Poisson batch counts, empty ones too).
        """
        self._append(self._history, noise_multiplier, sample_rate, num_steps)

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta``.

        Parameters
        ----------
        delta : float
            Target δ.

        Returns
        -------
        float
        """
        return epsilon_for_history(self._history, delta, self.accountant)

    def project(
        self, noise_multiplier: float, sample_rate: float, num_steps: int, delta: float
    ) -> float:
        """ε after ``num_steps`` more hypothetical steps; the state is not changed.

        Parameters
        ----------
        noise_multiplier, sample_rate, num_steps
            The steps a round would run.
        delta : float
            Target δ.

        Returns
        -------
        float
        """
        history = list(self._history)
        self._append(history, noise_multiplier, sample_rate, num_steps)
        return epsilon_for_history(history, delta, self.accountant)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe snapshot (``from_dict`` restores it).

        Returns
        -------
        dict
        """
        return {
            "version": 1,
            "site": self.site,
            "dataset": self.dataset,
            "experiment": self.experiment,
            "accountant": self.accountant,
            "history": [[s, q, n] for s, q, n in self._history],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PrivacyAccountant:
        """Restore an accountant saved by ``to_dict``.

        Parameters
        ----------
        state : dict
            The snapshot.

        Returns
        -------
        PrivacyAccountant

        Raises
        ------
        ConfigError
            If the snapshot is malformed.
        """
        try:
            version = state.get("version", 1)
            if version != 1:
                raise ConfigError(f"privacy accountant state has unknown version {version!r}")
            return cls(
                site=str(state["site"]),
                dataset=str(state["dataset"]),
                experiment=str(state["experiment"]),
                accountant=str(state.get("accountant", "rdp")),
                history=[tuple(h) for h in state["history"]],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"privacy accountant state is malformed ({type(exc).__name__}: {exc}); it needs "
                "site, dataset, experiment, accountant and history [[σ, q, steps], ...]. "
                "Restore it from the site's privacy ledger or start the experiment afresh."
            ) from exc

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(site={self.site!r}, dataset={self.dataset!r}, "
            f"experiment={self.experiment!r}, accountant={self.accountant!r}, "
            f"history={self._history!r})"
        )
