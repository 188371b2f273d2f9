"""The signed records of encrypted aggregation and the checks every party makes on them.

A :class:`Contribution` describes one site's ciphertexts for one round and is signed by the
site; a :class:`DecryptionRequest` is what the coordinator asks a site to decrypt. Both the
coordinator (:mod:`~fedhealth.privacy.he.encrypted_sum`) and a decrypting site
(:mod:`~fedhealth.privacy.he.decrypt`) check a contribution with :func:`verify_signed` and
:func:`check_round`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedhealth.errors import CryptoError
from fedhealth.privacy.he.binding import length_prefixed, round_label
from fedhealth.privacy.he.keys import b64d, b64e, verify

if TYPE_CHECKING:
    from fedhealth.privacy.he.ceremony import Registry

PROTOCOL = b"fedhealth/he-contribution/v2"
_REQUEST = b"fedhealth/he-decryption-request/v1"

__all__ = [
    "PROTOCOL",
    "Contribution",
    "DecryptionRequest",
    "check_round",
    "chunks_digest",
    "verify_signed",
]


def chunks_digest(chunks: Sequence[bytes]) -> str:
    """SHA-256 (hex) over the length-prefixed chunk bytes, in order."""
    h = hashlib.sha256(PROTOCOL)
    h.update(len(chunks).to_bytes(8, "big"))
    for c in chunks:
        h.update(len(c).to_bytes(8, "big"))
        h.update(c)
    return h.hexdigest()


@dataclass(frozen=True)
class Contribution:
    """The signed description of one site's encrypted update for one round.

    Attributes
    ----------
    site, experiment_id, round, nonce
        Who, and for which round.
    n_chunks, n_values
        Number of ciphertext chunks and of update values.
    digest
        :func:`chunks_digest` of the chunks (hex).
    signature
        Ed25519 signature over :meth:`signed_bytes` (empty = unsigned).
    cohort
        Optional sorted list of the sites announced for the round (cohort binding).
    announcement
        :meth:`~fedhealth.privacy.he.binding.Announcement.digest` of what the site was shown
        (spec, global model, weight scale and key, ``min_sites``, cohort).
    weight
        The site's aggregation weight ``w = n / weight_scale`` (its plaintext
        ``weighted_by_key`` metric, already in the reply, divided by the scale): a decrypting
        site caps any one site's share of the total weight with it.
    """

    site: str
    experiment_id: str
    round: int
    nonce: str
    n_chunks: int
    n_values: int
    digest: str
    signature: bytes = b""
    cohort: tuple[str, ...] | None = None
    announcement: str = ""
    weight: float = 0.0

    def signed_bytes(self) -> bytes:
        """Canonical bytes covered by the signature."""
        cohort = b"-" if self.cohort is None else length_prefixed("cohort", *self.cohort)
        return length_prefixed(
            PROTOCOL,
            self.site,
            self.experiment_id,
            self.round,
            self.nonce,
            self.n_chunks,
            self.n_values,
            cohort,
            self.announcement,
            repr(float(self.weight)),
            self.digest,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (signature in base64)."""
        return {
            "site": self.site,
            "experiment_id": self.experiment_id,
            "round": self.round,
            "nonce": self.nonce,
            "n_chunks": self.n_chunks,
            "n_values": self.n_values,
            "digest": self.digest,
            "signature": b64e(self.signature),
            "cohort": None if self.cohort is None else list(self.cohort),
            "announcement": self.announcement,
            "weight": float(self.weight),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Contribution:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                site=str(d["site"]),
                experiment_id=str(d["experiment_id"]),
                round=int(d["round"]),
                nonce=str(d["nonce"]),
                n_chunks=int(d["n_chunks"]),
                n_values=int(d["n_values"]),
                digest=str(d["digest"]),
                signature=b64d(d.get("signature") or "", what="contribution signature"),
                cohort=None if d.get("cohort") is None else tuple(d["cohort"]),
                announcement=str(d.get("announcement") or ""),
                weight=float(d.get("weight") or 0.0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CryptoError(f"malformed contribution record ({exc})") from exc


@dataclass(frozen=True)
class DecryptionRequest:
    """What the coordinator asks a site to decrypt."""

    experiment_id: str
    round: int
    nonce: str
    contributions: list[Contribution]
    sum_chunks: list[bytes]

    def to_dict(self) -> dict[str, Any]:
        """Transport-ready dict; ``sum_chunks`` stay ``bytes``."""
        return {
            "experiment_id": self.experiment_id,
            "round": self.round,
            "nonce": self.nonce,
            "contributions": [c.to_dict() for c in self.contributions],
            "sum_chunks": list(self.sum_chunks),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecryptionRequest:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                str(d["experiment_id"]),
                int(d["round"]),
                str(d["nonce"]),
                [Contribution.from_dict(c) for c in d["contributions"]],
                [bytes(b) for b in d["sum_chunks"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CryptoError(f"malformed decryption request ({exc})") from exc

    def fingerprint(self) -> str:
        """Order-independent SHA-256 (hex) of everything in the request."""
        contribs = sorted(self.contributions, key=lambda c: (c.site, c.signed_bytes()))
        parts: list[bytes | str | int] = [_REQUEST, self.experiment_id, self.round, self.nonce]
        for c in contribs:
            parts += [c.signed_bytes(), c.signature]
        parts.append(chunks_digest(self.sum_chunks))
        return hashlib.sha256(length_prefixed(*parts)).hexdigest()


def verify_signed(c: Contribution, registry: Registry, who: str) -> None:
    """Require that ``c`` comes from a registered site and carries that site's signature.

    Raises
    ------
    CryptoError
        Prefixed with ``who``: not a consortium site, or a missing or wrong signature.
    """
    if c.site not in registry.sites:
        raise CryptoError(f"{who}: {c.site!r} is not a consortium site (not in the registry)")
    verify(registry.signing_key(c.site), c.signed_bytes(), c.signature, what=who)


def check_round(c: Contribution, experiment_id: str, round_: int, nonce: str, who: str) -> None:
    """Require that ``c`` was made for this (experiment, round, nonce).

    Raises
    ------
    CryptoError
        Prefixed with ``who``: a replay from another experiment, round or nonce.
    """
    if (c.experiment_id, c.round, c.nonce) != (experiment_id, round_, nonce):
        raise CryptoError(
            f"{who} is a replay: it was made for experiment {c.experiment_id!r}, round {c.round}, "
            f"nonce {c.nonce!r}, not for {round_label(experiment_id, round_)}, nonce {nonce!r}"
        )
