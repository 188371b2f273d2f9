"""A site's privacy gate for one round: policy and ledger before training, the charge after.

One round at a site, in this order (docs/privacy.md):

1. :meth:`PrivacyGuard.admit` -- the site computes its own DP plan (σ, q, steps;
   :mod:`fedhealth.privacy.dp.plan`), rebuilds the experiment's accountant from
   its ledger (every earlier charge of this experiment on this dataset, so a
   restarted site resumes its spend), projects the ε after this round and checks
   the request against its policy. A refusal raises ``PolicyViolation``.
2. Training: :meth:`PrivacyGuard.dp_sgd` is the ``wrap`` hook of
   :func:`fedhealth.site.trainer.train_local` (Opacus DP-SGD with the site's
   secret sampling and noise); site mode instead clips and noises the whole
   update (:meth:`PrivacyGuard.privatise_update`).
3. :meth:`PrivacyGuard.charge` -- the ε of the steps actually run is committed and
   fsynced to the ledger. Only then is the reply built; a crash before this point
   releases nothing, a crash after it over-counts at worst.

The ledger's ``experiment`` is the experiment's *name*: every run of an
experiment at a site composes into one accountant history, so a per-experiment
cap cannot be side-stepped by rerunning it. Across experiments, spend adds up
(basic composition) into the dataset's lifetime spend; record- and site-level ε
are both counted against the lifetime budget (a site-level guarantee also bounds
every single record).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedhealth.config.site import SiteProfile
from fedhealth.errors import ConfigError, FedHealthError
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
from fedhealth.privacy.dp.randomness import (
    derive_seed,
    digest_arrays,
    load_or_create_key,
    round_binding,
)
from fedhealth.privacy.dp.site_level import add_noise_share, clip_update
from fedhealth.protocol import SHARE_STATISTICS_RULE, DPSection, Metric, TaskSpec
from fedhealth.site.trainer import Wrap

#: Calibrated noise multipliers remembered across the per-message processes of a site.
CALIBRATION_CACHE = "dp-calibration.json"

#: Which studies' consortium statistics the site released (answered once per study).
STATISTICS_FILE = "statistics-released.json"

#: Models whose per-sample gradients only work on PyTorch's expanded-weights path
#: (in-place tensor ops in ``forward``; see fedhealth.privacy.dp.local).
EW_ONLY_MODELS = ("resnet18",)


@dataclass
class Admission:
    """A round the site agreed to train, and what it will cost.

    Attributes
    ----------
    plan : DPPlan or None
        The site's DP plan (None when DP is off).
    accountant : PrivacyAccountant or None
        The experiment's accountant before this round (restored from the ledger).
    spent_before : float
        The experiment's ε on this dataset before this round (ledger).
    projected : float
        The experiment's ε after this round, if it runs as planned.
    """

    plan: DPPlan | None
    accountant: PrivacyAccountant | None
    spent_before: float = 0.0
    projected: float = math.inf


def _with_rule(exc: FedHealthError, rule: str) -> FedHealthError:
    exc.rule = rule  # type: ignore[attr-defined]  # the site's error reply names it
    return exc


class PrivacyGuard:
    """The privacy side of one request to a site.

    Parameters
    ----------
    profile : SiteProfile
        The site's profile (policy, workspace with ledger and noise key).
    experiment : str
        Experiment name.
    round_ : int
        Round number.
    spec : TaskSpec
        The task spec the coordinator sent (``ExperimentConfig.task_spec``).
    he_enabled : bool
        Whether this round's update leaves encrypted (policy rule ``require_he``).
    """

    def __init__(
        self,
        profile: SiteProfile,
        experiment: str,
        round_: int,
        spec: TaskSpec,
        he_enabled: bool = False,
    ) -> None:
        self.profile = profile
        self.site = profile.name
        self.experiment = experiment
        self.round = int(round_)
        self.spec = spec
        self.dataset = spec.task.dataset
        self.model_name = spec.model.name
        self.dp: DPSection = spec.dp
        self.policy = PrivacyPolicy.from_mapping(profile.privacy)
        self.he_enabled = he_enabled
        self.grad_sample_mode: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether the experiment trains with DP."""
        return self.dp.enabled

    @property
    def mode(self) -> str | None:
        """``"record"``, ``"site"`` or None (DP off)."""
        return self.dp.mode if self.enabled else None

    # -- checks that spend nothing -----------------------------------------------------------

    def check_participation(self, what: str) -> None:
        """Refuse requests of experiments or models the site does not take part in."""
        check_participation(self.policy, self.site, self.experiment, self.model_name, what)

    def check_statistics(self) -> None:
        """Refuse a statistics query unless the site shares (noisy) training-split sums,
        and refuse a second query of the same study (rule ``statistics-once``)."""
        self.check_participation("the statistics query")
        if not self.policy.share_statistics:
            raise PolicyViolation(
                f"site {self.site!r} refuses the statistics query of experiment "
                f"{self.experiment!r}: its policy does not share per-feature sums "
                '(`privacy.share_statistics = false`). Use `task.normalisation = "site"` or '
                '"none", or ask the site operator to allow it.',
                rule=SHARE_STATISTICS_RULE,
                site=self.site,
                cap=False,
                value=True,
            )
        if self.study in self._answered():
            raise PolicyViolation(
                f"site {self.site!r} refuses the statistics query of experiment "
                f"{self.experiment!r}: it already answered this study's statistics query "
                "once (a study's statistics are released once). Reuse the consortium "
                "statistics of the first run.",
                rule="statistics-once",
                site=self.site,
                cap=1,
                value=2,
            )

    @property
    def study(self) -> str:
        """The study a statistics answer belongs to: the SHA-256 of the task spec."""
        return self.spec.digest()

    def _answered(self) -> dict:
        path = self.profile.workspace / STATISTICS_FILE
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            raise _with_rule(
                FedHealthError(
                    f"site {self.site!r}: {path} cannot be read; restore it from a backup "
                    "(it records which studies' statistics the site released)"
                ),
                "statistics-once",
            ) from None
        return data if isinstance(data, dict) else {}

    def record_statistics(self, entry: dict) -> None:
        """Record that this study's statistics were released (before the reply is built)."""
        path = self.profile.workspace / STATISTICS_FILE
        data = self._answered()
        data[self.study] = {"experiment": self.experiment, "dataset": self.dataset, **entry}
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    # -- releases of metrics and statistics (Gaussian mechanism, charged) ----------------------

    @property
    def metrics_release(self) -> str:
        """``"dp"``, ``"withheld"`` or ``"exact"`` for this dataset (``release_metrics``)."""
        return self.policy.metrics_release(self.dataset)

    def check_split_size(self, split: str, n: int) -> None:
        """Refuse computing on a split smaller than ``privacy.min_split_records``."""
        if self.policy.applies_to(self.dataset):
            from fedhealth.site.split_pins import check_split_size

            check_split_size(self.profile, self.dataset, split, n, self.policy.min_split_records)

    def noise_rng(self, purpose: str, context: dict) -> np.random.Generator:
        """A generator seeded by the site's secret key, for one release's noise."""
        key = load_or_create_key(self.profile.noise_key_path)
        return np.random.default_rng(derive_seed(key, purpose, context))

    def charge_release(self, noise_multiplier: float, what: str) -> dict[str, float]:
        """Charge one Gaussian-mechanism release (σ, q = 1, 1 step) to the ledger.

        The release composes with the experiment's record-level history in the site's
        accountant (experiment's δ and accountant); the site's ε caps are checked first.
        Committed and fsynced before this returns: call it before the reply is built.

        Parameters
        ----------
        noise_multiplier : float
            σ of the release (noise std / L2 sensitivity).
        what : str
            What is released, for a refusal's message.

        Returns
        -------
        dict
            ``epsilon`` (the experiment's record-level ε at this site after the release) and
            ``epsilon-round`` (what this release added).

        Raises
        ------
        PolicyViolation
            The release would pass ``max_epsilon_per_experiment`` or the lifetime budget.
        """
        from fedhealth.privacy.dp.release import RELEASE_SAMPLE_RATE, RELEASE_STEPS

        delta, accountant = float(self.dp.delta), self.dp.accountant
        sigma = float(noise_multiplier)
        with self._ledger() as ledger:
            history = [
                (e.noise_multiplier, e.sample_rate, e.steps)
                for e in ledger.entries(self.dataset)
                if e.experiment == self.experiment and e.kind == "record"
            ]
            before = ledger.spent_in_experiment(self.dataset, self.experiment, "record")
            lifetime = ledger.spent(self.dataset, "record") + ledger.spent(self.dataset, "site")
            acc = PrivacyAccountant(
                self.site, self.dataset, self.experiment, accountant, history=history
            )
            total = max(acc.project(sigma, RELEASE_SAMPLE_RATE, RELEASE_STEPS, delta), before)
            if self.policy.applies_to(self.dataset):
                self._check_release_caps(what, total, lifetime - before)
            ledger.charge(
                dataset=self.dataset,
                experiment=self.experiment,
                round=self.round,
                epsilon_increment=total - before,
                epsilon_experiment_total=total,
                delta=delta,
                noise_multiplier=sigma,
                sample_rate=RELEASE_SAMPLE_RATE,
                steps=RELEASE_STEPS,
                accountant=accountant,
                kind="record",
            )
        return {Metric.EPSILON: total, Metric.EPSILON_ROUND: total - before}

    def _check_release_caps(self, what: str, total: float, other: float) -> None:
        who = f"site {self.site!r} refuses to release {what} of experiment {self.experiment!r}"
        cap = self.policy.max_epsilon_per_experiment
        if cap is not None and total > cap:
            raise PolicyViolation(
                f"{who}: it would bring the experiment's ε on dataset {self.dataset!r} to "
                f"{total:.4g}, above `privacy.max_epsilon_per_experiment` = {cap:g}",
                rule="max_epsilon_per_experiment",
                site=self.site,
                cap=cap,
                value=total,
            )
        budget = self.policy.lifetime_epsilon_budget
        if budget is not None and other + total > budget:
            raise PolicyViolation(
                f"{who}: it would bring dataset {self.dataset!r} to ε {other + total:.4g}, "
                f"above `privacy.lifetime_epsilon_budget` = {budget:g}",
                rule="lifetime_epsilon_budget",
                site=self.site,
                cap=budget,
                value=other + total,
            )

    # -- before training -----------------------------------------------------------------------

    def plan(self, n_train: int) -> DPPlan:
        """This site's DP plan for the experiment (ConfigError names key and site)."""
        try:
            return plan_for_site(
                self.dp, self.spec.training, self.spec.rounds, n_train, self.site,
                cache=self.profile.workspace / CALIBRATION_CACHE,
            )  # fmt: skip
        except ConfigError as exc:
            raise _with_rule(exc, "dp_plan") from None

    def admit(self, n_train: int, proximal_mu: float = 0.0) -> Admission:
        """Check the round against the policy and the ledger before any training.

        Parameters
        ----------
        n_train : int
            The site's training records.
        proximal_mu : float
            FedProx's proximal weight asked for (refused with DP).

        Returns
        -------
        Admission

        Raises
        ------
        PolicyViolation
            A rule of the site's policy refuses the round (``rule`` names it).
        ConfigError
            The DP plan is impossible here (δ >= 1/n, unreachable target ε), or
            FedProx is combined with DP.
        """
        exempt = not self.policy.applies_to(self.dataset)
        if not self.enabled:
            # Without DP the round's ε is unbounded: any ε cap refuses it, so the ledger
            # need not even be read.
            if exempt:
                self.check_participation(f"round {self.round}")
            else:
                check_request(self.policy, self._request(None, math.inf, 0.0))
            return Admission(plan=None, accountant=None)
        if proximal_mu > 0:
            raise _with_rule(
                ConfigError(
                    f"site {self.site!r}, round {self.round}: FedProx (proximal_mu="
                    f"{proximal_mu:g}) cannot be trained with DP-SGD -- its proximal term "
                    "bypasses Opacus's per-sample gradients. Use another strategy with DP."
                ),
                "fedprox_with_dp",
            )
        plan = self.plan(n_train)
        with self._ledger() as ledger:
            history = [
                (e.noise_multiplier, e.sample_rate, e.steps)
                for e in ledger.entries(self.dataset)
                if e.experiment == self.experiment and e.kind == plan.mode
            ]
            before = ledger.spent_in_experiment(self.dataset, self.experiment, plan.mode)
            lifetime = ledger.spent(self.dataset, "record") + ledger.spent(self.dataset, "site")
        acc = PrivacyAccountant(
            self.site, self.dataset, self.experiment, plan.accountant, history=history
        )
        projected = max(
            acc.project(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, plan.delta),
            before,
        )
        if exempt:
            self.check_participation(f"round {self.round}")
        else:
            check_request(self.policy, self._request(plan, projected, lifetime - before))
        return Admission(plan, acc, before, projected)

    def _request(self, plan: DPPlan | None, projected: float, other: float) -> PolicyRequest:
        return PolicyRequest(
            site=self.site,
            dataset=self.dataset,
            experiment=self.experiment,
            round=self.round,
            model=self.model_name,
            dp_enabled=plan is not None,
            noise_multiplier=plan.noise_multiplier if plan else 0.0,
            delta=plan.delta if plan else 0.0,
            projected_epsilon_experiment=projected,
            spent_lifetime_other_experiments=other,
            he_enabled=self.he_enabled,
        )

    def _ledger(self) -> PrivacyLedger:
        try:
            return PrivacyLedger(self.profile.ledger_path)
        except FedHealthError as exc:
            raise _with_rule(exc, "ledger") from None

    # -- training ------------------------------------------------------------------------------

    def release_context(
        self,
        arrays: dict[str, np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        run_id: str | None = None,
        nonce: str | None = None,
    ) -> dict:
        """What this round's release depends on, for deriving its secret seeds.

        The run id and the round's nonce are part of it, so a round replayed under another
        run id or nonce draws fresh noise and fresh batches.
        """
        return {
            "site": self.site,
            "experiment": self.experiment,
            "round": self.round,
            **round_binding(run_id, nonce),
            "spec": self.spec.digest(),
            "weights": digest_arrays(arrays),
            "data": digest_arrays([x, y]),
        }

    def _generator(self, purpose: str, context: dict) -> torch.Generator:
        key = load_or_create_key(self.profile.noise_key_path)
        return torch.Generator().manual_seed(derive_seed(key, purpose, context))

    def dp_sgd(self, admission: Admission, context: dict) -> Wrap:
        """The ``wrap`` hook of ``train_local``: Opacus DP-SGD with the site's secret RNG.

        Parameters
        ----------
        admission : Admission
            From :meth:`admit` (record mode).
        context : dict
            From :meth:`release_context`.

        Returns
        -------
        callable
            ``wrap(model, optimizer, loader) -> PrivateTraining``.
        """
        from fedhealth.privacy.dp.local import make_private

        plan = admission.plan
        assert plan is not None and plan.mode == "record"
        from fedhealth.privacy.dp.bookkeeping import supports

        requested = self.dp.grad_sample_mode

        def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader):
            mode = requested  # book-keeping handles resnet18's in-place ops; Opacus needs ew
            if mode == "auto" and self.model_name in EW_ONLY_MODELS and supports(model):
                mode = "ew"
            secret = DataLoader(
                loader.dataset,
                batch_size=loader.batch_size,
                generator=self._generator("poisson-sampling", context),
            )
            pt = make_private(
                model,
                optimizer,
                secret,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=self.dp.max_grad_norm,
                grad_sample_mode=mode,
                noise_generator=self._generator("dp-sgd-noise", context),
                site=self.site,
            )
            if abs(pt.sample_rate - plan.sample_rate) > 1e-12:
                pt.release()
                raise FedHealthError(
                    f"site {self.site!r}, round {self.round}: Opacus samples at q="
                    f"{pt.sample_rate!r} but the privacy plan charges q={plan.sample_rate!r}; "
                    "refusing to train with an accountant that would be wrong"
                )
            self.grad_sample_mode = pt.grad_sample_mode
            return pt

        return wrap

    def privatise_update(
        self, new: dict[str, np.ndarray], old: dict[str, np.ndarray], context: dict
    ) -> dict[str, np.ndarray]:
        """Site mode: clip the whole update ``new - old`` and add this site's noise share.

        Parameters
        ----------
        new, old : dict of name -> array
            Locally trained and global weights.
        context : dict
            From :meth:`release_context`.

        Returns
        -------
        dict of name -> array
            ``old + clip(new - old) + noise share``, same names, shapes and dtypes.
        """
        names = sorted(new)
        flat = np.concatenate(
            [(new[k].astype(np.float64) - old[k].astype(np.float64)).ravel() for k in names]
        )
        dp = self.dp  # TaskSpec guarantees these in site mode
        assert dp.clip_norm and dp.site_noise_multiplier and dp.expected_sites
        clipped, _ = clip_update(flat, dp.clip_norm)
        key = load_or_create_key(self.profile.noise_key_path)
        rng = np.random.default_rng(derive_seed(key, "site-noise", context))
        noisy = add_noise_share(
            clipped, dp.site_noise_multiplier, dp.clip_norm, dp.expected_sites, rng
        )
        out, i = {}, 0
        for k in names:
            size = new[k].size
            delta = noisy[i : i + size].reshape(new[k].shape)
            out[k] = (old[k].astype(np.float64) + delta).astype(new[k].dtype)
            i += size
        self.grad_sample_mode = "site-level"
        return out

    # -- after training ------------------------------------------------------------------------

    def charge(self, admission: Admission, local_steps: int) -> dict[str, float]:
        """Commit the round's ε to the ledger (fsynced); returns the reply's privacy metrics.

        Call it after training and before the reply is built.

        Parameters
        ----------
        admission : Admission
            From :meth:`admit`.
        local_steps : int
            DP-SGD steps actually run (record mode; site mode releases once per round).

        Returns
        -------
        dict
            ``epsilon`` (the experiment's cumulative ε at this site), ``epsilon-round``,
            ``dp-steps``, ``noise-multiplier``, ``sample-rate``, ``delta``; empty when DP
            is off.
        """
        plan, acc = admission.plan, admission.accountant
        if plan is None or acc is None:
            return {}
        steps = int(local_steps) if plan.mode == "record" else 1
        acc.step(plan.noise_multiplier, plan.sample_rate, steps)
        # Never below what is already recorded (e.g. an earlier run used another δ or accountant).
        total = max(acc.epsilon(plan.delta), admission.spent_before)
        with self._ledger() as ledger:
            ledger.charge(
                dataset=self.dataset,
                experiment=self.experiment,
                round=self.round,
                epsilon_increment=total - admission.spent_before,
                epsilon_experiment_total=total,
                delta=plan.delta,
                noise_multiplier=plan.noise_multiplier,
                sample_rate=plan.sample_rate,
                steps=steps,
                accountant=plan.accountant,
                kind=plan.mode,
            )
        return {
            Metric.EPSILON: total,
            Metric.EPSILON_ROUND: total - admission.spent_before,
            Metric.DP_STEPS: steps,
            Metric.NOISE_MULTIPLIER: plan.noise_multiplier,
            Metric.SAMPLE_RATE: plan.sample_rate,
            Metric.DELTA: plan.delta,
        }
