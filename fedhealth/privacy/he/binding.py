"""The round binding of encrypted aggregation: canonical framing and labels.

Every signed or hashed value of the protocol is framed with :func:`length_prefixed`, and
every round is named by (experiment id, round, nonce). Free of heavy imports, so the ledger,
the records and the tag schedule can share it without depending on each other.
"""

from __future__ import annotations

from fedhealth.errors import ConfigError

__all__ = ["check_round_ids", "length_prefixed", "round_label"]


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
