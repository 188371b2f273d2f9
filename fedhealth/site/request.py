"""What the coordinator asks of a site in one round, parsed from the message's config.

Kept apart from :mod:`fedhealth.site.runtime` (which imports torch and the data readers)
so that the ClientApp can read a request before deciding what it has to import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class RoundRequest:
    """What the coordinator asks of a site in one round."""

    experiment: str
    round: int
    spec: dict[str, Any]
    proximal_mu: float = 0.0
    norm_stats: dict[str, Any] | None = None
    weight_exponent: float = 1.0
    he_enabled: bool = False  # the update must leave encrypted (privacy.he; policy require_he)
    run_id: str = ""  # the coordinator's MLflow run id; with the nonce, part of every seed
    nonce: str = ""  # the encrypted round's fresh nonce (he-nonce), empty in plaintext rounds

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RoundRequest:
        """Parse the ConfigRecord a strategy sent."""
        spec = json.loads(str(config["spec"]))
        stats = config.get("norm-stats")
        return cls(
            experiment=spec["experiment"],
            round=int(config.get("server-round", 0)),
            spec=spec,
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            norm_stats=json.loads(str(stats)) if stats else None,
            weight_exponent=float(config.get("weight-exponent", 1.0)),
            he_enabled=bool(config.get("he-enabled", False)),
            run_id=str(config.get("mlflow-run-id", "") or ""),
            nonce=str(config.get("he-nonce", "") or ""),
        )

    @property
    def dp_enabled(self) -> bool:
        """Whether the experiment trains with differential privacy."""
        return bool((self.spec.get("dp") or {}).get("enabled"))
