"""One site's side of a round: check the request, train, package the update.

The steps are separate so that the privacy layers slot in where the design
says (docs/architecture.md): the policy and ledger check before training
(:class:`~fedhealth.site.privacy_guard.PrivacyGuard`), DP-SGD around the
optimiser, site-level noise when the update is packaged, and the ledger charge
before the reply is built; encryption comes later.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedhealth.config.site import SiteProfile
from fedhealth.data.normalisation import Standardizer
from fedhealth.errors import DataError, FedHealthError
from fedhealth.models import build_model
from fedhealth.privacy.dp.randomness import training_seed
from fedhealth.privacy.dp.release import release_evaluation, release_mean_loss, release_moments
from fedhealth.protocol import Metric
from fedhealth.site.dataset import SiteData, load_site_data, standardizer_for
from fedhealth.site.privacy_guard import PrivacyGuard, _with_rule
from fedhealth.site.refusals import data_refusal
from fedhealth.site.request import SiteRequest
from fedhealth.site.split_pins import check_split
from fedhealth.site.timing import phase
from fedhealth.site.trainer import evaluate, train_local

__all__ = ["SiteRequest", "SiteRuntime"]


class SiteRuntime:
    """A site's data, model and training for one experiment.

    Parameters
    ----------
    profile : SiteProfile
        The site's profile.
    request : SiteRequest
        The round's request, parsed once by the ClientApp.
    """

    def __init__(self, profile: SiteProfile, request: SiteRequest) -> None:
        self.profile = profile
        self.request = request
        self.spec = request.spec
        self.task = request.spec.task
        self.guard = PrivacyGuard(
            profile, request.experiment, request.round, request.spec, he_enabled=request.he_enabled
        )
        self.guard.check_participation("requests")  # before its data is even read
        # The site owns its splits: the task's split seed, test fraction and schema must be
        # the ones pinned for this dataset (refused before any data is read).
        check_split(profile, self.task, request.experiment)
        with phase("load"):
            try:
                self.data: SiteData = load_site_data(profile, self.task)
            except DataError as exc:
                raise data_refusal(profile, self.task.dataset, exc, request.audit_info()) from None
        self._norm: Standardizer | None = None
        torch.set_num_threads(1)  # sites share cores in simulation; avoid oversubscription

    # -- inputs -------------------------------------------------------------------------------

    @property
    def norm(self) -> Standardizer | None:
        """The site's normaliser (built on first use: a statistics query needs none)."""
        if self._norm is None and self.task.normalisation != "none":
            with phase("load"):
                self._norm = standardizer_for(
                    self.data, self.task.normalisation, self.request.norm_stats
                )
        return self._norm

    def _x(self, x: np.ndarray) -> np.ndarray:
        norm = self.norm
        with phase("load"):
            return norm.transform(x).astype(np.float32) if norm else x

    def build_model(self, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
        """The experiment's model, loaded with the global weights ``arrays`` (by name)."""
        spec = self.spec
        model = build_model(spec.model, self.data.input_dim, self.task.num_classes, spec.seed)
        expected = model.state_dict()
        if set(expected) != set(arrays) or any(
            tuple(expected[k].shape) != tuple(arrays[k].shape) for k in expected
        ):
            raise FedHealthError(
                f"site {self.profile.name!r}, round {self.request.round}: the global model's "
                f"tensors do not fit model {spec.model.name!r} with input width "
                f"{self.data.input_dim} here; check the experiment's schema against this site"
            )
        model.load_state_dict({k: torch.as_tensor(np.asarray(a)) for k, a in arrays.items()})
        return model

    # -- the round ----------------------------------------------------------------------------

    def train(
        self, arrays: dict[str, np.ndarray], site_index: int
    ) -> tuple[dict[str, np.ndarray], dict]:
        """Train locally from the global weights; return new weights and metrics.

        With DP on, the round is admitted by the site's policy and ledger first, and
        its ε is charged to the ledger (committed and fsynced) before this returns.
        """
        guard = self.guard
        guard.check_split_size("training", self.data.n_train)
        with phase("privacy"):
            admission = guard.admit(self.data.n_train, self.request.proximal_mu)
            # Seeds include the run id and round nonce: a replay under a new run differs.
            run, nonce = self.request.run_id, self.request.nonce
            context = (
                guard.release_context(arrays, self.data.x_train, self.data.y_train, run, nonce)
                if guard.enabled
                else {}
            )
        seed = training_seed(self.spec.seed, self.request.round, site_index, run, nonce)
        x = self._x(self.data.x_train)
        with phase("train"):
            model = self.build_model(arrays)
            result = train_local(
                model,
                x,
                self.data.y_train,
                self.spec.training,
                seed=seed,
                proximal_mu=self.request.proximal_mu,
                wrap=guard.dp_sgd(admission, context) if guard.mode == "record" else None,
            )
            new = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        if guard.mode == "site":
            with phase("privacy"):
                new = guard.privatise_update(new, arrays, context)
        metrics = {
            Metric.NUM_EXAMPLES: self.data.n_train,
            # The aggregation weight; n for FedAvg, n ** alpha for BalancedFedAvg. Site-level
            # DP needs the plain mean of clipped updates: every site weighs 1.
            Metric.SITE_WEIGHT: 1.0
            if guard.mode == "site"
            else float(self.data.n_train) ** self.request.weight_exponent,
            Metric.LOCAL_STEPS: result.steps,
            Metric.SKIPPED_FILES: len(self.data.skipped),  # a count only, never the names
        }
        with phase("privacy"):
            metrics.update(guard.charge(admission, result.steps))  # durable before any reply
            release = guard.metrics_release
            if release == "exact":
                metrics[Metric.TRAIN_LOSS] = result.loss
            elif release == "dp":
                # The loss of the trained model on the training split, per record clamped,
                # noised and charged (the running loss of training has no bounded sensitivity).
                losses = self._losses(model, x, self.data.y_train)
                rng = guard.noise_rng("train-loss-noise", self._release_context(arrays))
                pol = guard.policy
                loss, std = release_mean_loss(
                    losses, pol.metrics_loss_bound, pol.metrics_noise_multiplier, rng
                )
                charged = guard.charge_release(pol.metrics_noise_multiplier, "its training loss")
                metrics.update({Metric.TRAIN_LOSS: loss, Metric.LOSS_NOISE_STD: std})
                metrics[Metric.EPSILON] = charged[Metric.EPSILON]
                metrics[Metric.EPSILON_ROUND] = (
                    metrics.get(Metric.EPSILON_ROUND, 0.0) + charged[Metric.EPSILON_ROUND]
                )
            else:
                metrics[Metric.WITHHELD] = 1.0
        return new, metrics

    def _release_context(self, arrays: dict[str, np.ndarray]) -> dict:
        """What a metric release's noise seed depends on (with the site's secret key)."""
        return self.guard.release_context(
            arrays, self.data.x_test, self.data.y_test, self.request.run_id, self.request.nonce
        )

    @staticmethod
    @torch.no_grad()
    def _losses(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-record cross-entropy of ``model`` on ``(x, y)``."""
        model.eval()
        out = model(torch.as_tensor(x, dtype=torch.float32))
        return torch.nn.functional.cross_entropy(out, torch.as_tensor(y), reduction="none").numpy()

    def test_inputs(self) -> np.ndarray:
        """The test split as the registered model sees it (what evaluations score)."""
        # Under ``site`` normalisation the site trains on its own z-scores, but the registered
        # model standardises with the pooled statistics the coordinator sends (a consumer has
        # no site); evaluating with those reports the accuracy the registered model gives.
        pooled = self.request.norm_stats if self.task.normalisation == "site" else None
        if pooled:
            with phase("load"):
                return Standardizer.from_dict(pooled).transform(self.data.x_test)
        return self._x(self.data.x_test)

    def evaluate(self, arrays: dict[str, np.ndarray]) -> dict:
        """Evaluate the global weights on the site's test split, released as the policy says.

        ``"exact"``: loss and accuracy as computed. ``"dp"``: the correct count and the
        clamped loss sum with Gaussian noise, charged to the ledger before this returns.
        ``"withheld"``: only the number of test records (and ``metrics-withheld``).
        """
        guard = self.guard
        release = guard.metrics_release
        n = self.data.n_test
        if release == "withheld":
            return {Metric.NUM_EXAMPLES: n, Metric.WITHHELD: 1.0}
        guard.check_split_size("test", n)
        x = self.test_inputs()
        with phase("evaluate"):
            model = self.build_model(arrays)
            if release == "exact":
                return evaluate(model, x, self.data.y_test)
            losses = self._losses(model, x, self.data.y_test)
            with torch.no_grad():
                pred = model(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy()
        with phase("privacy"):
            pol = guard.policy
            rng = guard.noise_rng("evaluation-noise", self._release_context(arrays))
            noisy = release_evaluation(
                (pred == self.data.y_test).astype(np.float64),
                losses,
                pol.metrics_loss_bound,
                pol.metrics_noise_multiplier,
                rng,
            )
            charged = guard.charge_release(pol.metrics_noise_multiplier, "its evaluation")
        return {
            Metric.LOSS: noisy["loss"],
            Metric.ACCURACY: noisy["accuracy"],
            Metric.NUM_EXAMPLES: n,
            Metric.ACCURACY_NOISE_STD: noisy["accuracy-noise-std"],
            Metric.LOSS_NOISE_STD: noisy["loss-noise-std"],
            **charged,
        }

    def moments(self) -> dict[str, Any]:
        """Noisy per-feature sums and sums of squares of the training split, charged.

        Consortium normalisation: each feature is clamped to its bounds (the schema's
        ``bounds`` for numeric columns, [0, 1] for one-hot columns and image channels), the
        sums get Gaussian noise (policy ``statistics_noise_multiplier``), the release is
        charged to the ledger and recorded as this study's one answer before this returns.
        """
        guard = self.guard
        guard.check_statistics()
        guard.check_split_size("training", self.data.n_train)
        low, high, binary = self._bounds()
        sigma = guard.policy.statistics_noise_multiplier
        rng = guard.noise_rng(
            "statistics-noise",
            {"study": guard.study, **self._release_context({})},
        )
        out = release_moments(self.data.x_train, low, high, sigma, rng, binary)
        charged = guard.charge_release(sigma, "consortium statistics")
        out["dp"] = {
            "epsilon": charged[Metric.EPSILON],
            "epsilon_release": charged[Metric.EPSILON_ROUND],
            "delta": float(self.spec.dp.delta),
            "noise_multiplier": sigma,
        }
        guard.record_statistics({"epsilon": charged[Metric.EPSILON_ROUND]})
        return out

    def _bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-feature clamping bounds of a statistics release, and which features are
        one-hot columns (0 or 1)."""
        if self.task.kind == "image":
            # readers scale every image into [0, 1]
            return np.zeros(1), np.ones(1), np.zeros(1, dtype=bool)
        schema = self.task.schema_
        assert schema is not None
        low, high, missing, binary = [], [], [], []
        for name in schema.feature_names():
            binary.append(name not in schema.numeric)
            if name in schema.numeric:
                lo, hi = schema.bounds.get(name, (None, None))
                if lo is None:
                    missing.append(name)
                    lo, hi = 0.0, 1.0
            else:
                lo, hi = 0.0, 1.0  # one-hot
            low.append(lo)
            high.append(hi)
        if missing:
            raise _with_rule(
                FedHealthError(
                    f"site {self.profile.name!r} refuses the statistics query of experiment "
                    f"{self.request.experiment!r}: numeric columns {missing} have no bounds; "
                    "declare `[task.schema] bounds = {column = [low, high]}` for every numeric "
                    "column (the noise is calibrated to them)"
                ),
                "statistics-bounds",
            )
        return (
            np.asarray(low, dtype=np.float64),
            np.asarray(high, dtype=np.float64),
            np.asarray(binary, dtype=bool),
        )
