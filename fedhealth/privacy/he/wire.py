"""How encrypted aggregation travels in Flower messages (shared by sites and coordinator).

One round of encrypted aggregation uses three kinds of records:

* the **round announcement**: keys ``he-*`` added to the training ``ConfigRecord`` - the
  experiment id of this run, the round, a fresh nonce, the public weight scale, which reply
  metric weights the mean (the strategy's ``weighted_by_key``) and the experiment's
  ``min_sites`` (:class:`HERound`);
* a site's **contribution** in its train reply: ``ConfigRecord`` ``"he-contribution"`` with
  the signed :class:`~fedhealth.privacy.he.records.Contribution` (JSON) and the
  ciphertext chunks (``list[bytes]``) - instead of plaintext weights;
* the **decryption request** (message type ``"query.decrypt"``): ``ConfigRecord``
  ``"he-request"`` with the claimed contributions (JSON) and the summed chunks; the answer
  is an ``ArrayRecord`` ``"he-aggregate"`` holding ``[sum_i w_i u_i..., sum_i w_i]``.

Everything else of the protocol (checks, signatures, tags) lives in the modules of
``fedhealth.privacy.he`` (see its docstring).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord

from fedhealth.errors import CryptoError
from fedhealth.privacy.he.names import (
    ANSWER_ARRAY,
    ANSWER_RECORD,
    CONTRIBUTION_RECORD,
    DECRYPT_ACTION,
    DECRYPT_MESSAGE_TYPE,
    IDENTIFY_ACTION,
    IDENTIFY_MESSAGE_TYPE,
    REQUEST_RECORD,
)
from fedhealth.privacy.he.records import Contribution, DecryptionRequest

__all__ = [
    "ANSWER_ARRAY",
    "ANSWER_RECORD",
    "CONTRIBUTION_RECORD",
    "DECRYPT_ACTION",
    "DECRYPT_MESSAGE_TYPE",
    "IDENTIFY_ACTION",
    "IDENTIFY_MESSAGE_TYPE",
    "REQUEST_RECORD",
    "HERound",
    "contribution_record",
    "read_contribution",
    "read_request",
    "request_record",
]


@dataclass(frozen=True)
class HERound:
    """The encrypted-aggregation part of one round's training config.

    Attributes
    ----------
    experiment_id
        Unique id of this attempt at running the experiment
        (``<experiment>:<MLflow run id>:<random>``): contributions and sums of another run,
        attempt or experiment are refused.
    round
        The round number.
    nonce
        Fresh random nonce of the round (from ``secrets``).
    weight_scale
        Public divisor of the sites' weights (``w = weight / weight_scale``).
    weight_key
        The reply metric a site weights its update by (``num-examples``, ``site-weight``).
    min_sites
        The experiment's ``min_sites``; a site decrypts only sums of at least
        ``max(min_sites, its own floor, 2)`` contributions.
    cohort
        With ``privacy.he.bind_cohort``: the sorted names of the sites sampled for the
        round; each signs it and decrypts only a sum of exactly these sites.
    """

    experiment_id: str
    round: int
    nonce: str
    weight_scale: float
    weight_key: str
    min_sites: int
    cohort: tuple[str, ...] | None = None

    @property
    def experiment(self) -> str:
        """The experiment name part of :attr:`experiment_id`."""
        return self.experiment_id.split(":", 1)[0]

    def to_config(self) -> dict[str, Any]:
        """The ``he-*`` keys to add to the round's training ``ConfigRecord``."""
        return {
            "he-enabled": True,
            "he-experiment": self.experiment_id,
            "he-round": self.round,
            "he-nonce": self.nonce,
            "he-weight-scale": float(self.weight_scale),
            "he-weight-key": self.weight_key,
            "he-min-sites": int(self.min_sites),
            "he-cohort": json.dumps(None if self.cohort is None else list(self.cohort)),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HERound | None:
        """Read the announcement; ``None`` if the round is not encrypted.

        Raises
        ------
        CryptoError
            The round is encrypted but the announcement is incomplete or malformed.
        """
        if not config.get("he-enabled"):
            return None
        try:
            cohort = json.loads(str(config.get("he-cohort") or "null"))
            return cls(
                cohort=None if cohort is None else tuple(str(s) for s in cohort),
                experiment_id=str(config["he-experiment"]),
                round=int(config["he-round"]),
                nonce=str(config["he-nonce"]),
                weight_scale=float(config["he-weight-scale"]),
                weight_key=str(config["he-weight-key"]),
                min_sites=int(config["he-min-sites"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CryptoError(
                f"the round's encrypted-aggregation announcement is incomplete ({exc!r}); "
                "the coordinator and this site run different fedhealth versions"
            ) from None


def contribution_record(chunks: Sequence[bytes], contribution: Contribution) -> ConfigRecord:
    """A site's encrypted update as a ``ConfigRecord`` (ciphertexts as bytes)."""
    return ConfigRecord(
        {"contribution": json.dumps(contribution.to_dict()), "chunks": list(chunks)}
    )


def read_contribution(record: Any, *, where: str) -> tuple[list[bytes], Contribution]:
    """Inverse of :func:`contribution_record`.

    Parameters
    ----------
    record
        The ``"he-contribution"`` record of a reply (``None`` if the reply has none).
    where
        Who sent it, for the error message.

    Raises
    ------
    CryptoError
        Missing or malformed record.
    """
    if record is None:
        raise CryptoError(
            f"{where} sent no encrypted contribution although the round is encrypted "
            "(plaintext weights are not accepted)"
        )
    try:
        raw = record["chunks"]
        chunks = [raw] if isinstance(raw, bytes) else [bytes(c) for c in raw]
        contribution = Contribution.from_dict(json.loads(str(record["contribution"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise CryptoError(f"{where} sent a malformed encrypted contribution ({exc!r})") from None
    return chunks, contribution


def request_record(request: DecryptionRequest) -> ConfigRecord:
    """A decryption request as a ``ConfigRecord``."""
    d = request.to_dict()
    return ConfigRecord(
        {
            "experiment_id": d["experiment_id"],
            "round": d["round"],
            "nonce": d["nonce"],
            "contributions": json.dumps(d["contributions"]),
            "sum_chunks": list(d["sum_chunks"]),
        }
    )


def read_request(record: Any) -> DecryptionRequest:
    """Inverse of :func:`request_record`.

    Raises
    ------
    CryptoError
        Missing or malformed record.
    """
    if record is None:
        raise CryptoError("the decryption query carries no 'he-request' record")
    try:
        raw = record["sum_chunks"]
        d = {
            "experiment_id": record["experiment_id"],
            "round": record["round"],
            "nonce": record["nonce"],
            "contributions": json.loads(str(record["contributions"])),
            "sum_chunks": [raw] if isinstance(raw, bytes) else list(raw),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise CryptoError(f"malformed decryption request ({exc!r})") from None
    return DecryptionRequest.from_dict(d)
