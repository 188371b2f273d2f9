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
from fedhealth.errors import FedHealthError
from fedhealth.models import build_model
from fedhealth.privacy.dp.randomness import training_seed
from fedhealth.protocol import Metric
from fedhealth.site.dataset import SiteData, load_site_data, standardizer_for
from fedhealth.site.privacy_guard import PrivacyGuard
from fedhealth.site.request import SiteRequest
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
        with phase("load"):
            self.data: SiteData = load_site_data(profile, self.task)
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
            Metric.TRAIN_LOSS: result.loss,
            Metric.LOCAL_STEPS: result.steps,
            Metric.SKIPPED_FILES: len(self.data.skipped),  # a count only, never the names
        }
        with phase("privacy"):
            metrics.update(guard.charge(admission, result.steps))  # durable before any reply
        return new, metrics

    def evaluate(self, arrays: dict[str, np.ndarray]) -> dict:
        """Evaluate the global weights on the site's test split.

        Under ``site`` normalisation the site trains on its own z-scores, but the registered
        model standardises with the pooled statistics the coordinator sends (a consumer has
        no site); evaluating with those reports the accuracy the registered model gives.
        """
        pooled = self.request.norm_stats if self.task.normalisation == "site" else None
        if pooled:
            with phase("load"):
                x = Standardizer.from_dict(pooled).transform(self.data.x_test)
        else:
            x = self._x(self.data.x_test)
        with phase("evaluate"):
            model = self.build_model(arrays)
            return evaluate(model, x, self.data.y_test)

    def moments(self) -> dict[str, Any]:
        """Per-feature sums and counts of the training split (consortium normalisation)."""
        self.guard.check_statistics()
        m = self.data.train_moments()
        return {"count": int(m.count), "sum": m.sum.tolist(), "sumsq": m.sumsq.tolist()}
