"""Secret randomness for a site's DP noise and Poisson sampling, reproducible at that site.

DP-SGD is only private if nobody else can predict its noise or its batches. An
experiment's seed is public (it is in the config), so it must never seed them.
Instead each site keeps a 256-bit secret key in its workspace (created once from
the OS's entropy, readable by the site's user only) and derives every seed as

    HMAC-SHA256(key, purpose | experiment | round | run id | round nonce | digest of
                 the request, of the global weights and of the training data)

Identical inputs give identical noise, so a rerun of the very same round of the
same run reproduces the very same update (a repeated release reveals nothing
new); any change to the run id, the round's nonce (fresh in every encrypted
round), the request, the global model or the data gives fresh, independent
noise, so two releases never share noise that a difference could cancel. The
public training seed (:func:`training_seed`) includes the run id and nonce too.
Deleting the key only makes the next runs unreproducible, never less private.

The derived 63-bit seed drives torch's (or numpy's) generator, as Opacus's own
non-secure mode does; it is not hardened against floating-point attacks
(Mironov 2012). Opacus's ``secure_mode`` needs ``torchcsprng``, which is not
installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.errors import FedHealthError

KEY_BYTES = 32


def create_key_file(path: Path, n_bytes: int) -> None:
    """Write ``n_bytes`` random bytes to ``path`` (mode 0600) unless it already exists.

    Parameters
    ----------
    path : Path
        The key file; its folder is created. An existing file is left as it is.
    n_bytes : int
        Length of the key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(n_bytes))
            os.fsync(fd)
        finally:
            os.close(fd)


def load_or_create_key(path: Path) -> bytes:
    """Read the site's secret noise key, creating it (mode 0600) on first use.

    Parameters
    ----------
    path : Path
        The key file in the site's workspace.

    Returns
    -------
    bytes
        32 secret bytes.

    Raises
    ------
    FedHealthError
        If the file exists but is not a key.
    """
    path = Path(path)
    create_key_file(path, KEY_BYTES)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise FedHealthError(
            f"{path} is not a DP noise key ({len(key)} bytes, expected {KEY_BYTES}). Move it "
            "away; the site creates a new one (earlier runs then cannot be reproduced)."
        )
    return key


def digest_arrays(arrays: dict[str, np.ndarray] | Iterable[np.ndarray]) -> str:
    """SHA-256 over arrays (by sorted name for a dict), dtype and shape included.

    Parameters
    ----------
    arrays : dict of name -> array, or iterable of arrays

    Returns
    -------
    str
        Hex digest.
    """
    h = hashlib.sha256()
    items = sorted(arrays.items()) if isinstance(arrays, dict) else enumerate(arrays)
    for name, a in items:
        a = np.ascontiguousarray(a)
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def derive_seed(key: bytes, purpose: str, context: dict[str, Any]) -> int:
    """A 63-bit seed from the site's key, a purpose label and the round's context.

    Parameters
    ----------
    key : bytes
        The site's secret key.
    purpose : str
        E.g. ``"dp-sgd-noise"``, ``"poisson-sampling"``, ``"site-noise"``.
    context : dict
        JSON-serialisable description of the release (experiment, round, digests).

    Returns
    -------
    int
    """
    msg = json.dumps([purpose, context], sort_keys=True, separators=(",", ":")).encode()
    return int.from_bytes(hmac.new(key, msg, hashlib.sha256).digest()[:8], "big") >> 1


def round_binding(run_id: str | None, nonce: str | None) -> dict[str, str]:
    """What tells one run's round apart from a replay of it under another run.

    Parameters
    ----------
    run_id : str or None
        The MLflow run id the coordinator sends (``mlflow-run-id``).
    nonce : str or None
        The encrypted round's fresh nonce (``he-nonce``), absent in plaintext rounds.

    Returns
    -------
    dict
        ``{"run": ..., "nonce": ...}`` (empty strings when absent), for a seed's context.
    """
    return {"run": str(run_id or ""), "nonce": str(nonce or "")}


def training_seed(
    spec_seed: int,
    round_: int,
    site_index: int,
    run_id: str | None = None,
    nonce: str | None = None,
) -> int:
    """The seed of a site's local training (shuffling, dropout, initial RNG state).

    Public: it drives no privacy noise (see :func:`derive_seed` for that). It still
    includes the run id and the round's nonce, so a round replayed under another run id
    or nonce is not trained bit-identically (a difference of two replays must not cancel
    everything but one site's contribution).

    Parameters
    ----------
    spec_seed : int
        The experiment's seed.
    round_ : int
        Round number.
    site_index : int
        The site's index in the federation.
    run_id, nonce : str, optional
        See :func:`round_binding`. Without either, the seed is the experiment's historical
        ``spec_seed * 100003 + round * 1009 + site_index``.

    Returns
    -------
    int
        A seed in ``[0, 2**63)``.
    """
    base = int(spec_seed) * 100_003 + int(round_) * 1_009 + int(site_index)
    binding = round_binding(run_id, nonce)
    if not any(binding.values()):
        return base
    msg = json.dumps(["training-seed", base, binding], sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(msg.encode()).digest()[:8], "big") >> 1
