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
from fedhealth.site.dataset import SiteData, load_site_data, standardizer_for
from fedhealth.site.privacy_guard import PrivacyGuard
from fedhealth.site.request import RoundRequest
from fedhealth.site.timing import phase
from fedhealth.site.trainer import evaluate, train_local

__all__ = ["RoundRequest", "SiteRuntime"]


class SiteRuntime:
    """A site's data, model and training for one experiment.

    Parameters
    ----------
    profile : SiteProfile
        The site's profile.
    request : RoundRequest
        The round's request.
    """

    def __init__(self, profile: SiteProfile, request: RoundRequest) -> None:
        self.profile = profile
        self.request = request
        self.task = request.spec["task"]
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
        if self._norm is None and self.task["normalisation"] != "none":
            with phase("load"):
                self._norm = standardizer_for(
                    self.data, self.task["normalisation"], self.request.norm_stats
                )
        return self._norm

    def _x(self, x: np.ndarray) -> np.ndarray:
        norm = self.norm
        with phase("load"):
            return norm.transform(x).astype(np.float32) if norm else x

    def build_model(self, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
        """The experiment's model, loaded with the global weights ``arrays`` (by name)."""
        spec = self.request.spec
        model = build_model(
            spec["model"], self.data.input_dim, int(self.task["num_classes"]), spec["seed"]
        )
        expected = model.state_dict()
        if set(expected) != set(arrays) or any(
            tuple(expected[k].shape) != tuple(arrays[k].shape) for k in expected
        ):
            raise FedHealthError(
                f"site {self.profile.name!r}, round {self.request.round}: the global model's "
                f"tensors do not fit model {spec['model']['name']!r} with input width "
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
            context = (
                guard.release_context(arrays, self.data.x_train, self.data.y_train)
                if guard.enabled
                else {}
            )
        seed = int(self.request.spec["seed"]) * 100_003 + self.request.round * 1_009 + site_index
        x = self._x(self.data.x_train)
        with phase("train"):
            model = self.build_model(arrays)
            result = train_local(
                model,
                x,
                self.data.y_train,
                self.request.spec["training"],
                seed=seed,
                proximal_mu=self.request.proximal_mu,
                wrap=guard.dp_sgd(admission, context) if guard.mode == "record" else None,
            )
            new = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        if guard.mode == "site":
            with phase("privacy"):
                new = guard.privatise_update(new, arrays, context)
        metrics = {
            "num-examples": self.data.n_train,
            # The aggregation weight; n for FedAvg, n ** alpha for BalancedFedAvg. Site-level
            # DP needs the plain mean of clipped updates: every site weighs 1.
            "site-weight": 1.0
            if guard.mode == "site"
            else float(self.data.n_train) ** self.request.weight_exponent,
            "train-loss": result.loss,
            "local-steps": result.steps,
            "skipped-files": len(self.data.skipped),  # a count only, never the names
        }
        with phase("privacy"):
            metrics.update(guard.charge(admission, result.steps))  # durable before any reply
        return new, metrics

    def evaluate(self, arrays: dict[str, np.ndarray]) -> dict:
        """Evaluate the global weights on the site's test split."""
        x = self._x(self.data.x_test)
        with phase("evaluate"):
            model = self.build_model(arrays)
            return evaluate(model, x, self.data.y_test)

    def moments(self) -> dict[str, Any]:
        """Per-feature sums and counts of the training split (consortium normalisation)."""
        self.guard.check_statistics()
        m = self.data.train_moments()
        return {"count": int(m.count), "sum": m.sum.tolist(), "sumsq": m.sumsq.tolist()}
