"""Site identity keys, key wrapping and signatures.

Every consortium member (site) has one :class:`SiteIdentity`:

* an **Ed25519** signing key: signs its encrypted contributions, so the coordinator and
  the other sites can tell who sent what;
* an **X25519** key-agreement key: the CKKS secret material is *wrapped* for it
  (ephemeral X25519 + HKDF-SHA256 + AES-256-GCM), so it can travel through untrusted
  storage or the coordinator without being readable.

Private keys are stored as PEM (PKCS#8) in one file written with mode ``0600``; loading
refuses a private key file that the group or others can read. Public parts are exported as
a JSON-friendly dict of base64 strings (:meth:`SiteIdentity.public_bundle`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedhealth.errors import CryptoError

WRAP_MAGIC = b"FHWRAP1\x00"
_WRAP_HKDF_INFO = b"fedhealth/wrap/v1/"
_NAME_HEADER = "# fedhealth site identity: "
_PEM_BLOCK = re.compile(rb"-----BEGIN [A-Z ]+-----.+?-----END [A-Z ]+-----\n?", re.S)

__all__ = [
    "SiteIdentity",
    "b64d",
    "b64e",
    "ed25519_public",
    "generate_identity",
    "load_private",
    "sign",
    "unwrap_secret",
    "verify",
    "wrap_secret",
    "write_private_file",
    "write_public_file",
    "x25519_public",
]


def b64e(data: bytes) -> str:
    """Encode bytes as standard base64 text."""
    return base64.b64encode(data).decode("ascii")


def b64d(text: str, *, what: str = "value") -> bytes:
    """Decode base64 text, raising :class:`CryptoError` naming ``what`` if it is malformed."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise CryptoError(f"{what} is not valid base64 ({exc}); re-export it") from exc


def _raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SiteIdentity:
    """One site's long-term keys.

    Attributes
    ----------
    name
        The site's name in the consortium registry.
    signing_key
        Ed25519 private key used to sign contributions.
    kx_key
        X25519 private key for which consortium secrets are wrapped.
    """

    name: str
    signing_key: Ed25519PrivateKey
    kx_key: X25519PrivateKey

    @property
    def signing_public(self) -> bytes:
        """Raw 32-byte Ed25519 public key."""
        return _raw_public(self.signing_key.public_key())

    @property
    def kx_public(self) -> bytes:
        """Raw 32-byte X25519 public key."""
        return _raw_public(self.kx_key.public_key())

    def public_bundle(self) -> dict[str, str]:
        """Return the public half as JSON-ready base64 strings.

        Returns
        -------
        dict
            ``{"site", "ed25519", "x25519", "fingerprint"}``; the fingerprint is the first 16
            hex digits of SHA-256 over both public keys, for reading out over the phone.
        """
        fp = hashlib.sha256(self.signing_public + self.kx_public).hexdigest()[:16]
        return {
            "site": self.name,
            "ed25519": b64e(self.signing_public),
            "x25519": b64e(self.kx_public),
            "fingerprint": fp,
        }

    def save_private(self, path: str | Path, *, password: bytes | None = None) -> None:
        """Write both private keys as PEM to ``path`` with mode ``0600``.

        Parameters
        ----------
        path
            Target file; replaced atomically if it exists.
        password
            Optional passphrase; the PEM blocks are then encrypted (PKCS#8 best available).
        """
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        blocks = [
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
            for key in (self.signing_key, self.kx_key)
        ]
        header = f"{_NAME_HEADER}{self.name}\n".encode()
        write_private_file(Path(path), header + b"".join(blocks))


def generate_identity(name: str) -> SiteIdentity:
    """Create a fresh identity (Ed25519 + X25519) for site ``name``."""
    return SiteIdentity(name, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


def _check_private_permissions(path: Path) -> None:
    if os.name != "posix":
        return
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CryptoError(
            f"private key file {path} is readable by group or others "
            f"(mode {stat.filemode(mode)}); restrict it with `chmod 600 {path}` and check "
            "nobody else copied it"
        )


def load_private(
    path: str | Path, *, password: bytes | None = None, site: str | None = None
) -> SiteIdentity:
    """Load an identity written by :meth:`SiteIdentity.save_private`.

    Parameters
    ----------
    path
        The PEM file. Refused if group/world can read it.
    password
        Passphrase if the file was saved with one.
    site
        Expected site name; refused if the file belongs to another site.

    Returns
    -------
    SiteIdentity

    Raises
    ------
    CryptoError
        Unreadable, wrongly permissioned, malformed or wrong-site key file.
    """
    p = Path(path)
    if not p.is_file():
        raise CryptoError(f"private key file {p} not found; run the consortium key ceremony")
    _check_private_permissions(p)
    text = p.read_bytes()
    name = None
    first = text.split(b"\n", 1)[0].decode("utf-8", "replace")
    if first.startswith(_NAME_HEADER):
        name = first[len(_NAME_HEADER) :].strip()
    pieces = _PEM_BLOCK.findall(text)
    sig = kx = None
    for pem in pieces:
        try:
            key = serialization.load_pem_private_key(pem, password=password)
        except (ValueError, TypeError) as exc:
            raise CryptoError(
                f"cannot read private key in {p} ({exc}); wrong passphrase or corrupt file"
            ) from exc
        if isinstance(key, Ed25519PrivateKey):
            sig = key
        elif isinstance(key, X25519PrivateKey):
            kx = key
    if sig is None or kx is None or name is None:
        raise CryptoError(
            f"{p} is not a fedhealth site identity (needs a name header, an Ed25519 and an "
            "X25519 key); re-run the key ceremony for this site"
        )
    if site is not None and name != site:
        raise CryptoError(f"{p} holds the identity of site {name!r}, not {site!r}")
    return SiteIdentity(name, sig, kx)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask only narrows; make the mode exact
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_private_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically to ``path``, created with mode ``0600`` (owner only)."""
    _write_file(Path(path), data, 0o600)


def write_public_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically to ``path`` with mode ``0644``."""
    _write_file(Path(path), data, 0o644)


_K = TypeVar("_K")


def _parse_public(key: bytes | str, parse: Callable[[bytes], _K], what: str) -> _K:
    raw = b64d(key, what=f"{what} public key") if isinstance(key, str) else key
    try:
        return parse(raw)
    except ValueError as exc:
        raise CryptoError(f"malformed {what} public key ({exc})") from exc


def ed25519_public(key: Ed25519PublicKey | bytes | str) -> Ed25519PublicKey:
    """Coerce raw bytes / base64 text / a key object into an Ed25519 public key."""
    if isinstance(key, Ed25519PublicKey):
        return key
    return _parse_public(key, Ed25519PublicKey.from_public_bytes, "Ed25519")


def x25519_public(key: X25519PublicKey | bytes | str) -> X25519PublicKey:
    """Coerce raw bytes / base64 text / a key object into an X25519 public key."""
    if isinstance(key, X25519PublicKey):
        return key
    return _parse_public(key, X25519PublicKey.from_public_bytes, "X25519")


def _wrap_key(shared: bytes, eph_pub: bytes, recipient_pub: bytes, context_info: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=eph_pub + recipient_pub,
        info=_WRAP_HKDF_INFO + context_info,
    ).derive(shared)


def wrap_secret(
    secret: bytes, recipient_x25519_pub: X25519PublicKey | bytes | str, context_info: bytes
) -> bytes:
    """Encrypt ``secret`` so only the holder of the recipient's X25519 key can read it.

    Ephemeral X25519 key agreement, HKDF-SHA256 (salt = both public keys, info = a fixed
    label + ``context_info``) and AES-256-GCM with ``context_info`` as associated data.

    Parameters
    ----------
    secret
        The bytes to protect.
    recipient_x25519_pub
        Recipient's X25519 public key (object, raw 32 bytes or base64 text).
    context_info
        What the blob is for; must name the recipient site (e.g.
        ``b"fedhealth/he-secret/v1|consortium=...|site=NAME"``). The same bytes are
        required to unwrap, so a blob cannot be replayed for another site or purpose.

    Returns
    -------
    bytes
        ``magic | ephemeral public key (32) | nonce (12) | ciphertext+tag``.
    """
    pub = x25519_public(recipient_x25519_pub)
    eph = X25519PrivateKey.generate()
    eph_pub = _raw_public(eph.public_key())
    key = _wrap_key(eph.exchange(pub), eph_pub, _raw_public(pub), context_info)
    nonce = os.urandom(12)
    return WRAP_MAGIC + eph_pub + nonce + AESGCM(key).encrypt(nonce, secret, context_info)


def unwrap_secret(
    blob: bytes, recipient_private: X25519PrivateKey | SiteIdentity, context_info: bytes
) -> bytes:
    """Recover a secret wrapped by :func:`wrap_secret`.

    Raises
    ------
    CryptoError
        The blob is malformed, was wrapped for another key or another ``context_info``, or
        was modified.
    """
    priv = (
        recipient_private.kx_key
        if isinstance(recipient_private, SiteIdentity)
        else recipient_private
    )
    head = len(WRAP_MAGIC)
    if len(blob) < head + 32 + 12 + 16 or not blob.startswith(WRAP_MAGIC):
        raise CryptoError("wrapped secret is truncated or not a fedhealth wrapped blob")
    eph_pub = blob[head : head + 32]
    nonce = blob[head + 32 : head + 44]
    body = blob[head + 44 :]
    recipient_pub = _raw_public(priv.public_key())
    try:
        shared = priv.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        key = _wrap_key(shared, eph_pub, recipient_pub, context_info)
        return AESGCM(key).decrypt(nonce, body, context_info)
    except (InvalidTag, ValueError) as exc:
        raise CryptoError(
            "cannot unwrap secret: it was wrapped for a different key or purpose, or was "
            "modified; ask the key holder to re-wrap it for this site"
        ) from exc


def sign(key: Ed25519PrivateKey | SiteIdentity, data: bytes) -> bytes:
    """Ed25519 signature (64 bytes) over ``data``."""
    sk = key.signing_key if isinstance(key, SiteIdentity) else key
    return sk.sign(data)


def verify(
    public_key: Ed25519PublicKey | bytes | str, data: bytes, signature: bytes, *, what: str = "data"
) -> None:
    """Check an Ed25519 signature.

    Parameters
    ----------
    public_key
        Signer's public key (object, raw bytes or base64 text).
    data, signature
        The signed bytes and the 64-byte signature.
    what
        Used in the error message (e.g. ``"contribution of site A"``).

    Raises
    ------
    CryptoError
        Missing or invalid signature.
    """
    if not signature:
        raise CryptoError(f"{what} is unsigned; the sender must sign it with its site key")
    try:
        ed25519_public(public_key).verify(signature, data)
    except InvalidSignature as exc:
        raise CryptoError(
            f"{what} has an invalid signature (wrong key, or the content was altered)"
        ) from exc
