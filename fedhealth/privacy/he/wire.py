"""How encrypted aggregation travels in Flower messages (shared by sites and coordinator).

One round of encrypted aggregation uses three kinds of records:

* the **round announcement**: keys ``he-*`` added to the training ``ConfigRecord`` - the
  experiment id of this run, the round, a fresh nonce, the public weight scale, which reply
  metric weights the mean (the strategy's ``weighted_by_key``) and the experiment's
  ``min_sites`` (:class:`fedhealth.protocol.HERound`, parsed with the rest of the request);
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
from collections.abc import Sequence
from typing import Any

from flwr.app import ConfigRecord

from fedhealth.errors import CryptoError
from fedhealth.privacy.he.records import Contribution, DecryptionRequest
from fedhealth.protocol import HEKey, HERound, MessageKind, Record

# The names as this module has always exported them; they are defined in fedhealth.protocol.
ANSWER_ARRAY = HEKey.ANSWER_ARRAY
ANSWER_RECORD = Record.HE_ANSWER
CONTRIBUTION_RECORD = Record.HE_CONTRIBUTION
DECRYPT_ACTION = MessageKind.DECRYPT_ACTION
DECRYPT_MESSAGE_TYPE = MessageKind.DECRYPT
IDENTIFY_ACTION = MessageKind.IDENTIFY_ACTION
IDENTIFY_MESSAGE_TYPE = MessageKind.IDENTIFY
REQUEST_RECORD = Record.HE_REQUEST

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


def contribution_record(chunks: Sequence[bytes], contribution: Contribution) -> ConfigRecord:
    """A site's encrypted update as a ``ConfigRecord`` (ciphertexts as bytes)."""
    return ConfigRecord(
        {HEKey.CONTRIBUTION: json.dumps(contribution.to_dict()), HEKey.CHUNKS: list(chunks)}
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
        raw = record[HEKey.CHUNKS]
        chunks = [raw] if isinstance(raw, bytes) else [bytes(c) for c in raw]
        contribution = Contribution.from_dict(json.loads(str(record[HEKey.CONTRIBUTION])))
    except (KeyError, TypeError, ValueError) as exc:
        raise CryptoError(f"{where} sent a malformed encrypted contribution ({exc!r})") from None
    return chunks, contribution


def request_record(request: DecryptionRequest) -> ConfigRecord:
    """A decryption request as a ``ConfigRecord``."""
    d = request.to_dict()
    return ConfigRecord(
        {
            HEKey.EXPERIMENT_ID: d["experiment_id"],
            HEKey.ROUND: d["round"],
            HEKey.NONCE: d["nonce"],
            HEKey.CONTRIBUTIONS: json.dumps(d["contributions"]),
            HEKey.SUM_CHUNKS: list(d["sum_chunks"]),
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
        raw = record[HEKey.SUM_CHUNKS]
        d = {
            "experiment_id": record[HEKey.EXPERIMENT_ID],
            "round": record[HEKey.ROUND],
            "nonce": record[HEKey.NONCE],
            "contributions": json.loads(str(record[HEKey.CONTRIBUTIONS])),
            "sum_chunks": [raw] if isinstance(raw, bytes) else list(raw),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise CryptoError(f"malformed decryption request ({exc!r})") from None
    return DecryptionRequest.from_dict(d)
