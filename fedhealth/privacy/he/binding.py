"""The round binding of encrypted aggregation: canonical framing and labels.

Every signed or hashed value of the protocol is framed with :func:`length_prefixed`, and
every round is named by (experiment id, round, nonce). Free of heavy imports, so the ledger,
the records and the tag schedule can share it without depending on each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedhealth.errors import ConfigError, CryptoError

__all__ = [
    "Announcement",
    "HERuleError",
    "check_round_ids",
    "length_prefixed",
    "model_hash",
    "round_label",
]

_ANNOUNCEMENT = b"fedhealth/he-announcement/v1"
_MODEL = b"fedhealth/he-global-model/v1"


class HERuleError(CryptoError):
    """A check of encrypted aggregation failed; ``rule`` names it (e.g. ``he-same-announcement``).

    Parameters
    ----------
    message
        What was wrong and what to do.
    rule
        The rule's name, also shown in the message.
    """

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(f"{message} (rule {rule})")
        self.rule = rule


def length_prefixed(*fields: bytes | str | int) -> bytes:
    """Unambiguous concatenation: each field length-prefixed (4 bytes, big endian).

    Parameters
    ----------
    *fields
        Bytes, text (UTF-8) or integers (their decimal text).

    Returns
    -------
    bytes
        The framed fields, in order.
    """
    out = bytearray()
    for f in fields:
        if isinstance(f, int):
            f = str(f)
        if isinstance(f, str):
            f = f.encode("utf-8")
        out += len(f).to_bytes(4, "big") + f
    return bytes(out)


def round_label(experiment_id: str, round_: int) -> str:
    """How messages name a round: ``experiment 'x', round 3``."""
    return f"experiment {experiment_id!r}, round {round_}"


def check_round_ids(experiment_id: str, round_: int, nonce: str) -> None:
    """Refuse an empty experiment id or nonce, or a round that is not an integer >= 0.

    Raises
    ------
    ConfigError
        Naming the values received.
    """
    if not experiment_id or not isinstance(round_, int) or round_ < 0 or not nonce:
        raise ConfigError(
            f"HE round binding needs a non-empty experiment id, a round >= 0 and a non-empty "
            f"nonce; got experiment {experiment_id!r}, round {round_!r}, nonce {nonce!r}"
        )


def model_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of a model's arrays in canonical order (sorted names).

    Each tensor contributes its name, dtype, shape and C-order bytes, so the same weights give
    the same hash at the coordinator and at every site, and any other weights another hash.
    """
    h = hashlib.sha256(_MODEL)
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name]))
        h.update(length_prefixed(name, a.dtype.str, ",".join(map(str, a.shape))))
        h.update(len(a.data.tobytes()).to_bytes(8, "big"))
        h.update(a.data.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Announcement:
    """What a site was shown for an encrypted round, beyond (experiment id, round, nonce).

    Its :meth:`digest` is signed in every contribution and feeds the tag derivation, so
    sites shown different specs, global models, weight scales, weight keys, ``min_sites``
    or cohorts sign different digests, and a decrypting site refuses a sum that mixes them.

    Attributes
    ----------
    spec_digest
        ``TaskSpec.digest()`` of the round's spec (model, training, DP, HE parameters).
    model_hash
        :func:`model_hash` of the global model the site received.
    weight_scale, weight_key
        The public divisor of the weights and the metric the update is weighted by.
    min_sites
        The experiment's ``min_sites``.
    cohort
        The sorted sites of the round (cohort binding) or ``None``.
    """

    spec_digest: str
    model_hash: str
    weight_scale: float
    weight_key: str
    min_sites: int
    cohort: tuple[str, ...] | None = None

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical framing of every field."""
        cohort: Sequence[str] = ("-",) if self.cohort is None else ("cohort", *self.cohort)
        return hashlib.sha256(
            length_prefixed(
                _ANNOUNCEMENT,
                self.spec_digest,
                self.model_hash,
                repr(float(self.weight_scale)),
                self.weight_key,
                int(self.min_sites),
                length_prefixed(*cohort),
            )
        ).hexdigest()
