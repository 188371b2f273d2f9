"""A site's differential-privacy plan for one experiment, fixed before any training.

The plan turns the experiment's ``[privacy.dp]`` section and the site's data size
into the numbers the accountant charges: the noise multiplier σ, the sampling rate
q and the number of steps per round. The CLI's pre-flight computes it for every
site (so an impossible plan fails before training) and each site computes it
again before every round (a real site trusts nobody else's arithmetic).

Record mode (DP-SGD)
    q = 1 / ceil(n / batch_size) and steps per round = min(local_epochs x
    steps per epoch, max_steps), or ``local_steps`` when the experiment fixes them,
    exactly as Opacus's Poisson loader runs them.
    With ``target_epsilon`` the site calibrates σ so that *all planned rounds*
    together spend at most that ε.

Site mode (site-level DP)
    Each round the site releases its clipped update plus a noise share of std
    σ·C/sqrt(k). Whoever sees that single update (the coordinator, while updates
    travel in the clear) sees a Gaussian mechanism of multiplier σ/sqrt(k) with
    sensitivity C, one step per round, no subsampling (the site knows it was
    asked). That is what the site charges its own ledger; the coordinator
    separately accounts the aggregate's site-level ε (multiplier σ·sqrt(m/k)).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedhealth.errors import ConfigError
from fedhealth.privacy.dp.accounting import (
    MAX_NOISE_MULTIPLIER,
    check_delta,
    epsilon_spent,
    noise_for_target,
)
from fedhealth.privacy.dp.local import sample_rate, steps_per_epoch


@dataclass(frozen=True)
class DPPlan:
    """What one site will spend in one experiment, per round and in total.

    Attributes
    ----------
    site : str
        The site.
    mode : {"record", "site"}
        Record-level DP-SGD or site-level DP; also the ledger's ``kind``.
    noise_multiplier : float
        σ the site's accountant charges with (site mode: σ/sqrt(expected_sites)).
    sample_rate : float
        q of each step (1.0 in site mode).
    steps_per_round : int
        Steps one round runs (site mode: 1 release per round).
    rounds : int
        Planned rounds of the experiment.
    delta : float
        δ of the guarantee.
    accountant : {"rdp", "prv"}
        Accountant that composes the steps.
    n_records : int
        The site's training records (the population δ must be small against).
    calibrated : bool
        Whether σ was calibrated from ``target_epsilon`` (else given).
    """

    site: str
    mode: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    delta: float
    accountant: str
    n_records: int
    calibrated: bool = False

    @property
    def planned_steps(self) -> int:
        """Steps of the whole experiment (every round, every local step)."""
        return self.steps_per_round * self.rounds

    def planned_epsilon(self) -> float:
        """ε of the whole plan, from a fresh start, with the plan's accountant."""
        return epsilon_spent(
            self.noise_multiplier, self.sample_rate, self.planned_steps, self.delta, self.accountant
        )


def local_steps_per_round(training: dict[str, Any], n_records: int) -> int:
    """DP-SGD steps one round runs at a site: every Poisson batch of every local epoch
    (or exactly ``local_steps`` of them).

    Parameters
    ----------
    training : dict
        The experiment's ``[training]`` section.
    n_records : int
        The site's training records.

    Returns
    -------
    int
    """
    fixed = training.get("local_steps")
    if fixed:
        return int(fixed)
    steps = int(training["local_epochs"]) * steps_per_epoch(n_records, int(training["batch_size"]))
    cap = training.get("max_steps")
    return min(steps, int(cap)) if cap else steps


@lru_cache(maxsize=256)
def _calibrated_sigma(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    return noise_for_target(target, delta, q, steps, accountant)


def _cached_sigma(
    target: float, delta: float, q: float, steps: int, accountant: str, cache: Path | None
) -> float:
    """:func:`_calibrated_sigma`, remembered in ``cache`` (a JSON file) across processes.

    A deployed site starts a process per message, and the calibration's search costs about
    a second each time. A cached σ is used only if the accountant confirms it still meets
    ``target`` (one evaluation), so an edited cache can never make a plan spend more than
    its target; anything unreadable is recomputed.
    """
    if cache is None:
        return _calibrated_sigma(target, delta, q, steps, accountant)
    key = json.dumps([target, delta, q, steps, accountant])
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    sigma = known.get(key) if isinstance(known, dict) else None
    if (
        isinstance(sigma, (int, float))
        and 0 < sigma <= MAX_NOISE_MULTIPLIER
        and epsilon_spent(float(sigma), q, steps, delta, accountant) <= target * (1 + 1e-9)
    ):
        return float(sigma)
    sigma = _calibrated_sigma(target, delta, q, steps, accountant)
    known = known if isinstance(known, dict) else {}
    known[key] = sigma
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(known, fh)
        os.replace(tmp, cache)  # atomic: concurrent handlers never see half a file
    except OSError:
        pass  # a cache that cannot be written only costs time
    return sigma


def plan_for_site(
    dp: Any,
    training: Any,
    rounds: int,
    n_records: int,
    site: str,
    cache: Path | None = None,
) -> DPPlan:
    """The site's DP plan, or a ConfigError naming the key, the site and what to change.

    Parameters
    ----------
    dp : DPSection or dict
        The experiment's ``[privacy.dp]`` section (``ExperimentConfig.dp_spec()``),
        DP enabled.
    training : TrainingSection or dict
        The experiment's ``[training]`` section.
    rounds : int
        Planned rounds.
    n_records : int
        The site's training records.
    site : str
        The site's name, for messages.
    cache : Path, optional
        JSON file remembering calibrated noise multipliers across processes (the site's
        workspace); each cached value is re-checked by the accountant before use.

    Returns
    -------
    DPPlan

    Raises
    ------
    ConfigError
        δ not below 1/n at this site; a target ε the planned steps cannot reach
        (stating the smallest feasible ε); a plan with no steps.
    """
    dp = dp.model_dump() if hasattr(dp, "model_dump") else dp  # a protocol section, or a dict
    training = training.model_dump() if hasattr(training, "model_dump") else training
    delta, accountant = float(dp["delta"]), str(dp["accountant"])
    if dp["mode"] == "site":
        k = int(dp["expected_sites"])
        sigma = float(dp["site_noise_multiplier"]) / math.sqrt(k)
        return DPPlan(site, "site", sigma, 1.0, 1, int(rounds), delta, accountant, n_records)
    check_delta(delta, n_records, site)
    batch = int(training["batch_size"])
    q = sample_rate(n_records, batch)
    per_round = local_steps_per_round(training, n_records)
    steps = per_round * int(rounds)
    where = (
        f"site {site!r} (n={n_records} training records, batch_size {batch}: sample rate "
        f"q={q:.4g}; {rounds} rounds x {per_round} local steps = {steps} DP-SGD steps)"
    )
    if dp.get("noise_multiplier") is not None:
        sigma = float(dp["noise_multiplier"])
        return DPPlan(
            site, "record", sigma, q, per_round, int(rounds), delta, accountant, n_records
        )
    target = float(dp["target_epsilon"])
    try:
        sigma = _cached_sigma(target, delta, q, steps, accountant, cache)
    except ConfigError as exc:
        floor = epsilon_spent(MAX_NOISE_MULTIPLIER, q, max(steps, 1), delta, accountant)
        raise ConfigError(
            f"key `privacy.dp.target_epsilon` = {target:g} is unreachable at {where}: the "
            f"smallest feasible ε for this plan is about {floor:.3g} (at noise multiplier "
            f"{MAX_NOISE_MULTIPLIER:g}, beyond which nothing is learnt). Raise "
            "`privacy.dp.target_epsilon`, or lower `experiment.rounds`, `training.local_epochs`, "
            f"`training.max_steps` or `training.local_steps`, or the batch size. ({exc})"
        ) from None
    return DPPlan(
        site, "record", sigma, q, per_round, int(rounds), delta, accountant, n_records, True
    )
