"""The consortium key ceremony, on disk.

:func:`init_consortium` creates, in one directory::

    sites/<site>/identity.pem       site's Ed25519 + X25519 private keys (0600)  -> that site only
    sites/<site>/he-secret.wrapped  CKKS secret context + tag key, wrapped for that site
                                    (0600)                                        -> that site only
    public/<site>.json              site's public keys                            -> everyone
    public/registry.json            registry: consortium id, HE params, sites     -> every site
    coordinator/he-public.ctx       key-less CKKS context (parameters only)       -> coordinator
    coordinator/sites.json          the same registry                             -> coordinator
    MANIFEST.txt                    which file goes to which machine

The CKKS secret and the 32-byte tag key are generated at the *key holder* (a site, never the
coordinator) and wrapped for every site's X25519 key. :func:`add_site` lets the key holder
unwrap its copy and re-wrap it for a new site; no other site's files change.

Whoever runs the ceremony sees every site's private key: run it at the key holder (or on an
offline machine), copy each ``sites/<site>/`` to its site only, and delete ``sites/`` from
the ceremony machine afterwards. Sites should take ``public/registry.json`` from the
ceremony, not from the coordinator.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedhealth.errors import ConfigError, CryptoError
from fedhealth.privacy.he.ckks import (
    CKKSContext,
    HEParams,
    load_context,
    make_secret_context,
    public_context,
)
from fedhealth.privacy.he.keys import (
    SiteIdentity,
    ed25519_public,
    generate_identity,
    load_private,
    unwrap_secret,
    wrap_secret,
    write_private_file,
    write_public_file,
)
from fedhealth.privacy.he.ledger import SiteLedger

REGISTRY_FORMAT = "fedhealth-consortium-registry/1"
_SECRET_MAGIC = b"FHHESEC1"
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

__all__ = [
    "CoordinatorKeys",
    "Registry",
    "SiteKeys",
    "SiteRecord",
    "add_site",
    "init_consortium",
    "load_coordinator_keys",
    "load_site_keys",
    "manifest_text",
]


@dataclass(frozen=True)
class SiteRecord:
    """A site's public entry in the registry."""

    name: str
    index: int
    ed25519: str
    x25519: str


@dataclass(frozen=True)
class Registry:
    """The consortium's public registry.

    Attributes
    ----------
    consortium_id
        Random id bound into every wrapped secret.
    key_holder
        The site that generated the HE secret.
    params
        HE parameters of the consortium.
    sites
        ``name -> SiteRecord`` (site index = order of joining).
    """

    consortium_id: str
    key_holder: str
    params: HEParams
    sites: dict[str, SiteRecord] = field(default_factory=dict)

    def signing_key(self, site: str) -> Ed25519PublicKey:
        """The Ed25519 public key of ``site``; :class:`CryptoError` if not a member."""
        rec = self.sites.get(site)
        if rec is None:
            raise CryptoError(f"{site!r} is not a site of consortium {self.consortium_id}")
        return ed25519_public(rec.ed25519)

    def to_json(self) -> bytes:
        """Canonical JSON bytes."""
        d = {
            "format": REGISTRY_FORMAT,
            "consortium_id": self.consortium_id,
            "key_holder": self.key_holder,
            "params": self.params.to_dict(),
            "sites": [
                {"name": r.name, "index": r.index, "ed25519": r.ed25519, "x25519": r.x25519}
                for r in sorted(self.sites.values(), key=lambda r: r.index)
            ],
        }
        return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, source: str = "registry") -> Registry:
        """Parse :meth:`to_json` output; :class:`ConfigError` naming ``source`` if invalid."""
        try:
            d = json.loads(data)
            if d.get("format") != REGISTRY_FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {REGISTRY_FORMAT!r}")
            sites = {
                s["name"]: SiteRecord(
                    str(s["name"]), int(s["index"]), str(s["ed25519"]), str(s["x25519"])
                )
                for s in d["sites"]
            }
            return cls(
                str(d["consortium_id"]),
                str(d["key_holder"]),
                HEParams.from_dict(d["params"]),
                sites,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{source} is not a valid consortium registry ({exc})") from exc

    @classmethod
    def load(cls, path: str | Path) -> Registry:
        """Read a registry file."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"consortium registry {p} not found; run `fedhealth consortium init`")
        return cls.from_json(p.read_bytes(), str(p))


@dataclass(frozen=True)
class SiteKeys:
    """Everything a site needs for encrypted aggregation.

    Attributes
    ----------
    identity
        The site's private identity.
    secret_context
        CKKS context with the secret key.
    tag_key
        The consortium membership-tag key (32 bytes).
    registry
        The consortium registry.
    ledger
        Per-round memory of contributions and decryptions.
    """

    identity: SiteIdentity
    secret_context: CKKSContext
    tag_key: bytes
    registry: Registry
    ledger: SiteLedger = field(default_factory=SiteLedger)

    @property
    def site(self) -> str:
        """This site's name."""
        return self.identity.name

    @property
    def params(self) -> HEParams:
        """The consortium HE parameters."""
        return self.registry.params


@dataclass(frozen=True)
class CoordinatorKeys:
    """What the coordinator holds: a key-less context and the registry."""

    public_context: CKKSContext
    registry: Registry


# --------------------------------------------------------------------------- helpers


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _SITE_NAME.fullmatch(name):
        raise ConfigError(
            f"site name {name!r} is not allowed: use 1-64 letters, digits, '_', '.', '-' "
            "starting with a letter or digit"
        )


def _check_capacity(n_sites: int, params: HEParams) -> None:
    """Refuse a consortium larger than the HE sum's headroom (``params.max_sites``)."""
    if n_sites > params.max_sites:
        raise ConfigError(
            f"a consortium of {n_sites} sites exceeds the HE parameters' max_sites "
            f"{params.max_sites}: a sum of that many contributions could wrap around the CKKS "
            "modulus. Start a new ceremony with a larger max_sites (and a smaller "
            "max_abs_value, HEParams.validate says what fits)"
        )


def _wrap_info(consortium_id: str, site: str) -> bytes:
    return f"fedhealth/he-secret/v1|consortium={consortium_id}|site={site}".encode()


def _pack_secret(params: HEParams, secret_ctx: bytes, tag_key: bytes) -> bytes:
    out = bytearray(_SECRET_MAGIC)
    for part in (json.dumps(params.to_dict(), sort_keys=True).encode(), secret_ctx, tag_key):
        out += len(part).to_bytes(8, "big") + part
    return bytes(out)


def _unpack_secret(blob: bytes, source: str) -> tuple[HEParams, bytes, bytes]:
    if not blob.startswith(_SECRET_MAGIC):
        raise CryptoError(f"{source} does not contain a fedhealth HE secret")
    parts, pos = [], len(_SECRET_MAGIC)
    for _ in range(3):
        n = int.from_bytes(blob[pos : pos + 8], "big")
        parts.append(blob[pos + 8 : pos + 8 + n])
        pos += 8 + n
    if pos != len(blob) or len(parts[2]) != 32:
        raise CryptoError(f"{source} holds a truncated HE secret; ask the key holder to re-wrap it")
    return HEParams.from_dict(json.loads(parts[0])), parts[1], parts[2]


def _record(identity: SiteIdentity, index: int) -> SiteRecord:
    b = identity.public_bundle()
    return SiteRecord(identity.name, index, b["ed25519"], b["x25519"])


def _write_site(root: Path, identity: SiteIdentity, wrapped: bytes) -> None:
    site_dir = root / "sites" / identity.name
    site_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(site_dir, 0o700)
    identity.save_private(site_dir / "identity.pem")
    write_private_file(site_dir / "he-secret.wrapped", wrapped)
    bundle = json.dumps(identity.public_bundle(), indent=2, sort_keys=True) + "\n"
    write_public_file(root / "public" / f"{identity.name}.json", bundle.encode())


def _write_registry(root: Path, registry: Registry) -> None:
    data = registry.to_json()
    write_public_file(root / "public" / "registry.json", data)
    write_public_file(root / "coordinator" / "sites.json", data)
    write_public_file(root / "MANIFEST.txt", manifest_text(registry).encode())


def manifest_text(registry: Registry) -> str:
    """Human-readable list of which ceremony file goes to which machine."""
    lines = [
        f"fedhealth consortium {registry.consortium_id} - key ceremony output",
        f"HE key holder: {registry.key_holder}",
        "",
        "Copy each file ONLY to the machine named; keep relative paths. Afterwards delete",
        "sites/ from the ceremony machine.",
        "",
        "COORDINATOR (no secret key: it can add ciphertexts, nothing else)",
        "  coordinator/he-public.ctx   CKKS parameters, no keys",
        "  coordinator/sites.json      registry (site names, indices, public keys)",
        "",
    ]
    for rec in sorted(registry.sites.values(), key=lambda r: r.index):
        lines += [
            f"SITE {rec.name} (index {rec.index})",
            f"  sites/{rec.name}/identity.pem       PRIVATE signing + key-agreement keys (0600)",
            f"  sites/{rec.name}/he-secret.wrapped  CKKS secret + tag key (needs identity.pem)",
            "  public/registry.json               registry, to verify other sites' signatures",
            "",
        ]
    lines += [
        "EVERYONE (public)",
        "  public/<site>.json  public keys with fingerprints (compare them out of band)",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- ceremony


def init_consortium(
    dir: str | Path,
    sites: list[str],
    key_holder: str,
    params: HEParams | None = None,
) -> Registry:
    """Run the key ceremony for a new consortium in ``dir``.

    Parameters
    ----------
    dir
        Empty (or missing) output directory.
    sites
        Distinct site names.
    key_holder
        The site that generates the CKKS secret and tag key (must be in ``sites``).
    params
        HE parameters (default :class:`HEParams`).

    Returns
    -------
    Registry

    Raises
    ------
    ConfigError
        Invalid names, key holder not a site, or ``dir`` already holds a consortium.
    """
    root = Path(dir)
    params = (params or HEParams()).validate()
    for s in sites:
        _check_name(s)
    if len(set(sites)) != len(sites) or not sites:
        raise ConfigError(f"consortium sites {sites} must be a non-empty list of distinct names")
    if key_holder not in sites:
        raise ConfigError(
            f"key holder {key_holder!r} is not one of the sites {sites}; it must be a site"
        )
    _check_capacity(len(sites), params)
    if (root / "coordinator" / "sites.json").exists() or (root / "sites").exists():
        raise ConfigError(
            f"{root} already holds a consortium; use `add_site` to add a site, or choose "
            "an empty directory"
        )
    consortium_id = secrets.token_hex(8)
    identities = [generate_identity(s) for s in sites]
    # At the key holder: the CKKS secret context and the tag key.
    secret_ctx = make_secret_context(params)
    payload = _pack_secret(params, secret_ctx, secrets.token_bytes(32))
    for ident in identities:
        wrapped = wrap_secret(payload, ident.kx_public, _wrap_info(consortium_id, ident.name))
        _write_site(root, ident, wrapped)
    write_public_file(root / "coordinator" / "he-public.ctx", public_context(secret_ctx))
    registry = Registry(
        consortium_id, key_holder, params, {i.name: _record(i, k) for k, i in enumerate(identities)}
    )
    _write_registry(root, registry)
    return registry


def add_site(
    dir: str | Path,
    name: str,
    key_holder: str,
    *,
    password: bytes | None = None,
) -> Registry:
    """Add a site: the key holder re-wraps the HE secret for the new site's key.

    Only ``sites/<name>/``, ``public/<name>.json``, the two registry copies and the manifest
    are written; no other site's files change.

    Parameters
    ----------
    dir
        Ceremony directory of an existing consortium.
    name
        New site name.
    key_holder
        A registered site whose identity and wrapped secret are in ``dir``.
    password
        Passphrase of the key holder's identity file, if any.

    Returns
    -------
    Registry
        The updated registry.
    """
    root = Path(dir)
    registry = Registry.load(root / "coordinator" / "sites.json")
    _check_name(name)
    if name in registry.sites:
        raise ConfigError(f"site {name!r} is already in consortium {registry.consortium_id}")
    if key_holder not in registry.sites:
        raise ConfigError(
            f"key holder {key_holder!r} is not a site of consortium {registry.consortium_id}"
        )
    _check_capacity(len(registry.sites) + 1, registry.params)
    holder = _load_identity(
        root / "sites" / key_holder / "identity.pem", key_holder, registry, password
    )
    wrapped_path = root / "sites" / key_holder / "he-secret.wrapped"
    payload = _read_wrapped(wrapped_path, holder, registry)
    ident = generate_identity(name)
    _write_site(
        root, ident, wrap_secret(payload, ident.kx_public, _wrap_info(registry.consortium_id, name))
    )
    index = 1 + max((r.index for r in registry.sites.values()), default=-1)
    registry = replace(registry, sites={**registry.sites, name: _record(ident, index)})
    _write_registry(root, registry)
    return registry


def _load_identity(
    path: Path, site: str, registry: Registry, password: bytes | None
) -> SiteIdentity:
    ident = load_private(path, password=password, site=site)
    rec = registry.sites.get(site)
    if rec is None:
        raise CryptoError(
            f"site {site!r} is not in the registry of consortium {registry.consortium_id}"
        )
    bundle = ident.public_bundle()
    if (bundle["ed25519"], bundle["x25519"]) != (rec.ed25519, rec.x25519):
        raise CryptoError(
            f"{path} does not match the registry's keys for site {site!r}; this identity belongs "
            "to another consortium or the registry was altered"
        )
    return ident


def _read_wrapped(path: Path, ident: SiteIdentity, registry: Registry) -> bytes:
    if not path.is_file():
        raise CryptoError(
            f"wrapped HE secret {path} not found; ask the key holder to wrap it for {ident.name!r}"
        )
    payload = unwrap_secret(
        path.read_bytes(), ident, _wrap_info(registry.consortium_id, ident.name)
    )
    params, _, _ = _unpack_secret(payload, str(path))
    if params != registry.params:
        raise CryptoError(f"{path} holds HE parameters that differ from the registry's")
    return payload


def load_site_keys(
    root: str | Path | None,
    site: str,
    *,
    identity_path: str | Path | None = None,
    wrapped_path: str | Path | None = None,
    registry_path: str | Path | None = None,
    ledger_path: str | Path | None = None,
    password: bytes | None = None,
) -> SiteKeys:
    """Load a site's keys from the ceremony layout or from explicit paths.

    Parameters
    ----------
    root
        Directory with ``sites/<site>/`` and ``public/`` (``None`` if all paths are given).
    site
        This site's name.
    identity_path, wrapped_path, registry_path
        Override ``sites/<site>/identity.pem``, ``sites/<site>/he-secret.wrapped`` and
        ``public/registry.json``.
    ledger_path
        Where the per-round ledger persists (default ``sites/<site>/he-ledger.json`` under
        ``root``; in memory if there is no root and no path).
    password
        Identity file passphrase, if any.

    Returns
    -------
    SiteKeys
    """
    base = Path(root) if root is not None else None

    def pick(given: str | Path | None, default: str) -> Path:
        if given is not None:
            return Path(given)
        if base is None:
            raise ConfigError(
                f"load_site_keys for {site!r}: give the consortium directory or {default}"
            )
        return base / default

    registry = Registry.load(pick(registry_path, "public/registry.json"))
    ident = _load_identity(
        pick(identity_path, f"sites/{site}/identity.pem"), site, registry, password
    )
    wpath = pick(wrapped_path, f"sites/{site}/he-secret.wrapped")
    params, secret_ctx, tag_key = _unpack_secret(_read_wrapped(wpath, ident, registry), str(wpath))
    ctx = load_context(secret_ctx, params)
    if not ctx.can_decrypt:
        raise CryptoError(f"{wpath} holds no CKKS secret key; ask the key holder to re-wrap it")
    if ledger_path is None and base is not None:
        ledger_path = base / "sites" / site / "he-ledger.json"
    ledger = SiteLedger(Path(ledger_path) if ledger_path is not None else None)
    return SiteKeys(ident, ctx, tag_key, registry, ledger)


def load_coordinator_keys(
    root: str | Path | None = None,
    *,
    public_context_path: str | Path | None = None,
    registry_path: str | Path | None = None,
) -> CoordinatorKeys:
    """Load the coordinator's key-less context and registry.

    Raises
    ------
    CryptoError
        The context file contains a secret key (it must never reach the coordinator).
    """
    base = Path(root) if root is not None else None
    ctx_path = (
        Path(public_context_path)
        if public_context_path
        else (base or Path()) / "coordinator" / "he-public.ctx"
    )
    reg_path = (
        Path(registry_path) if registry_path else (base or Path()) / "coordinator" / "sites.json"
    )
    registry = Registry.load(reg_path)
    if not ctx_path.is_file():
        raise ConfigError(
            f"coordinator HE context {ctx_path} not found; copy it from the key ceremony"
        )
    ctx = load_context(ctx_path.read_bytes(), registry.params)
    if ctx.can_decrypt:
        raise CryptoError(
            f"{ctx_path} contains a CKKS secret key; the coordinator must hold only the public "
            "context - delete this file and copy coordinator/he-public.ctx from the ceremony"
        )
    return CoordinatorKeys(ctx, registry)
