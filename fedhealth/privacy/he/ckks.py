"""CKKS for addition-only secure aggregation: parameters, contexts, slot packing.

Parameter choice (default :class:`HEParams`)
-------------------------------------------
Aggregation only ever *adds* ciphertexts, so no multiplication, rescaling, relinearisation or
rotation is needed and one ciphertext prime is enough:

* ``poly_modulus_degree = 8192``: 4096 complex slots per ciphertext; with
  ``complex_slots`` each carries two values (real and imaginary part), 8192 "lanes";
* ``coeff_mod_bit_sizes = (59, 60)``: a ciphertext carries the first, 59-bit prime only (a
  residue costs 59 bits on the wire); the second is SEAL's special (key-switching) prime,
  which TenSEAL insists on. It never appears on the wire. The total, 119 bits, is what the
  128-bit security bound limits (218 at N = 8192); ``docs/security.md`` gives the argument;
* ``global_scale_bits = 40``: sums with ``|x| < 2^17`` per value decrypt correctly (2 bits
  kept for the prime being below 2^59 and for the coefficient bound); the defaults
  ``max_sites = 512`` x ``max_abs_value = 100`` use ``sqrt(2) * 51200 < 2^16.2`` of that
  (checked in :meth:`HEParams.validate`, at packing time, at the ceremony and in the sum);
* ``symmetric = True``: sites encrypt with the secret key, and SEAL sends the second
  polynomial as a 64-byte seed (``Encryptor.encrypt_symmetric`` through ``tenseal.sealapi``).
  The coordinator's context holds no key at all - it cannot encrypt, only add;
* ``compact_wire = True``: ciphertexts travel in :mod:`~fedhealth.privacy.he.compact` form,
  each residue in 59 bits instead of SEAL's 64-bit words.

Measured figures (bytes per parameter, throughput, precision) and the command that prints
them are in ``docs/benchmarks.md``.

Packing and weighting
---------------------
A model update is flattened (:func:`flatten_state`) into one float64 vector and cut into
chunks of ``lanes - reserved`` values; each chunk becomes one ciphertext (lanes ``[0, slots)``
are the real parts of the slots, ``[slots, 2 * slots)`` their imaginary parts). Reserved
lanes (positions chosen by a :class:`SlotLayout`) carry protocol values - the membership tags
and the aggregation weight, see ``tags``. A site multiplies its update by its weight
``w = n_examples / weight_scale`` and puts ``w`` itself in a reserved slot, so the decrypted
sum yields ``sum_i w_i u_i`` and ``sum_i w_i``. ``weight_scale`` is a public, consortium-wide
number chosen so that ``w * |u| <= max_abs_value`` (100) and the total weight is not tiny
(the flooding noise is divided by ``sum(w)``): the order of magnitude of a site's example
count is a good choice (e.g. 1000). FedAvg is the ratio and does not otherwise depend on it.

Ciphertexts go through SEAL's file-based ``save``/``load`` (the only serialisation
``tenseal.sealapi`` exposes), using a private scratch directory (``/dev/shm`` when
available). Only ciphertexts touch it - never keys or plaintexts.
"""

from __future__ import annotations

import atexit
import itertools
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from fedhealth.errors import ConfigError, CryptoError
from fedhealth.privacy.he.compact import compact, expand

#: SEAL's maximum total coefficient-modulus bits for 128-bit security (HE standard).
SEAL_MAX_COEFF_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

__all__ = [
    "CKKSContext",
    "FlatSpec",
    "HEParams",
    "SlotLayout",
    "decrypt_sum",
    "encrypt_update",
    "flatten_state",
    "load_context",
    "make_secret_context",
    "pack",
    "public_context",
    "unflatten",
    "unpack",
]


@dataclass(frozen=True)
class HEParams:
    """CKKS and packing parameters shared by the whole consortium.

    Attributes
    ----------
    poly_modulus_degree
        Ring dimension N; a ciphertext holds N/2 slots.
    coeff_mod_bit_sizes
        Bit sizes of the coefficient-modulus primes. Ciphertexts carry all but the last
        (SEAL's special prime).
    global_scale_bits
        log2 of the CKKS scale; sets the precision.
    symmetric
        Sites encrypt with the secret key (seeded, half-size ciphertexts; the coordinator
        holds no key at all). ``False`` uses public-key encryption (for comparisons).
    hidden_tags
        Extra membership-tag slots per chunk at secret, per-round positions (on top of the
        fixed tag slot 0). ``0`` gives the bare fixed-slot protocol.
    tag_atol
        Absolute tolerance of the tag check after decryption.
    max_abs_value
        Largest ``|w * u|`` a site may put in a slot.
    max_sites
        Largest number of contributions in one sum (sets the wrap-around headroom).
    flood_bits
        Released aggregates get deterministic Gaussian noise of std ``2**-flood_bits`` to
        hide the decryption noise (``None`` disables).
    complex_slots
        Use the imaginary part of every slot too: a chunk carries ``2 * slots`` real values
        ("lanes") for the cost of ``slots``. ``False`` uses real parts only (the format
        before 2026-12, kept for comparisons).
    compact_wire
        Ciphertexts travel in :mod:`~fedhealth.privacy.he.compact` form (each residue in the
        bit length of its prime) instead of SEAL's zstd stream.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (59, 60)
    global_scale_bits: int = 40
    symmetric: bool = True
    hidden_tags: int = 31
    tag_atol: float = 1e-6
    max_abs_value: float = 100.0
    max_sites: int = 512
    flood_bits: int | None = 20
    complex_slots: bool = True
    compact_wire: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes)
        )

    @property
    def slots(self) -> int:
        """Slots per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def lanes(self) -> int:
        """Real values per ciphertext: ``2 * slots`` with complex slots, else ``slots``."""
        return self.slots * (2 if self.complex_slots else 1)

    @property
    def scale(self) -> float:
        """The CKKS scale 2^global_scale_bits."""
        return 2.0**self.global_scale_bits

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext carries (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def reserved_slots(self) -> int:
        """Protocol slots per chunk: tag slot 0, weight slot 1 and the hidden tags."""
        return 2 + self.hidden_tags

    @property
    def reserved_lanes(self) -> int:
        """Protocol lanes per chunk: both parts of every reserved slot with complex slots
        (a tag beside each tag and beside the weight), else their real parts."""
        return self.reserved_slots * (2 if self.complex_slots else 1)

    @property
    def chunk_capacity(self) -> int:
        """Update values per ciphertext chunk."""
        return self.lanes - self.reserved_lanes

    def validate(self) -> HEParams:
        """Check security and headroom; return ``self``.

        Raises
        ------
        ConfigError
            Parameters below 128-bit security, sums that could wrap around, or a layout
            that does not fit a ciphertext.
        """
        n = self.poly_modulus_degree
        bits = self.coeff_mod_bit_sizes
        if n not in SEAL_MAX_COEFF_BITS_128:
            raise ConfigError(
                f"HE poly_modulus_degree {n} unsupported; use one of "
                f"{sorted(SEAL_MAX_COEFF_BITS_128)}"
            )
        if len(bits) < 2 or any(not 20 <= b <= 60 for b in bits):
            raise ConfigError(
                f"HE coeff_mod_bit_sizes {list(bits)}: need >= 2 primes of 20..60 bits "
                "(the last is SEAL's special prime)"
            )
        if sum(bits) > SEAL_MAX_COEFF_BITS_128[n]:
            raise ConfigError(
                f"HE coeff_mod_bit_sizes {list(bits)} total {sum(bits)} bits > "
                f"{SEAL_MAX_COEFF_BITS_128[n]} allowed for 128-bit security at N={n}; "
                "use fewer/smaller primes or a larger poly_modulus_degree"
            )
        # A slot holds up to sqrt(2) * max_abs_value in modulus with complex slots.
        peak = self.max_abs_value * self.max_sites * (math.sqrt(2) if self.complex_slots else 1)
        need = self.global_scale_bits + math.log2(peak) + 2
        if need > self.data_bits:
            raise ConfigError(
                f"HE scale 2^{self.global_scale_bits} x max_abs_value {self.max_abs_value} x "
                f"max_sites {self.max_sites} needs {need:.1f} bits but ciphertexts carry "
                f"{self.data_bits}; lower global_scale_bits or max_abs_value"
            )
        if self.max_sites < 2:
            raise ConfigError(f"HE max_sites must be >= 2, got {self.max_sites}")
        if self.hidden_tags < 0 or self.reserved_slots >= self.slots // 2:
            raise ConfigError(
                f"HE hidden_tags {self.hidden_tags} out of range for {self.slots} slots"
            )
        if not self.tag_atol > 0:
            raise ConfigError(f"HE tag_atol must be > 0, got {self.tag_atol}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HEParams:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown HE parameter(s) {sorted(unknown)}")
        return cls(**dict(d))


# --------------------------------------------------------------------------- scratch I/O

_SCRATCH: dict[str, Any] = {"dir": None, "pid": None}
_COUNTER = itertools.count()
_LOCK = threading.Lock()


def _scratch_dir() -> Path:
    with _LOCK:
        if _SCRATCH["dir"] is None or _SCRATCH["pid"] != os.getpid():
            base = (
                "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            )
            d = tempfile.mkdtemp(prefix="fedhealth-he-", dir=base)  # mode 0700
            _SCRATCH["dir"], _SCRATCH["pid"] = d, os.getpid()
            atexit.register(shutil.rmtree, d, True)
        return Path(_SCRATCH["dir"])


def _scratch_path() -> str:
    return str(_scratch_dir() / f"{threading.get_ident()}-{next(_COUNTER)}.bin")


def _save(obj: Any) -> bytes:
    path = _scratch_path()
    try:
        obj.save(path)
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        if os.path.exists(path):
            os.unlink(path)


# --------------------------------------------------------------------------- contexts


def _new_ts_context(params: HEParams) -> ts.Context:
    enc_type = ts.ENCRYPTION_TYPE.SYMMETRIC if params.symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            encryption_type=enc_type,
            n_threads=1,
        )
    except ValueError as exc:
        raise ConfigError(f"SEAL refused HE parameters {params.to_dict()}: {exc}") from exc
    ctx.global_scale = params.scale
    return ctx


def make_secret_context(params: HEParams) -> bytes:
    """Create a fresh CKKS key pair and return the serialized *secret* context.

    Parameters
    ----------
    params
        Consortium parameters (validated here).

    Returns
    -------
    bytes
        TenSEAL context with the secret key (and, for asymmetric params, the public key);
        no Galois or relinearisation keys. Only sites may hold these bytes.
    """
    params.validate()
    ctx = _new_ts_context(params)
    return ctx.serialize(
        save_public_key=not params.symmetric,
        save_secret_key=True,
        save_galois_keys=False,
        save_relin_keys=False,
    )


def public_context(secret_ctx_bytes: bytes) -> bytes:
    """Strip a secret context down to what the coordinator may hold.

    Returns
    -------
    bytes
        Serialized TenSEAL context with the encryption parameters and scale only: no secret
        key, no public key, no Galois or relinearisation keys. It can add ciphertexts and
        nothing else.
    """
    try:
        ctx = ts.context_from(secret_ctx_bytes, n_threads=1)
    except Exception as exc:
        raise CryptoError(f"cannot read HE secret context ({exc})") from exc
    return ctx.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


class CKKSContext:
    """A loaded CKKS context with the SEAL objects needed for our operations.

    Parameters
    ----------
    ts_context
        The TenSEAL context (private at sites, key-less at the coordinator).
    params
        Consortium parameters; N and scale must match the context.
    """

    def __init__(self, ts_context: ts.Context, params: HEParams) -> None:
        self.params = params
        self.ts_context = ts_context
        self._seal = ts_context.data.seal_context()
        first = self._seal.first_context_data().parms()
        if first.poly_modulus_degree() != params.poly_modulus_degree:
            raise CryptoError(
                f"HE context has N={first.poly_modulus_degree()} but the registry says "
                f"{params.poly_modulus_degree}; the context and registry come from different "
                "ceremonies"
            )
        self.encoder = sealapi.CKKSEncoder(self._seal)
        self.evaluator = sealapi.Evaluator(self._seal)
        self.data_parms_id = list(self._seal.first_parms_id())
        self._moduli_bits = [m.bit_count() for m in first.coeff_modulus()]
        self.can_decrypt = bool(ts_context.is_private())
        self._encryptor: Any = None
        self._decryptor: Any = None

    @classmethod
    def from_bytes(cls, data: bytes, params: HEParams) -> CKKSContext:
        """Load a serialized TenSEAL context (see :func:`load_context`)."""
        try:
            ctx = ts.context_from(data, n_threads=1)
        except Exception as exc:
            raise CryptoError(f"cannot read HE context ({exc}); the file is corrupt") from exc
        return cls(ctx, params)

    # -- site side ---------------------------------------------------------------------

    def _need_secret(self, action: str) -> None:
        if not self.can_decrypt:
            raise CryptoError(
                f"cannot {action}: this HE context holds no secret key (it is the coordinator's "
                "public context); only consortium sites can do this"
            )

    def encrypt(self, lanes: np.ndarray) -> bytes:
        """Encrypt one chunk of exactly ``params.lanes`` real values; return wire bytes.

        With complex slots, values ``[0, slots)`` go to the real parts of the slots and
        ``[slots, 2 * slots)`` to their imaginary parts.
        """
        self._need_secret("encrypt")
        lanes = np.asarray(lanes, dtype=np.float64)
        if lanes.shape != (self.params.lanes,):
            raise ConfigError(
                f"a chunk holds exactly {self.params.lanes} values, got shape {lanes.shape}"
            )
        n = self.params.slots
        values = (lanes[:n] + 1j * lanes[n:]) if self.params.complex_slots else lanes
        if self._encryptor is None:
            sk = self.ts_context.data.secret_key()
            if self.params.symmetric:
                self._encryptor = sealapi.Encryptor(self._seal, sk)
            else:
                self._encryptor = sealapi.Encryptor(self._seal, self.ts_context.data.public_key())
        pt = sealapi.Plaintext()
        try:
            self.encoder.encode(values.tolist(), self.params.scale, pt)
        except ValueError as exc:
            raise CryptoError(
                f"cannot encode chunk ({exc}); values too large for the HE scale"
            ) from exc
        if self.params.symmetric:
            return self._to_wire(_save(self._encryptor.encrypt_symmetric(pt)))
        ct = sealapi.Ciphertext()
        self._encryptor.encrypt(pt, ct)
        return self._to_wire(_save(ct))

    def decrypt(self, ct: Any) -> np.ndarray:
        """Decrypt and decode a loaded ciphertext into ``params.lanes`` real values."""
        self._need_secret("decrypt")
        if self._decryptor is None:
            self._decryptor = sealapi.Decryptor(self._seal, self.ts_context.data.secret_key())
        pt = sealapi.Plaintext()
        self._decryptor.decrypt(ct, pt)
        if self.params.complex_slots:
            z = np.asarray(self.encoder.decode_complex(pt), dtype=np.complex128)
            return np.concatenate((z.real, z.imag))
        return np.asarray(self.encoder.decode_double(pt), dtype=np.float64)

    # -- both sides --------------------------------------------------------------------

    def load(self, data: bytes, *, what: str = "ciphertext") -> Any:
        """Deserialize and check a ciphertext.

        Checks that it is a fresh-shaped ciphertext of this context: two polynomials, NTT
        form, at the data level of these parameters, with scale exactly ``params.scale``
        (products and rescaled ciphertexts are refused).

        Raises
        ------
        CryptoError
            Malformed bytes, or a ciphertext of another shape/level/scale.
        """
        path = _scratch_path()
        ct = sealapi.Ciphertext()
        try:
            if self.params.compact_wire:
                data = expand(data, self._moduli_bits)
            with open(path, "wb") as fh:
                fh.write(data)
            ct.load(self._seal, path)
        except Exception as exc:
            raise CryptoError(
                f"{what} is not a valid ciphertext for these HE parameters ({exc})"
            ) from exc
        finally:
            if os.path.exists(path):
                os.unlink(path)
        if ct.size() != 2 or not ct.is_ntt_form():
            raise CryptoError(
                f"{what} has {ct.size()} polynomials; only fresh-shaped ciphertexts are accepted"
            )
        if list(ct.parms_id()) != self.data_parms_id:
            raise CryptoError(f"{what} is at another modulus level or under other HE parameters")
        if ct.scale != self.params.scale:
            raise CryptoError(
                f"{what} has scale {ct.scale!r}, expected 2^{self.params.global_scale_bits}"
            )
        return ct

    def dump(self, ct: Any) -> bytes:
        """Serialize a loaded ciphertext (full size: sums are not seeded)."""
        return self._to_wire(_save(ct))

    def _to_wire(self, seal_bytes: bytes) -> bytes:
        return compact(seal_bytes, self._moduli_bits) if self.params.compact_wire else seal_bytes

    def add_inplace(self, acc: Any, ct: Any) -> None:
        """``acc += ct`` (exact in Z_q)."""
        self.evaluator.add_inplace(acc, ct)

    def sub_inplace(self, acc: Any, ct: Any) -> None:
        """``acc -= ct``; undoes :meth:`add_inplace` exactly."""
        self.evaluator.sub_inplace(acc, ct)


def load_context(data: bytes, params: HEParams) -> CKKSContext:
    """Load a secret (site) or public (coordinator) context serialized by this module."""
    return CKKSContext.from_bytes(data, params)


# --------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class SlotLayout:
    """Which slots of each chunk are reserved for protocol values.

    Attributes
    ----------
    lanes
        Real values per ciphertext (:attr:`HEParams.lanes`).
    n_reserved
        Reserved slots per chunk (constant).
    positions
        ``positions(c)`` -> int array of the ``n_reserved`` reserved slot indices of chunk
        ``c`` (distinct). ``None`` means no reserved slots.
    """

    lanes: int
    n_reserved: int = 0
    positions: Callable[[int], np.ndarray] | None = None

    @property
    def capacity(self) -> int:
        """Update values per chunk."""
        return self.lanes - self.n_reserved

    def n_chunks(self, n_values: int) -> int:
        """Chunks needed for ``n_values`` values (at least one)."""
        return max(1, -(-n_values // self.capacity))

    def reserved(self, c: int) -> np.ndarray:
        """Reserved positions of chunk ``c``."""
        if self.positions is None or self.n_reserved == 0:
            return np.empty(0, dtype=np.int64)
        return self.positions(c)

    @classmethod
    def plain(cls, params: HEParams) -> SlotLayout:
        """A layout without reserved slots."""
        return cls(params.lanes)


def pack(
    vec: np.ndarray,
    layout: SlotLayout,
    reserved_values: Callable[[int], np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Cut ``vec`` into per-ciphertext slot arrays.

    Parameters
    ----------
    vec
        1-D float vector.
    layout
        Where the reserved slots of each chunk are.
    reserved_values
        ``reserved_values(c)`` -> values for ``layout.reserved(c)`` (zeros if ``None``).

    Returns
    -------
    list of np.ndarray
        ``layout.n_chunks(len(vec))`` arrays of ``layout.lanes`` float64 each; the last
        chunk is zero-padded.
    """
    v = np.asarray(vec, dtype=np.float64).ravel()
    cap = layout.capacity
    out = []
    for c in range(layout.n_chunks(v.size)):
        arr = np.zeros(layout.lanes, dtype=np.float64)
        seg = v[c * cap : (c + 1) * cap]
        pos = layout.reserved(c)
        if pos.size:
            mask = np.ones(layout.lanes, dtype=bool)
            mask[pos] = False
            data_idx = np.flatnonzero(mask)[: seg.size]
            arr[data_idx] = seg
            if reserved_values is not None:
                arr[pos] = reserved_values(c)
        else:
            arr[: seg.size] = seg
        out.append(arr)
    return out


def unpack(
    slot_arrays: Sequence[np.ndarray], layout: SlotLayout, n_values: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack`.

    Returns
    -------
    (data, reserved)
        ``data``: the first ``n_values`` values; ``reserved``: array
        ``[n_chunks, n_reserved]`` of the reserved slots, in ``layout.reserved(c)`` order.
    """
    parts = []
    res = np.zeros((len(slot_arrays), layout.n_reserved), dtype=np.float64)
    for c, arr in enumerate(slot_arrays):
        pos = layout.reserved(c)
        if pos.size:
            mask = np.ones(layout.lanes, dtype=bool)
            mask[pos] = False
            parts.append(arr[mask])
            res[c] = arr[pos]
        else:
            parts.append(arr)
    data = np.concatenate(parts) if parts else np.empty(0)
    if data.size < n_values:
        raise CryptoError(
            f"{len(slot_arrays)} chunk(s) hold {data.size} values, {n_values} expected"
        )
    return data[:n_values], res


def encrypt_update(
    vec: np.ndarray,
    ctx: CKKSContext,
    *,
    layout: SlotLayout | None = None,
    reserved_values: Callable[[int], np.ndarray] | None = None,
) -> list[bytes]:
    """Pack and encrypt a vector; return one wire blob per chunk.

    Raises
    ------
    ConfigError
        A value (or reserved value) exceeds ``params.max_abs_value`` in magnitude, or is
        not finite: the encrypted sum could wrap around.
    """
    layout = layout or SlotLayout.plain(ctx.params)
    arrays = pack(vec, layout, reserved_values)
    limit = ctx.params.max_abs_value
    blobs = []
    for c, arr in enumerate(arrays):
        peak = float(np.max(np.abs(arr))) if arr.size else 0.0
        if not np.isfinite(peak) or peak > limit:
            raise ConfigError(
                f"HE chunk {c} holds a value of magnitude {peak:g} > max_abs_value {limit:g}; "
                "clip the update or raise weight_scale so n_examples/weight_scale * |update| fits"
            )
        blobs.append(ctx.encrypt(arr))
    return blobs


def decrypt_sum(
    chunks: Sequence[bytes],
    ctx: CKKSContext,
    *,
    n_values: int,
    layout: SlotLayout | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decrypt summed chunks (site only) and unpack them.

    This is the bare decryption: it performs no protocol checks. Use
    ``decrypt.verify_and_decrypt`` for anything the coordinator sends.

    Returns
    -------
    (data, reserved)
        As :func:`unpack`.
    """
    layout = layout or SlotLayout.plain(ctx.params)
    arrays = [ctx.decrypt(ctx.load(b, what=f"sum chunk {i}")) for i, b in enumerate(chunks)]
    return unpack(arrays, layout, n_values)


# --------------------------------------------------------------------------- state dicts


@dataclass(frozen=True)
class FlatSpec:
    """How a state dict was flattened.

    Attributes
    ----------
    entries
        ``(name, shape, dtype)`` of each flattened entry, in order. ``dtype`` is the numpy
        dtype name, or ``torch.<dtype>`` for tensors.
    skipped
        Names of non-floating entries (e.g. integer counters) left out.
    """

    entries: tuple[tuple[str, tuple[int, ...], str], ...]
    skipped: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Total number of values."""
        return int(sum(math.prod(shape) for _, shape, _ in self.entries))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "entries": [[n, list(s), d] for n, s, d in self.entries],
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlatSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple((n, tuple(int(x) for x in s), dt) for n, s, dt in d["entries"]),
            tuple(d.get("skipped", ())),
        )


def _as_numpy(value: Any) -> tuple[np.ndarray, str]:
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        t = value.detach().cpu()
        dtype = str(t.dtype)
        if not t.is_floating_point():
            return t.numpy(), dtype
        return t.to(dtype=__import__("torch").float64).numpy(), dtype
    arr = np.asarray(value)
    return arr, arr.dtype.name


def flatten_state(state: Mapping[str, Any]) -> tuple[np.ndarray, FlatSpec]:
    """Flatten a model state dict into one float64 vector.

    Parameters
    ----------
    state
        ``name -> torch.Tensor`` (a ``state_dict()``) or ``name -> np.ndarray``. Floating
        entries are flattened in the dict's order; integer/bool entries (e.g. BatchNorm's
        ``num_batches_tracked``) are skipped and listed in the spec.

    Returns
    -------
    (vec, spec)
    """
    parts: list[np.ndarray] = []
    entries = []
    skipped = []
    for name, value in state.items():
        arr, dtype = _as_numpy(value)
        if not (np.issubdtype(arr.dtype, np.floating)):
            skipped.append(name)
            continue
        entries.append((name, tuple(int(s) for s in arr.shape), dtype))
        parts.append(arr.astype(np.float64, copy=False).ravel())
    vec = np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)
    return vec, FlatSpec(tuple(entries), tuple(skipped))


def unflatten(vec: np.ndarray, spec: FlatSpec, *, as_torch: bool = False) -> dict[str, Any]:
    """Rebuild the flattened entries of a state dict.

    Parameters
    ----------
    vec
        Vector of ``spec.size`` values (longer vectors are refused).
    spec
        From :func:`flatten_state`.
    as_torch
        Return ``torch.Tensor`` values with the original dtypes instead of numpy arrays.

    Returns
    -------
    dict
        ``name -> array`` for every flattened entry (skipped entries are not included).
    """
    v = np.asarray(vec).ravel()
    if v.size != spec.size:
        raise ConfigError(f"vector has {v.size} values but the model spec needs {spec.size}")
    out: dict[str, Any] = {}
    pos = 0
    torch = __import__("torch") if as_torch else None
    for name, shape, dtype in spec.entries:
        n = math.prod(shape)
        piece = v[pos : pos + n].reshape(shape)
        pos += n
        if dtype.startswith("torch."):
            if torch is not None:
                out[name] = torch.from_numpy(piece.copy()).to(getattr(torch, dtype[6:]))
            else:
                out[name] = piece.astype("float32" if dtype == "torch.bfloat16" else dtype[6:])
        else:
            arr = piece.astype(dtype)
            out[name] = torch.from_numpy(arr) if torch is not None else arr
    return out
