"""Provision a consortium for a real deployment: TLS and SuperNode authentication.

:func:`init_tls` writes, in the consortium directory::

    ca/ca.pem, ca/ca.key                 consortium CA (key 0600)      -> offline / the operator
    coordinator/tls/ca.pem               the CA certificate            -> coordinator
    coordinator/tls/superlink.pem        SuperLink TLS certificate     -> coordinator
    coordinator/tls/superlink.key        its private key (0600)        -> coordinator
    coordinator/supernodes/<site>.pub    site's SuperNode public key   -> coordinator
    coordinator/mlflow/admin.json        MLflow admin account (0600)   -> coordinator
    sites/<site>/tls/ca.pem              the CA certificate            -> that site
    sites/<site>/supernode.key           SuperNode auth key (0600)     -> that site only
    sites/<site>/supernode.pub           its public key                -> that site
    deployment.json                      hosts and sites of the consortium

:func:`add_site_tls` writes only the new site's files and its public key on the
coordinator side; nothing of another site changes. The HE key ceremony
(:mod:`fedhealth.privacy.he.ceremony`) writes its files into the same directory.
:func:`copy_coordinator_files` copies only what belongs on the coordinator's machine;
:func:`foreign_secrets` finds what must never be there (``coordinator start`` refuses it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fedhealth.config.site import SITE_NAME
from fedhealth.deploy.pki import (
    make_ca,
    make_node_keypair,
    make_server_cert,
    write_private,
    write_public,
)
from fedhealth.errors import ConfigError

DEFAULT_HOSTS = ["127.0.0.1", "localhost"]
LAYOUT_FILE = "deployment.json"


@dataclass
class Placement:
    """Which file goes to which machine."""

    machine: str  # "coordinator", "site <name>", "offline"
    path: Path
    private: bool = False


@dataclass
class TLSLayout:
    """Paths of a consortium's deployment files, relative to its directory."""

    root: Path
    hosts: list[str] = field(default_factory=lambda: list(DEFAULT_HOSTS))
    sites: list[str] = field(default_factory=list)

    @property
    def ca_cert(self) -> Path:
        """The consortium CA certificate (coordinator copy)."""
        return self.root / "coordinator" / "tls" / "ca.pem"

    @property
    def server_cert(self) -> Path:
        """The SuperLink's TLS certificate."""
        return self.root / "coordinator" / "tls" / "superlink.pem"

    @property
    def server_key(self) -> Path:
        """The SuperLink's TLS private key."""
        return self.root / "coordinator" / "tls" / "superlink.key"

    def node_public_key(self, site: str) -> Path:
        """The coordinator's copy of a site's SuperNode public key."""
        return self.root / "coordinator" / "supernodes" / f"{site}.pub"

    def site_dir(self, site: str) -> Path:
        """Everything that goes to one site."""
        return self.root / "sites" / site

    def site_files(self, site: str) -> dict[str, Path]:
        """A site's CA certificate, SuperNode private and public key."""
        d = self.site_dir(site)
        return {
            "ca": d / "tls" / "ca.pem",
            "key": d / "supernode.key",
            "pub": d / "supernode.pub",
        }

    def save(self) -> None:
        """Write ``deployment.json`` (hosts and sites)."""
        blob = {"format": "fedhealth-deployment/1", "hosts": self.hosts, "sites": self.sites}
        write_public(self.root / LAYOUT_FILE, json.dumps(blob, indent=2).encode() + b"\n")

    @classmethod
    def load(cls, root: Path) -> TLSLayout:
        """Read a consortium directory written by :func:`init_tls`."""
        path = Path(root) / LAYOUT_FILE
        if not path.is_file():
            raise ConfigError(
                f"{root} is not a provisioned consortium ({LAYOUT_FILE} missing); "
                "run `fedhealth consortium init` first"
            )
        blob = json.loads(path.read_text())
        return cls(Path(root), list(blob["hosts"]), list(blob["sites"]))


def _check_site(name: str) -> None:
    if not SITE_NAME.match(name):
        raise ConfigError(
            f"site name {name!r} must be lower-case letters, digits, '-' or '_' (max 63), "
            "as in the site profile's `site.name`"
        )


def _write_site(layout: TLSLayout, site: str, ca_pem: bytes) -> list[Placement]:
    files = layout.site_files(site)
    private, public = make_node_keypair()
    write_public(files["ca"], ca_pem)
    write_private(files["key"], private)
    write_public(files["pub"], public)
    write_public(layout.node_public_key(site), public)
    who = f"site {site}"
    return [
        Placement(who, files["ca"]),
        Placement(who, files["key"], private=True),
        Placement(who, files["pub"]),
        Placement("coordinator", layout.node_public_key(site)),
    ]


def init_tls(root: Path, sites: list[str], hosts: list[str] | None = None) -> list[Placement]:
    """Create the CA, the SuperLink certificate and every site's SuperNode key.

    Parameters
    ----------
    root : Path
        Consortium directory (created; must not hold a provisioned consortium).
    sites : list[str]
        Site names (the profiles' ``site.name``).
    hosts : list[str], optional
        Extra host names / IP addresses the SuperLink is reached at; 127.0.0.1 and
        localhost are always included.

    Returns
    -------
    list[Placement]
        Every file written and the machine it belongs on.
    """
    root = Path(root)
    for s in sites:
        _check_site(s)
    if len(set(sites)) != len(sites):
        raise ConfigError(f"site names {sites} must be distinct")
    if (root / LAYOUT_FILE).exists() or (root / "ca" / "ca.key").exists():
        raise ConfigError(
            f"{root} already holds a provisioned consortium; add hospitals with "
            "`fedhealth consortium add-site NAME`, or choose an empty directory"
        )
    layout = TLSLayout(root, list(dict.fromkeys(DEFAULT_HOSTS + list(hosts or []))), list(sites))
    ca_pem, ca_key = make_ca(f"fedhealth consortium CA ({root.resolve().name})")
    write_public(root / "ca" / "ca.pem", ca_pem)
    write_private(root / "ca" / "ca.key", ca_key)
    cert, key = make_server_cert(ca_pem, ca_key, layout.hosts)
    write_public(layout.ca_cert, ca_pem)
    write_public(layout.server_cert, cert)
    write_private(layout.server_key, key)
    placed = [
        Placement("offline", root / "ca" / "ca.pem"),
        Placement("offline", root / "ca" / "ca.key", private=True),
        Placement("coordinator", layout.ca_cert),
        Placement("coordinator", layout.server_cert),
        Placement("coordinator", layout.server_key, private=True),
    ]
    for s in sites:
        placed += _write_site(layout, s, ca_pem)
    from fedhealth.deploy.mlflow_auth import admin_path, ensure_admin

    ensure_admin(admin_path(root))
    placed.append(Placement("coordinator", admin_path(root), private=True))
    layout.save()
    return placed


# Files no coordinator may hold: the CA's key and every site's private keys.
SITE_SECRETS = ("supernode.key", "identity.pem", "he-secret.wrapped")
COORDINATOR_SECRETS = ("coordinator/tls/superlink.key",)


def foreign_secrets(root: Path) -> list[Path]:
    """Private files under ``root`` that belong to the CA or a site, not the coordinator:
    ``ca/ca.key``, ``sites/*/{supernode.key,identity.pem,he-secret.wrapped}``, and any other
    PEM private key outside ``coordinator/``."""
    root = Path(root)
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if rel.parts[0] == "coordinator":
            continue
        if path.name in SITE_SECRETS or rel == Path("ca/ca.key"):
            found.append(path)
            continue
        try:
            with path.open("rb") as fh:
                head = fh.read(4096)
        except OSError:
            continue
        if b"PRIVATE KEY-----" in head:
            found.append(path)
    return found


def copy_coordinator_files(root: Path, out: Path) -> list[Path]:
    """Copy ``coordinator/`` and ``deployment.json`` of consortium ``root`` to ``out`` (modes
    kept): the directory ``fedhealth coordinator start --consortium`` takes."""
    root, out = Path(root), Path(out)
    TLSLayout.load(root)
    if (out / LAYOUT_FILE).exists():
        raise ConfigError(f"{out} already holds a coordinator directory; choose an empty one")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / "coordinator", out / "coordinator", dirs_exist_ok=False)
    shutil.copy2(root / LAYOUT_FILE, out / LAYOUT_FILE)
    return sorted(p for p in out.rglob("*") if p.is_file())


def add_site_tls(root: Path, site: str) -> list[Placement]:
    """Add one hospital: its SuperNode key pair and CA copy; no other file changes.

    Raises
    ------
    ConfigError
        If the consortium is not provisioned or the site already exists.
    """
    layout = TLSLayout.load(Path(root))
    _check_site(site)
    if site in layout.sites or layout.site_files(site)["key"].exists():
        raise ConfigError(
            f"site {site!r} is already provisioned in {root}; pick another name "
            "(its existing keys were left untouched)"
        )
    ca_pem = layout.ca_cert.read_bytes()
    placed = _write_site(layout, site, ca_pem)
    layout.sites.append(site)
    layout.save()
    return placed


def manifest(placed: list[Placement], root: Path) -> str:
    """Human-readable list of which file goes to which machine."""
    by: dict[str, list[Placement]] = {}
    for p in placed:
        by.setdefault(p.machine, []).append(p)
    lines = []
    for machine in sorted(by, key=lambda m: (m != "coordinator", m != "offline", m)):
        lines.append(f"{machine}:")
        for p in by[machine]:
            rel = p.path.relative_to(root) if p.path.is_relative_to(root) else p.path
            lines.append(f"  {rel}{'   (private, 0600)' if p.private else ''}")
    return "\n".join(lines)
