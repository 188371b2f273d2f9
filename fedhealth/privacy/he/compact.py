"""Compact, lossless wire form of SEAL ciphertexts: each residue in as many bits as its prime.

SEAL serialises a ciphertext coefficient as a 64-bit word and compresses the stream with
zstd, which gains nothing on uniformly random residues of a 59-bit prime (``tenseal.sealapi``
does not expose the compression mode or the coefficient array). :func:`compact` takes SEAL's
bytes apart and stores the residues modulo each prime ``q_l`` in ``bit_length(q_l)`` bits
(59 of 64 for the default prime: -7.8 %); everything else of SEAL's stream (parameters id,
sizes, scale, the PRNG seed of a seeded ciphertext) is kept verbatim. :func:`expand` rebuilds
an uncompressed SEAL stream, which SEAL's own ``load`` then validates in full (every residue
below its prime, parameters of the context), so a hostile sender gains nothing from this
layer: a malformed compact form is refused here or by SEAL.

Layout (all integers little endian)::

    b"FHC1" | SEAL outer header (16) | u32 len(prefix) | prefix | u64 n_words | packed | tail

``prefix`` is SEAL's payload up to the first coefficient word (the ciphertext's members, the
coefficient array's own SEAL header and its length), ``packed`` the ``n_words`` words, and
``tail`` the rest of the payload (the seed of a seeded ciphertext, empty otherwise).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np
import zstandard

from fedhealth.errors import CryptoError

__all__ = ["compact", "expand"]

MAGIC = b"FHC1"
_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr, -, size
# Ciphertext members before the coefficient array: parms_id (4 x u64), is_ntt_form (u8),
# size, poly_modulus_degree, coeff_modulus_size (u64 each), scale (f64), correction (u64).
_MEMBERS = struct.Struct("<32sBQQQdQ")
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2


def _seal_payload(seal: bytes) -> tuple[bytes, bytes]:
    """(header of the uncompressed stream, decompressed payload) of one SEAL stream."""
    if len(seal) < _SEAL_HEADER.size:
        raise CryptoError("SEAL stream shorter than its header")
    magic, hsize, major, minor, compr, _, size = _SEAL_HEADER.unpack_from(seal)
    if magic != _SEAL_MAGIC or hsize != _SEAL_HEADER.size or size != len(seal):
        raise CryptoError("not a SEAL stream (bad header)")
    body = seal[_SEAL_HEADER.size :]
    if compr == _COMPR_ZSTD:
        payload = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 28)
    elif compr == _COMPR_ZLIB:
        payload = zlib.decompress(body)
    elif compr == _COMPR_NONE:
        payload = body
    else:
        raise CryptoError(f"SEAL stream with unknown compression mode {compr}")
    # Keep the header as an uncompressed stream of this payload would have it.
    header = _SEAL_HEADER.pack(
        magic, hsize, major, minor, _COMPR_NONE, 0, _SEAL_HEADER.size + len(payload)
    )
    return header, payload


def _layout(prefix: bytes) -> tuple[int, int, int]:
    """(poly_modulus_degree, coeff_modulus_size, n_words) read from a ciphertext prefix."""
    _, _, _, n, n_primes, _, _ = _MEMBERS.unpack_from(prefix)
    inner = _MEMBERS.size
    magic, _, _, _, compr, _, size = _SEAL_HEADER.unpack_from(prefix, inner)
    (n_words,) = struct.unpack_from("<Q", prefix, inner + _SEAL_HEADER.size)
    if magic != _SEAL_MAGIC or compr != _COMPR_NONE or size != _SEAL_HEADER.size + 8 + 8 * n_words:
        raise CryptoError("SEAL ciphertext with an unexpected coefficient-array header")
    # One polynomial (a seeded ciphertext) or two, of at most SEAL's largest ring.
    if not (0 < n <= 32768 and 0 < n_primes <= 64) or n_words not in (
        n * n_primes,
        2 * n * n_primes,
    ):
        raise CryptoError("SEAL ciphertext with inconsistent sizes")
    return n, n_primes, n_words


def _widths(n: int, n_primes: int, n_words: int, moduli_bits: Sequence[int]) -> list[int]:
    """Bit width of each block of ``n`` words (SEAL stores polynomial-major, prime-minor)."""
    if n_primes > len(moduli_bits):
        raise CryptoError(
            f"ciphertext has {n_primes} primes, the parameters {len(moduli_bits)} at data level"
        )
    return [int(moduli_bits[(b % n_primes)]) for b in range(n_words // n)]


def _pack(words: np.ndarray, bits: int) -> bytes:
    """Concatenate the low ``bits`` bits of each word, little endian (``len(words) % 8 == 0``).

    Eight words make ``bits`` bytes: each group is built as eight u64 output words, of which
    the first ``bits`` bytes are kept.
    """
    if bits < 64 and np.any(words >> np.uint64(bits)):
        raise CryptoError(f"a residue does not fit {bits} bits; not a ciphertext of these primes")
    group = words.reshape(-1, 8)
    out = np.zeros((group.shape[0], 8), dtype="<u8")
    for i in range(8):
        first = bits * i
        for k in range(first // 64, (first + bits - 1) // 64 + 1):
            shift = first - 64 * k
            col = group[:, i]
            out[:, k] |= col << np.uint64(shift) if shift >= 0 else col >> np.uint64(-shift)
    return out.view(np.uint8)[:, :bits].tobytes()


def _unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack` for ``count`` words."""
    groups = np.zeros((count // 8, 64), dtype=np.uint8)
    groups[:, :bits] = np.frombuffer(data, dtype=np.uint8).reshape(count // 8, bits)
    stream = groups.view("<u8")
    mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(2**64 - 1)
    out = np.empty((count // 8, 8), dtype="<u8")
    for i in range(8):
        k, r = divmod(bits * i, 64)
        value = stream[:, k] >> np.uint64(r)
        if r and r + bits > 64:
            value |= stream[:, k + 1] << np.uint64(64 - r)
        out[:, i] = value & mask
    return out.ravel()


def compact(seal: bytes, moduli_bits: Sequence[int]) -> bytes:
    """Compact a serialized SEAL ciphertext.

    Parameters
    ----------
    seal
        What SEAL's ``Ciphertext.save`` (or a seeded ``Serializable``'s) wrote.
    moduli_bits
        Bit length of each data-level prime of the parameters, in order.

    Returns
    -------
    bytes
        The compact form (see the module docstring).

    Raises
    ------
    CryptoError
        Not a SEAL ciphertext stream of these primes.
    """
    header, payload = _seal_payload(seal)
    start = _MEMBERS.size + _SEAL_HEADER.size + 8
    if len(payload) < start:
        raise CryptoError("SEAL ciphertext stream too short")
    n, n_primes, n_words = _layout(payload[:start])
    end = start + 8 * n_words
    if len(payload) < end:
        raise CryptoError("SEAL ciphertext stream truncated")
    words = np.frombuffer(payload, dtype="<u8", count=n_words, offset=start)
    packed = b"".join(
        _pack(words[i * n : (i + 1) * n], bits)
        for i, bits in enumerate(_widths(n, n_primes, n_words, moduli_bits))
    )
    return b"".join(
        (
            MAGIC,
            header,
            struct.pack("<I", start),
            payload[:start],
            struct.pack("<Q", n_words),
            packed,
            payload[end:],
        )
    )


def expand(data: bytes, moduli_bits: Sequence[int]) -> bytes:
    """Rebuild the uncompressed SEAL stream of a :func:`compact` ciphertext.

    Raises
    ------
    CryptoError
        Not a compact ciphertext, or inconsistent lengths. (Residues at or above their prime
        and foreign parameters are refused by SEAL's ``load`` afterwards.)
    """
    view = memoryview(data)
    head = len(MAGIC) + _SEAL_HEADER.size + 4
    if len(data) < head or bytes(view[:4]) != MAGIC:
        raise CryptoError("not a compact fedhealth ciphertext (bad magic)")
    header = bytes(view[4 : 4 + _SEAL_HEADER.size])
    (start,) = struct.unpack_from("<I", data, head - 4)
    if start != _MEMBERS.size + _SEAL_HEADER.size + 8 or len(data) < head + start + 8:
        raise CryptoError("compact ciphertext with a malformed prefix")
    prefix = bytes(view[head : head + start])
    n, n_primes, n_words = _layout(prefix)
    (declared,) = struct.unpack_from("<Q", data, head + start)
    if declared != n_words:
        raise CryptoError("compact ciphertext declares another number of words than SEAL's")
    pos = head + start + 8
    parts = [prefix]
    for bits in _widths(n, n_primes, n_words, moduli_bits):
        size = n * bits // 8
        if len(data) < pos + size:
            raise CryptoError("compact ciphertext truncated")
        parts.append(_unpack(bytes(view[pos : pos + size]), n, bits).tobytes())
        pos += size
    parts.append(bytes(view[pos:]))
    payload = b"".join(parts)
    magic, hsize, _, _, compr, _, size = _SEAL_HEADER.unpack(header)
    if (magic, hsize, compr, size) != (
        _SEAL_MAGIC,
        _SEAL_HEADER.size,
        _COMPR_NONE,
        _SEAL_HEADER.size + len(payload),
    ):
        raise CryptoError("compact ciphertext with a malformed SEAL header")
    return header + payload
