"""What the coordinator asks of a site in one message, parsed once from its config record.

Kept apart from :mod:`fedhealth.site.runtime` (which imports torch and the data readers)
so that the ClientApp can read a request before deciding what it has to import. The
ClientApp's audit decorator parses it (:meth:`SiteRequest.from_message`) and hands the
same object to the handler, the runtime and the encrypted reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fedhealth.protocol import (
    PROTOCOL_VERSION,
    AnalysisKey,
    HERound,
    ProtocolError,
    Record,
    RoundConfig,
    TaskSpec,
)


@dataclass(frozen=True)
class SiteRequest:
    """One parsed request to a site (train, evaluate or statistics).

    Parameters
    ----------
    config : RoundConfig
        The request's ``"config"`` record, typed.
    """

    config: RoundConfig

    @classmethod
    def from_message(cls, msg: Any) -> SiteRequest:
        """Parse a Flower message's ``"config"`` record.

        Raises
        ------
        fedhealth.protocol.ProtocolError
            A key is missing or malformed (the error names it).
        """
        content = msg.content
        return cls(RoundConfig.from_record(content.get(Record.CONFIG)))

    @property
    def spec(self) -> TaskSpec:
        """The experiment's task spec."""
        return self.config.spec

    @property
    def experiment(self) -> str:
        """The experiment's name."""
        return self.config.spec.experiment

    @property
    def round(self) -> int:
        """The round (0: the consortium statistics query)."""
        return self.config.server_round

    @property
    def proximal_mu(self) -> float:
        """FedProx's proximal weight (0: none)."""
        return self.config.proximal_mu

    @property
    def weight_exponent(self) -> float:
        """Exponent of the aggregation weight ``n ** alpha`` (BalancedFedAvg)."""
        return self.config.weight_exponent

    @property
    def norm_stats(self) -> dict[str, Any] | None:
        """Consortium normalisation statistics (``mean``, ``std``), if sent."""
        stats = self.config.norm_stats
        return stats.model_dump() if stats is not None else None

    @property
    def he(self) -> HERound | None:
        """The round's encrypted-aggregation announcement (``None``: plaintext)."""
        return self.config.he

    @property
    def he_enabled(self) -> bool:
        """Whether the update must leave encrypted (privacy.he; policy ``require_he``)."""
        return self.config.he is not None

    @property
    def run_id(self) -> str:
        """The coordinator's MLflow run id; with the nonce, part of every seed."""
        return self.config.mlflow_run_id

    @property
    def nonce(self) -> str:
        """The encrypted round's fresh nonce, empty in a plaintext round."""
        return self.config.he.nonce if self.config.he is not None else ""

    @property
    def score_histograms(self) -> bool:
        """Whether the coordinator asks for score histograms (a run's final evaluation)."""
        return self.config.score_histograms

    @property
    def dp_enabled(self) -> bool:
        """Whether the experiment trains with differential privacy."""
        return self.config.spec.dp.enabled

    def audit_info(self) -> dict[str, Any]:
        """What the site's audit log records about the request."""
        info = {
            "round": self.round,
            "experiment": self.experiment,
            "model": self.spec.model.name,
            "dataset": self.spec.task.dataset,
            # The MLflow run, and through it the model version, this round contributes to.
            "mlflow_run": self.config.mlflow_run_id or None,
            "registered_model": self.config.registered_model or None,
            "score_histograms": True if self.config.score_histograms else None,
        }
        return {k: v for k, v in info.items() if v is not None}


@dataclass(frozen=True)
class AnalysisRequest:
    """One parsed analysis request (``query.analysis``): the spec as received.

    The spec stays a plain dict here; the handler validates it with the analysis schema
    (:func:`fedhealth.analytics.site_queries.parse_spec`) so that a bad spec is refused
    with the rule that names the problem.

    Parameters
    ----------
    spec : dict
        The decoded JSON of the ``"analysis"`` record's ``spec`` key.
    """

    spec: dict[str, Any]

    @classmethod
    def from_message(cls, msg: Any) -> AnalysisRequest:
        """Parse a Flower message's ``"analysis"`` record.

        Raises
        ------
        fedhealth.protocol.ProtocolError
            The record or its spec is missing, not JSON, or of another protocol version.
        """
        record = msg.content.get(Record.ANALYSIS)
        if record is None:
            raise ProtocolError("the request carries no `analysis` record", field=Record.ANALYSIS)
        version = record.get(AnalysisKey.PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version!r}, but this fedhealth speaks version "
                f"{PROTOCOL_VERSION}; run the same fedhealth version at the coordinator and "
                "the sites",
                field=AnalysisKey.PROTOCOL_VERSION,
            )
        raw = record.get(AnalysisKey.SPEC)
        try:
            spec = json.loads(str(raw))
        except ValueError:
            spec = None
        if not isinstance(spec, dict):
            raise ProtocolError(
                "analysis key `spec` is missing or not a JSON object", field=AnalysisKey.SPEC
            )
        return cls(spec)

    @property
    def round(self) -> int:
        """Always 0: an analysis is one exchange."""
        return 0

    def audit_info(self) -> dict[str, Any]:
        """What the site's audit log records about the request."""
        name, dataset = self.spec.get("name"), self.spec.get("dataset")
        info = {
            "round": 0,
            "experiment": f"analysis:{name}" if isinstance(name, str) else None,
            "dataset": dataset if isinstance(dataset, str) else None,
        }
        return {k: v for k, v in info.items() if v is not None}
