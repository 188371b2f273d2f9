"""Signed encrypted contributions, membership tags, streaming sum and checked decryption.

Protocol (one round of one experiment; the coordinator announces ``experiment_id``, ``round``
and a fresh ``nonce``)
------------------------------------------------------------------------------------------
1. Each site packs ``w * u`` (its update times its weight ``w = n_examples / weight_scale``)
   into CKKS chunks. In every chunk, **slot 0** holds a membership tag ``r[i, c, 0]``,
   **slot 1** holds ``w`` and ``hidden_tags`` further slots - at positions drawn per
   (experiment, round, nonce, chunk) from the tag key - hold tags ``r[i, c, k]``. Tags are
   pseudo-random floats in [1, 2) from HKDF-SHA256 + HMAC-SHA256 + SHAKE-256 keyed with the
   consortium **tag key** over (experiment, round, nonce, site, chunk). The tag key is
   wrapped for sites only; the coordinator never has it.
2. The site signs (Ed25519) the canonical bytes of
   ``site | experiment | round | nonce | n_chunks | n_values | cohort | sha256(chunks)``
   and sends chunks + :class:`Contribution`.
3. The coordinator (:class:`EncryptedSum`) checks signature, registry membership, round
   binding, duplicates and digest, then adds chunk-wise into one running sum; it keeps no
   site's ciphertexts. It sends a :class:`DecryptionRequest` (the contributions it claims to
   have summed + the summed chunks) to one or more sites.
4. A site (:func:`verify_and_decrypt`) re-checks every signature and the round binding,
   requires ``>= min_sites`` distinct members, decrypts, and requires that *every* tag slot
   of *every* chunk equals the sum of the claimed sites' tags (and the weight slot is the
   same in every chunk). Only then does it release ``[sum_i w_i u_i..., sum_i w_i]``, with
   deterministic flooding noise, and it answers at most one distinct request per round.

Security argument: what each check prevents
------------------------------------------
* **Signatures + registry** (coordinator and site): contributions from non-members, forged or
  unsigned contributions, and contributions whose chunks were altered (the digest is signed).
* **Round binding** (experiment, round, nonce inside the signature, the tag derivation and the
  request): replays of contributions or sums from an earlier round or another experiment -
  they fail the signature check, and an old *sum* also carries the old round's tags.
* **Symmetric-key encryption**: the coordinator holds no key, so it cannot encrypt anything of
  its own (only trivial, noiseless ciphertexts of plaintexts it already knows).
* **Membership tags**: the decrypted tag slots equal ``sum_{i in claimed} r[i]`` only if the
  sum contains each claimed contribution exactly once. A single site's ciphertext presented
  as a sum, an omitted, duplicated or scaled contribution, chunks mixed from different subsets
  or chunk indices, a replayed sum, or a ciphertext under another key (decrypts to noise) all
  miss the tags (each tag is an unknown uniform value in [1, 2); the tolerance is
  ``tag_atol``, so a guess passes with probability ~``2 * tag_atol`` per tag slot and all
  ``n_chunks * (1 + hidden_tags)`` slots must pass). The coordinator cannot move the tag slot
  (no Galois keys, so no rotations).
* **Hidden tag positions** (this goes beyond a fixed tag slot, which alone is *broken*): with
  no key at all the coordinator can multiply a ciphertext by any integer polynomial ``m``
  (scale and shape stay those of a fresh ciphertext), which multiplies slot j by
  ``m(zeta_j)``. Lattice reduction over a dozen monomials finds in < 1 s an ``m`` with
  coefficients < 100, ``Re m ~ 1e-11`` on slots 0 and 1 and ``|Re m| ~ 50`` on almost all
  other slots; "legitimate sum + m * (site B's ciphertext)" then passes the slot-0 tag and
  the weight check and discloses B's update on ~78 % of the slots to ~2 % (the test
  ``test_hidden_tags_stop_slot_selective_attack...`` runs this attack with
  ``hidden_tags=0``). With hidden tags, the real part of every multiplier must be ~0 (for
  added ciphertexts) or ~1 (for the sum itself) on tag slots the coordinator cannot locate.
  For an integer polynomial ``q != 0`` (here ``q = 2 Re(m - target)``, symmetrised, which is
  again an integer polynomial) the product of ``|q(zeta_j)|`` over all slots is >= 1 (the
  norm of a non-zero algebraic integer), so ``q`` cannot be below the tolerance
  ``delta ~ 2^-20`` on more than ``log H / (log H + log 1/delta) ~ 49 %`` of the slots when
  the headroom bounds it by ``H ~ 2^19``; all 31 hidden tags of a chunk must fall in that
  set, probability <= ~2^-32 per attacked chunk. (A ``q`` that is 0 changes real parts only
  through the imaginary noise; see the flooding bullet.) The metadata check (two
  polynomials, data level, scale exactly 2^40) refuses products with scaled plaintexts.
* **One answer per round per site** (:class:`SiteLedger`): a site decrypts at most one
  distinct aggregate per (experiment, round); an identical re-request gets the identical
  answer. This blocks differencing (decrypt A+B+C, then A+B, subtract). After a failed tag
  check the round is *locked* at that site, so the tag check cannot be used as an oracle to
  locate the hidden positions by trial and error.
* **Cohort binding** (optional ``cohort`` in :func:`make_contribution`): each site signs the
  list of sites announced for the round; a request is answered only if it claims exactly that
  cohort, and a site contributes under one (nonce, cohort) per round. This blocks differencing
  *across* sites (asking site A to decrypt A+B+C and site B to decrypt A+B) at the price that
  a round with a drop-out must be restarted as a new round.
* **Flooding noise**: released values carry Gaussian noise of std ``2**-flood_bits`` derived
  deterministically from the tag key and the request, so all honest decryptors give the
  same answer and re-requests cannot average it out. It hides CKKS decryption noise, which
  otherwise leaks information about the secret key (Li-Micciancio, IND-CPA-D).

Residual risks
--------------
* The coordinator learns the aggregate (sum of weighted updates and of weights) by design, and
  so learns an individual update if only one site's weight is non-negligible.
* A site holding the CKKS secret key that colludes with the coordinator can decrypt every
  individual contribution: confidentiality rests on no site colluding (threshold / multi-key
  decryption is the later goal).
* Without cohort binding, the coordinator can ask *different* sites to decrypt different
  subsets in one round (each site answers once). Across rounds, a coordinator that resends the
  same global model may obtain similar updates in different subsets; DP noise at the sites or
  fixed cohorts mitigate this.
* The tags protect confidentiality, not integrity of the aggregate against the coordinator: it
  can add known plaintext offsets to data slots (it controls the global model anyway).
* A malicious *site* can poison the sum (e.g. wrong weight); it is detected only as a
  decryption failure (locked round) if it corrupts tag slots.
* The ceremony directory holds every site's private key until distributed and deleted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedhealth.errors import ConfigError, CryptoError
from fedhealth.privacy.he.ckks import CKKSContext, HEParams, SlotLayout, encrypt_update, unpack
from fedhealth.privacy.he.keys import b64d, b64e, sign, verify, write_private_file

if TYPE_CHECKING:
    from fedhealth.privacy.he.ceremony import Registry, SiteKeys

PROTOCOL = b"fedhealth/he-contribution/v1"
_REQUEST = b"fedhealth/he-decryption-request/v1"

__all__ = [
    "Contribution",
    "DecryptionRequest",
    "EncryptedSum",
    "SiteLedger",
    "TagSchedule",
    "answers_agree",
    "chunks_digest",
    "make_contribution",
    "split_aggregate",
    "verify_and_decrypt",
]


def _lp(*fields: bytes | str | int) -> bytes:
    """Unambiguous concatenation: each field length-prefixed (4 bytes, big endian)."""
    out = bytearray()
    for f in fields:
        if isinstance(f, int):
            f = str(f)
        if isinstance(f, str):
            f = f.encode("utf-8")
        out += len(f).to_bytes(4, "big") + f
    return bytes(out)


def chunks_digest(chunks: Sequence[bytes]) -> str:
    """SHA-256 (hex) over the length-prefixed chunk bytes, in order."""
    h = hashlib.sha256(PROTOCOL)
    h.update(len(chunks).to_bytes(8, "big"))
    for c in chunks:
        h.update(len(c).to_bytes(8, "big"))
        h.update(c)
    return h.hexdigest()


def _where(experiment_id: str, round_: int) -> str:
    return f"experiment {experiment_id!r}, round {round_}"


# --------------------------------------------------------------------------- tags


class TagSchedule:
    """Tag positions and values for one (experiment, round, nonce), from the tag key.

    Parameters
    ----------
    tag_key
        The consortium's 32-byte tag key (sites only).
    experiment_id, round_, nonce
        The round binding.
    params
        Consortium parameters (slots, ``hidden_tags``).
    """

    def __init__(
        self, tag_key: bytes, experiment_id: str, round_: int, nonce: str, params: HEParams
    ) -> None:
        if len(tag_key) != 32:
            raise CryptoError("the consortium tag key must be 32 bytes; re-run the key ceremony")
        self.params = params
        self._key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=b"fedhealth/he-tags/v1",
            info=_lp(experiment_id, round_, nonce),
        ).derive(tag_key)
        self._positions: dict[int, np.ndarray] = {}
        self.layout = SlotLayout(params.slots, params.reserved_slots, self.positions)

    def _stream(self, label: bytes, n_bytes: int, *fields: bytes | str | int) -> bytes:
        seed = hmac.new(self._key, _lp(label, *fields), hashlib.sha256).digest()
        return hashlib.shake_256(seed).digest(n_bytes)

    def positions(self, c: int) -> np.ndarray:
        """Reserved slots of chunk ``c``: ``[0 (tag), 1 (weight), hidden tag slots...]``."""
        pos = self._positions.get(c)
        if pos is None:
            k = self.params.hidden_tags
            span = self.params.slots - 2
            chosen: dict[int, None] = {}
            attempt = 0
            while len(chosen) < k:
                raw = np.frombuffer(self._stream(b"positions", 8 * k, c, attempt), dtype="<u4")
                for x in (raw % span + 2).tolist():
                    if len(chosen) < k:
                        chosen.setdefault(int(x))
                attempt += 1
            pos = np.array([0, 1, *chosen], dtype=np.int64)
            self._positions[c] = pos
        return pos

    def tags(self, site: str, n_chunks: int) -> np.ndarray:
        """Tags of ``site``: array ``[n_chunks, 1 + hidden_tags]`` of floats in [1, 2)."""
        per = 1 + self.params.hidden_tags
        raw = np.frombuffer(self._stream(b"tags", 8 * per * n_chunks, site), dtype="<u8")
        return (1.0 + (raw >> np.uint64(11)).astype(np.float64) / 2.0**53).reshape(n_chunks, per)

    def flood(self, fingerprint: str, n: int) -> np.ndarray:
        """Deterministic N(0, (2^-flood_bits)^2) noise for a request (zeros if disabled)."""
        bits = self.params.flood_bits
        if bits is None or n == 0:
            return np.zeros(n)
        raw = np.frombuffer(self._stream(b"flood", 16 * n, fingerprint), dtype="<u8")
        u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # (0, 1]
        u1, u2 = u[:n], u[n:]
        return 2.0**-bits * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


# --------------------------------------------------------------------------- messages


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

    def signed_bytes(self) -> bytes:
        """Canonical bytes covered by the signature."""
        cohort = b"-" if self.cohort is None else _lp("cohort", *self.cohort)
        return _lp(
            PROTOCOL,
            self.site,
            self.experiment_id,
            self.round,
            self.nonce,
            self.n_chunks,
            self.n_values,
            cohort,
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
        return hashlib.sha256(_lp(*parts)).hexdigest()


# --------------------------------------------------------------------------- site ledger


@dataclass
class SiteLedger:
    """A site's memory, per (experiment, round), of what it contributed and decrypted.

    Parameters
    ----------
    path
        JSON file (written ``0600``) to persist across restarts; ``None`` keeps it in memory.
    """

    path: Path | None = None
    contributed: dict[str, str] = field(default_factory=dict)
    decrypted: dict[str, str] = field(default_factory=dict)
    locked: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path = Path(self.path)
            if self.path.is_file():
                try:
                    d = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise CryptoError(
                        f"HE ledger {self.path} is unreadable ({exc}); restore it from backup - "
                        "deleting it would let the coordinator ask for a second decryption"
                    ) from exc
                self.contributed = dict(d.get("contributed", {}))
                self.decrypted = dict(d.get("decrypted", {}))
                self.locked = dict(d.get("locked", {}))

    @staticmethod
    def key(experiment_id: str, round_: int) -> str:
        """Ledger key of one round."""
        return json.dumps([experiment_id, int(round_)])

    def _save(self) -> None:
        if self.path is not None:
            data = {
                "contributed": self.contributed,
                "decrypted": self.decrypted,
                "locked": self.locked,
            }
            write_private_file(self.path, json.dumps(data, indent=1, sort_keys=True).encode())

    def check_contribution(self, experiment_id: str, round_: int, token: str) -> None:
        """Refuse contributing to a round under another (nonce, cohort) token once this site
        decrypted an aggregate of that round (or locked it).

        Before any decryption a new token is accepted and replaces the old one: that is a
        coordinator re-running a round it lost in a crash. The site only ever decrypts sums
        bound to its *current* token, so the superseded ciphertexts can never be decrypted,
        and one decryption per round still holds. After a decryption, a re-run could pair
        two different sums of the same round (a differencing attack), so it is refused.
        Under cohort binding the new cohort must also keep every site of the old one: the
        sites that decrypted the old sum are among them and refuse, so no re-run cohort
        that could be differenced against the old sum can ever be completed.
        """
        k = self.key(experiment_id, round_)
        prev = self.contributed.get(k)
        if prev is None or prev == token:
            return
        if k in self.decrypted or k in self.locked:
            raise CryptoError(
                f"refusing to contribute again to {_where(experiment_id, round_)} under a "
                "different nonce or cohort: this site already decrypted (or refused) an "
                "aggregate of that round, and one aggregate per round blocks differencing "
                "attacks; the round cannot be re-run - start a new run"
            )
        old_cohort, new_cohort = json.loads(prev)[1], json.loads(token)[1]
        if old_cohort is not None and not set(old_cohort) <= set(new_cohort or ()):
            dropped = sorted(set(old_cohort) - set(new_cohort or ()))
            raise CryptoError(
                f"refusing to contribute again to {_where(experiment_id, round_)} under a "
                f"cohort without {dropped}: a re-run round keeps every site of its first "
                "cohort (cohort binding blocks differencing attacks); restart those sites or "
                "start a new run"
            )

    def record_contribution(self, experiment_id: str, round_: int, token: str) -> None:
        """Remember the (nonce, cohort) token a site contributes under (see
        :meth:`check_contribution` for when a new one replaces it)."""
        self.check_contribution(experiment_id, round_, token)
        k = self.key(experiment_id, round_)
        if self.contributed.get(k) != token:
            self.contributed[k] = token
            self._save()

    def check_decryption(self, experiment_id: str, round_: int, fingerprint: str) -> None:
        """Refuse a request if the round is locked or another request was answered."""
        k = self.key(experiment_id, round_)
        if k in self.locked:
            raise CryptoError(
                f"refusing to decrypt for {_where(experiment_id, round_)}: this site refused a "
                f"forged aggregate in that round ({self.locked[k]}) and answers nothing more "
                "for it; "
                "start a new round"
            )
        prev = self.decrypted.get(k)
        if prev is not None and prev != fingerprint:
            raise CryptoError(
                "refusing a second, different decryption request for "
                f"{_where(experiment_id, round_)}: "
                "this site already decrypted another aggregate in that round (one aggregate per "
                "round blocks differencing attacks); start a new round"
            )

    def record_decryption(self, experiment_id: str, round_: int, fingerprint: str) -> None:
        """Remember the request answered for a round."""
        self.decrypted[self.key(experiment_id, round_)] = fingerprint
        self._save()

    def lock(self, experiment_id: str, round_: int, reason: str) -> None:
        """Refuse everything further for a round."""
        self.locked[self.key(experiment_id, round_)] = reason
        self._save()


# --------------------------------------------------------------------------- site: contribute


def _check_ids(experiment_id: str, round_: int, nonce: str) -> None:
    if not experiment_id or not isinstance(round_, int) or round_ < 0 or not nonce:
        raise ConfigError(
            f"HE round binding needs a non-empty experiment id, a round >= 0 and a non-empty "
            f"nonce; got experiment {experiment_id!r}, round {round_!r}, nonce {nonce!r}"
        )


def make_contribution(
    update: np.ndarray,
    n_examples: float,
    site_keys: SiteKeys,
    *,
    experiment_id: str,
    round: int,
    nonce: str,
    weight_scale: float = 1000.0,
    cohort: Sequence[str] | None = None,
) -> tuple[list[bytes], Contribution]:
    """Encrypt, tag and sign one site's update.

    Parameters
    ----------
    update
        Flat update vector (see ``ckks.flatten_state``).
    n_examples
        The site's example count n (> 0); the site sends ``w * update`` and ``w`` with
        ``w = n / weight_scale``.
    site_keys
        The site's keys (``ceremony.load_site_keys``).
    experiment_id, round, nonce
        The round binding announced by the coordinator.
    weight_scale
        Public, consortium-wide divisor keeping ``w * |update| <= params.max_abs_value``.
    cohort
        Optional list of the sites announced for this round (cohort binding, see module doc).

    Returns
    -------
    (chunks, contribution)
        Ciphertext chunks (seeded, compressed SEAL bytes) and the signed contribution.

    Raises
    ------
    ConfigError
        Bad inputs or values too large for the HE headroom.
    CryptoError
        The site already contributed to this round under another nonce/cohort.
    """
    site = site_keys.site
    params = site_keys.params
    where = f"site {site!r}, {_where(experiment_id, round)}"
    _check_ids(experiment_id, round, nonce)
    vec = np.asarray(update, dtype=np.float64).ravel()
    if not np.all(np.isfinite(vec)):
        raise ConfigError(f"{where}: the update contains NaN/inf; fix training before encrypting")
    if not (n_examples > 0 and weight_scale > 0):
        raise ConfigError(
            f"{where}: n_examples ({n_examples}) and weight_scale ({weight_scale}) must be > 0"
        )
    cohort_t: tuple[str, ...] | None = None
    if cohort is not None:
        cohort_t = tuple(sorted(cohort))
        unknown = [s for s in cohort_t if s not in site_keys.registry.sites]
        if len(set(cohort_t)) != len(cohort_t) or site not in cohort_t or unknown:
            raise ConfigError(
                f"{where}: cohort {list(cohort_t)} must list distinct consortium sites including "
                f"this one (unknown: {unknown})"
            )
    token = json.dumps([nonce, cohort_t])
    ledger = site_keys.ledger
    ledger.check_contribution(experiment_id, round, token)

    w = float(n_examples) / float(weight_scale)
    schedule = TagSchedule(site_keys.tag_key, experiment_id, round, nonce, params)
    n_chunks = schedule.layout.n_chunks(vec.size)
    tags = schedule.tags(site, n_chunks)

    def reserved(c: int) -> np.ndarray:
        return np.concatenate(([tags[c, 0], w], tags[c, 1:]))

    try:
        chunks = encrypt_update(
            vec * w, site_keys.secret_context, layout=schedule.layout, reserved_values=reserved
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    contribution = Contribution(
        site=site,
        experiment_id=experiment_id,
        round=round,
        nonce=nonce,
        n_chunks=len(chunks),
        n_values=int(vec.size),
        digest=chunks_digest(chunks),
        cohort=cohort_t,
    )
    contribution = replace(
        contribution, signature=sign(site_keys.identity, contribution.signed_bytes())
    )
    ledger.record_contribution(experiment_id, round, token)
    return chunks, contribution


# --------------------------------------------------------------------------- coordinator


def _check_signed(c: Contribution, registry: Registry, who: str) -> None:
    if c.site not in registry.sites:
        raise CryptoError(f"{who}: {c.site!r} is not a consortium site (not in the registry)")
    verify(registry.signing_key(c.site), c.signed_bytes(), c.signature, what=who)


def _check_binding(c: Contribution, experiment_id: str, round_: int, nonce: str, who: str) -> None:
    if (c.experiment_id, c.round, c.nonce) != (experiment_id, round_, nonce):
        raise CryptoError(
            f"{who} is a replay: it was made for experiment {c.experiment_id!r}, round {c.round}, "
            f"nonce {c.nonce!r}, not for {_where(experiment_id, round_)}, nonce {nonce!r}"
        )


class EncryptedSum:
    """Coordinator-side running sum of signed encrypted contributions.

    Memory: one running sum (``n_chunks`` full ciphertexts) plus the reply being added.

    Parameters
    ----------
    public_ctx
        The coordinator's key-less context.
    experiment_id, round, nonce
        The round binding this sum accepts.
    registry
        The consortium registry (site names and signing keys).
    """

    def __init__(
        self,
        public_ctx: CKKSContext,
        experiment_id: str,
        round: int,
        nonce: str,
        registry: Registry,
    ) -> None:
        _check_ids(experiment_id, round, nonce)
        self.ctx = public_ctx
        self.experiment_id = experiment_id
        self.round = round
        self.nonce = nonce
        self.registry = registry
        self._acc: list[Any] | None = None
        self._contributions: list[Contribution] = []

    @property
    def sites(self) -> list[str]:
        """Sites whose contributions are in the sum, in order of arrival."""
        return [c.site for c in self._contributions]

    def add(self, chunks: Sequence[bytes], contribution: Contribution) -> None:
        """Verify one site's reply and add it to the running sum.

        Raises
        ------
        CryptoError
            Unknown site, unsigned or wrongly signed, replayed (other experiment, round or
            nonce), duplicate site, tampered chunks (digest mismatch), inconsistent shape, or
            chunks that are not valid fresh ciphertexts. The running sum is unchanged.
        """
        c = contribution
        who = f"contribution of site {c.site!r} ({_where(self.experiment_id, self.round)})"
        _check_signed(c, self.registry, who)
        _check_binding(c, self.experiment_id, self.round, self.nonce, who)
        if c.site in self.sites:
            raise CryptoError(
                f"{who} is a duplicate: this site's contribution is already in the sum"
            )
        if len(chunks) != c.n_chunks:
            raise CryptoError(
                f"{who} declares {c.n_chunks} chunks but {len(chunks)} arrived; resend"
            )
        if chunks_digest(chunks) != c.digest:
            raise CryptoError(
                f"{who}: the chunks do not match the signed digest (altered or corrupted in "
                "transit); ask the site to resend"
            )
        if self._contributions:
            first = self._contributions[0]
            if (c.n_chunks, c.n_values) != (first.n_chunks, first.n_values):
                raise CryptoError(
                    f"{who} has {c.n_values} values in {c.n_chunks} chunks, but site "
                    f"{first.site!r} sent {first.n_values} in {first.n_chunks}; the sites run "
                    "different models"
                )
            if c.cohort != first.cohort:
                raise CryptoError(f"{who} was made for cohort {c.cohort}, not {first.cohort}")
        if self._acc is None:
            self._acc = [self.ctx.load(b, what=f"{who}, chunk {i}") for i, b in enumerate(chunks)]
        else:
            done = 0
            try:
                for i, b in enumerate(chunks):
                    self.ctx.add_inplace(self._acc[i], self.ctx.load(b, what=f"{who}, chunk {i}"))
                    done = i + 1
            except BaseException:
                # Roll back (exact in Z_q) by re-loading what was added: the running sum stays
                # as it was, and no more than one reply's ciphertexts are ever held.
                for i in range(done):
                    self.ctx.sub_inplace(self._acc[i], self.ctx.load(chunks[i]))
                raise
        self._contributions.append(c)

    def decryption_request(self) -> DecryptionRequest:
        """Serialize the running sum with the contributions it claims.

        Raises
        ------
        CryptoError
            Nothing was added, or a bound cohort is incomplete.
        """
        if self._acc is None:
            raise CryptoError(
                f"no contribution was added for {_where(self.experiment_id, self.round)}; "
                "nothing to decrypt"
            )
        cohort = self._contributions[0].cohort
        if cohort is not None and set(cohort) != set(self.sites):
            missing = sorted(set(cohort) - set(self.sites))
            raise CryptoError(
                f"cohort of {_where(self.experiment_id, self.round)} is incomplete (missing "
                f"{missing}); sites will refuse a partial sum - restart as a new round"
            )
        return DecryptionRequest(
            self.experiment_id,
            self.round,
            self.nonce,
            list(self._contributions),
            [self.ctx.dump(ct) for ct in self._acc],
        )


# --------------------------------------------------------------------------- site: decrypt


def verify_and_decrypt(
    request: DecryptionRequest,
    site_keys: SiteKeys,
    *,
    expected_experiment: str,
    expected_round: int,
    expected_nonce: str,
    min_sites: int,
) -> np.ndarray:
    """Check a decryption request from the coordinator and, if legitimate, decrypt it.

    Parameters
    ----------
    request
        From :meth:`EncryptedSum.decryption_request`.
    site_keys
        This site's keys (secret context, tag key, registry, ledger).
    expected_experiment, expected_round, expected_nonce
        The round this site is taking part in.
    min_sites
        Smallest number of distinct contributions (>= 2) the site will decrypt.

    Returns
    -------
    np.ndarray
        ``n_values + 1`` floats: ``sum_i w_i u_i`` followed by ``sum_i w_i``
        (see :func:`split_aggregate`), plus the flooding noise.

    Raises
    ------
    ConfigError
        ``min_sites < 2``.
    CryptoError
        Any rule broken; the message names the rule.
    """
    exp, rnd, nonce = expected_experiment, expected_round, expected_nonce
    where = f"site {site_keys.site!r} refuses the decryption request for {_where(exp, rnd)}"
    if min_sites < 2:
        raise ConfigError(
            f"min_sites must be >= 2 (got {min_sites}): decrypting one contribution discloses it"
        )
    if (request.experiment_id, request.round, request.nonce) != (exp, rnd, nonce):
        raise CryptoError(
            f"{where}: the request is for experiment {request.experiment_id!r}, round "
            f"{request.round}, nonce {request.nonce!r} (replay or mix-up)"
        )
    registry = site_keys.registry
    seen: set[str] = set()
    for c in request.contributions:
        who = f"{where}: contribution of site {c.site!r}"
        _check_signed(c, registry, who)
        _check_binding(c, exp, rnd, nonce, who)
        if c.site in seen:
            raise CryptoError(f"{who} is claimed twice; each site may count once")
        seen.add(c.site)
    if len(seen) < min_sites:
        raise CryptoError(
            f"{where}: it claims {len(seen)} contribution(s) {sorted(seen)}, fewer than "
            f"min_sites={min_sites}; an aggregate of so few sites would disclose them"
        )
    first = request.contributions[0]
    if any(
        (c.n_chunks, c.n_values) != (first.n_chunks, first.n_values) for c in request.contributions
    ):
        raise CryptoError(f"{where}: the contributions disagree on their shape")
    cohorts = {c.cohort for c in request.contributions}
    if cohorts != {None} and (len(cohorts) != 1 or set(first.cohort or ()) != seen):
        raise CryptoError(
            f"{where}: the claimed sites {sorted(seen)} are not exactly the cohort the sites "
            f"signed ({sorted(c for c in cohorts if c)}); cohort-bound rounds decrypt only "
            "the full cohort"
        )
    params = site_keys.params
    schedule = TagSchedule(site_keys.tag_key, exp, rnd, nonce, params)
    layout = schedule.layout
    if (
        len(request.sum_chunks) != first.n_chunks
        or layout.n_chunks(first.n_values) != first.n_chunks
    ):
        raise CryptoError(
            f"{where}: {len(request.sum_chunks)} sum chunks for contributions of "
            f"{first.n_values} values in {first.n_chunks} chunks"
        )
    fingerprint = request.fingerprint()
    ledger = site_keys.ledger
    ledger.check_decryption(exp, rnd, fingerprint)

    ctx = site_keys.secret_context
    arrays = [
        ctx.decrypt(ctx.load(b, what=f"sum chunk {i}")) for i, b in enumerate(request.sum_chunks)
    ]
    data, reserved = unpack(arrays, layout, first.n_values)
    expected = sum(schedule.tags(s, first.n_chunks) for s in sorted(seen))
    observed = np.concatenate((reserved[:, :1], reserved[:, 2:]), axis=1)
    dev = np.abs(observed - expected)
    bad = np.flatnonzero(~(dev <= params.tag_atol).all(axis=1))
    if bad.size:
        worst = float(np.max(np.where(np.isfinite(dev), dev, np.inf)))
        reason = (
            f"membership-tag check failed in {bad.size} of {first.n_chunks} chunk(s) (first "
            f"{bad[:5].tolist()}, max deviation {worst:.3g})"
        )
        ledger.lock(exp, rnd, reason)
        raise CryptoError(
            f"{where}: {reason}. The sum is not exactly one copy of each claimed contribution of "
            f"{sorted(seen)} (a single site's ciphertext, a missing, duplicated or scaled "
            "contribution, mixed chunks, a replayed sum, another key or altered bytes); this "
            "round is now locked at this site"
        )
    weights = reserved[:, 1]
    if not (weights[0] > 0 and np.all(np.abs(weights - weights[0]) <= params.tag_atol)):
        reason = "weight-slot check failed (weights differ between chunks or are not positive)"
        ledger.lock(exp, rnd, reason)
        raise CryptoError(f"{where}: {reason}; this round is now locked at this site")
    out = np.concatenate((data, [float(np.mean(weights))]))
    out = out + schedule.flood(fingerprint, out.size)
    ledger.record_decryption(exp, rnd, fingerprint)
    return out


def split_aggregate(aggregate: np.ndarray, weight_scale: float = 1.0) -> tuple[np.ndarray, float]:
    """Split a decrypted aggregate into ``(sum_i n_i u_i, sum_i n_i)``.

    With ``weight_scale`` equal to the one used by the sites the results are in example
    units; the FedAvg mean is ``weighted_sum / total`` either way.
    """
    a = np.asarray(aggregate, dtype=np.float64)
    return a[:-1] * weight_scale, float(a[-1]) * weight_scale


def answers_agree(answers: Mapping[str, np.ndarray], atol: float) -> None:
    """Check that several sites decrypted the same aggregate.

    Parameters
    ----------
    answers
        ``site -> decrypted aggregate``.
    atol
        Largest allowed absolute difference.

    Raises
    ------
    CryptoError
        Naming the sites that disagree with the majority (all, if there is none).
    """
    names = sorted(answers)
    if len(names) < 2:
        return
    arrays = {n: np.asarray(answers[n], dtype=np.float64) for n in names}

    def same(a: str, b: str) -> bool:
        x, y = arrays[a], arrays[b]
        return x.shape == y.shape and bool(np.all(np.abs(x - y) <= atol))

    support = {n: [m for m in names if same(n, m)] for n in names}
    best = max(names, key=lambda n: len(support[n]))
    majority = support[best]
    if len(majority) == len(names):
        return
    if 2 * len(majority) > len(names):
        odd = [n for n in names if n not in majority]
        raise CryptoError(
            f"decrypted aggregates disagree: site(s) {odd} differ from {majority} by more than "
            f"{atol:g}; check those sites' keys and the requests they were sent"
        )
    raise CryptoError(
        f"decrypted aggregates disagree with no majority among sites {names} (atol {atol:g}); "
        "the coordinator may have sent different requests to different sites"
    )
