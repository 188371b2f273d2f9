"""Per-round membership tags: positions and values derived from the consortium's tag key.

Sites only (the coordinator never holds the tag key). Why the tags and their hidden positions
stop forged sums is argued in ``docs/security.md`` ("The cryptographic argument").
"""

from __future__ import annotations

import hashlib
import hmac
import math

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedhealth.errors import CryptoError
from fedhealth.privacy.he.binding import length_prefixed
from fedhealth.privacy.he.ckks import HEParams, SlotLayout

__all__ = ["TagSchedule"]


class TagSchedule:
    """Tag positions and values for one (experiment, round, nonce), from the tag key.

    Parameters
    ----------
    tag_key
        The consortium's 32-byte tag key (sites only).
    experiment_id, round_, nonce
        The round binding.
    params
        Consortium parameters (slots, lanes, ``hidden_tags``).
    announcement
        The announcement digest the site signs (``binding.Announcement.digest``): sites shown
        different announcements draw unrelated tags, so their contributions never sum to a
        sum that passes the tag check.
    """

    def __init__(
        self,
        tag_key: bytes,
        experiment_id: str,
        round_: int,
        nonce: str,
        params: HEParams,
        announcement: str = "",
    ) -> None:
        if len(tag_key) != 32:
            raise CryptoError("the consortium tag key must be 32 bytes; re-run the key ceremony")
        self.params = params
        self._key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=b"fedhealth/he-tags/v2",
            info=length_prefixed(experiment_id, round_, nonce, announcement),
        ).derive(tag_key)
        self._positions: dict[int, np.ndarray] = {}
        self.layout = SlotLayout(params.lanes, params.reserved_lanes, self.positions)

    def _stream(self, label: bytes, n_bytes: int, *fields: bytes | str | int) -> bytes:
        seed = hmac.new(self._key, length_prefixed(label, *fields), hashlib.sha256).digest()
        return hashlib.shake_256(seed).digest(n_bytes)

    def positions(self, c: int) -> np.ndarray:
        """Reserved lanes of chunk ``c``: ``[0 (tag), 1 (weight), further tag lanes...]``.

        The further tags sit in ``hidden_tags`` distinct slots ``>= 2`` drawn from the tag key.
        With complex slots both parts of every reserved slot are reserved (slot 0's and 1's
        imaginary parts hold tags too): a multiplier then passes a tag slot only if it
        vanishes there as a complex number, whatever the data (see ``docs/security.md``).
        """
        pos = self._positions.get(c)
        if pos is None:
            k = self.params.hidden_tags
            slots = self.params.slots
            chosen: dict[int, None] = {}
            attempt = 0
            while len(chosen) < k:
                raw = np.frombuffer(self._stream(b"positions", 8 * k, c, attempt), dtype="<u4")
                for x in (raw % (slots - 2) + 2).tolist():
                    if len(chosen) < k:
                        chosen.setdefault(int(x))
                attempt += 1
            if self.params.complex_slots:
                pos = np.array(
                    [0, 1, slots, slots + 1, *(lane for j in chosen for lane in (j, slots + j))],
                    dtype=np.int64,
                )
            else:
                pos = np.array([0, 1, *chosen], dtype=np.int64)
            self._positions[c] = pos
        return pos

    def tags(self, site: str, n_chunks: int) -> np.ndarray:
        """Tags of ``site``: array ``[n_chunks, reserved_lanes - 1]`` of floats in [1, 2)."""
        per = self.params.reserved_lanes - 1
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
