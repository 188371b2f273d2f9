"""What keeps a site's privacy ledger honest from outside the ledger file.

The ledger (:mod:`fedhealth.privacy.dp.ledger`) chains its rows with HMAC-SHA256 under a
key only the site administrator can read, so nobody without the key can forge or re-forge
a row. What the chain alone cannot show -- a ledger truncated at its tail, rolled back to
an older copy, or deleted -- is caught by two anchors kept outside the ledger file:

* the **head file** ``<ledger stem>.head`` beside the ledger: the number of entries (a
  monotonic counter) and the hash of the newest one, MAC'd with the key, replaced
  atomically after every charge;
* the site's **audit log** (``audit.log``, :mod:`fedhealth.site.audit`): a ``ledger-head``
  line per charge with the same counter, head and MAC. It is append-only, so a head file
  rolled back together with the ledger is still caught by the newer lines of the audit log.

Files, all in the site's workspace (back them up together, never one without the others):

``privacy-ledger.key``
    32 random bytes, created with mode 0600 at first use; refused if group or others can
    read or write it. Losing it makes the ledger unverifiable (the site refuses to train).
``privacy-ledger.head``
    The head file (JSON).
``privacy-ledger.lock``
    An empty file whose ``flock`` serialises writers across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhealth import jsonlines
from fedhealth.errors import FedHealthError
from fedhealth.privacy.dp.randomness import create_key_file

KEY_BYTES = 32
#: The site's audit log beside the ledger (``fedhealth.site.audit.AUDIT_FILE``; privacy does
#: not import site).
AUDIT_FILE = "audit.log"
#: Audit-log events written by the ledger.
ANCHOR_EVENT = "ledger-head"
CREATED_EVENT = "ledger-created"
MIGRATED_EVENT = "ledger-migrated"
RECOVERED_EVENT = "ledger-head-recovered"
_MAC_EVENTS = (ANCHOR_EVENT, CREATED_EVENT, MIGRATED_EVENT, RECOVERED_EVENT)


class LedgerIntegrityError(FedHealthError):
    """The ledger, its key or one of its outside anchors does not check out."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def mac(key: bytes, obj: Any) -> str:
    """HMAC-SHA256 of the canonical JSON of ``obj`` under ``key``, as hex."""
    return hmac.new(key, _canonical(obj), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A public 16-hex-digit name of a key (which key wrote a ledger), not the key."""
    return hashlib.sha256(b"fedhealth-ledger-key-id|" + key).hexdigest()[:16]


@dataclass(frozen=True)
class LedgerFiles:
    """Where a ledger's key, head file, lock and audit log are.

    Parameters
    ----------
    ledger : Path
        The ledger (SQLite) file.
    key, head, lock, audit_log : Path, optional
        Default: ``<stem>.key``, ``<stem>.head``, ``<stem>.lock`` and ``audit.log`` beside
        the ledger (the site's workspace).
    """

    ledger: Path
    key: Path
    head: Path
    lock: Path
    audit_log: Path

    @classmethod
    def beside(cls, ledger: Path, **paths: Path | None) -> LedgerFiles:
        """The default layout for ``ledger``, with any path overridden."""
        ledger = Path(ledger)
        d, stem = ledger.parent, ledger.stem
        defaults = {
            "key": d / f"{stem}.key",
            "head": d / f"{stem}.head",
            "lock": d / f"{stem}.lock",
            "audit_log": d / AUDIT_FILE,
        }
        return cls(ledger, **{k: Path(paths.get(k) or v) for k, v in defaults.items()})

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's exclusive cross-process lock (``flock``)."""
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


# -- the key -----------------------------------------------------------------------------------


def load_key(files: LedgerFiles, create: bool) -> bytes:
    """Read the ledger key; create it (mode 0600) only when ``create``.

    Parameters
    ----------
    files : LedgerFiles
    create : bool
        Create a missing key (a new ledger, or the one-time upgrade of an unkeyed one).

    Returns
    -------
    bytes

    Raises
    ------
    LedgerIntegrityError
        The key is missing (and may not be created), not a key, or readable or writable by
        anyone but its owner.
    """
    path = files.key
    if create:
        create_key_file(path, KEY_BYTES)
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise LedgerIntegrityError(
            f"privacy ledger {files.ledger}: its key {path} is missing, so the ledger cannot be "
            "verified. Restore the key from the backup taken with the ledger (the site does not "
            "train, and nothing is charged, until it is back)."
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise LedgerIntegrityError(
            f"privacy ledger key {path} is not a regular file; restore it from a backup."
        )
    if st.st_mode & 0o077:
        raise LedgerIntegrityError(
            f"privacy ledger key {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or "
            "others can read or write it, so it no longer proves who wrote the ledger. Make it "
            f"readable by the site administrator only (`chmod 600 {path}`), check who could "
            "have read it, and start the site again."
        )
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise LedgerIntegrityError(
            f"privacy ledger key {path} holds {len(key)} bytes, not {KEY_BYTES}; restore it "
            "from the backup taken with the ledger."
        )
    return key


# -- the head file -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """The ledger's counter (number of entries) and newest hash, as anchored outside it."""

    counter: int
    head: str

    def body(self, ledger: Path, kid: str) -> dict[str, Any]:
        """The MAC'd fields."""
        return {"ledger": ledger.name, "key_id": kid, "counter": self.counter, "head": self.head}


def read_head(files: LedgerFiles, key: bytes) -> Head | None:
    """The head file's counter and hash (None when there is no head file).

    Raises
    ------
    LedgerIntegrityError
        The head file is unreadable, or its MAC, key or ledger name does not match.
    """
    try:
        raw = files.head.read_bytes()
    except FileNotFoundError:
        return None
    try:
        d = json.loads(raw)
        head = Head(int(d["counter"]), str(d["head"]))
        ok = hmac.compare_digest(str(d["mac"]), mac(key, head.body(files.ledger, key_id(key))))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise LedgerIntegrityError(
            f"privacy ledger head file {files.head} was altered or belongs to another ledger or "
            "key (its MAC does not verify). Nothing was charged and nothing left the site. "
            "Restore the ledger, its head file and its key together from the same backup."
        )
    return head


def write_head(files: LedgerFiles, key: bytes, head: Head) -> None:
    """Replace the head file atomically (write, fsync, rename, fsync the folder)."""
    body = head.body(files.ledger, key_id(key))
    data = json.dumps({**body, "mac": mac(key, body), "updated": time.time()}, sort_keys=True)
    tmp = files.head.with_name(files.head.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, files.head)
    dfd = os.open(files.head.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- the audit log -----------------------------------------------------------------------------


def anchor(files: LedgerFiles, key: bytes, head: Head, event: str = ANCHOR_EVENT, **extra: Any):
    """Append the head to the site's audit log (one JSON line, MAC'd)."""
    body = head.body(files.ledger, key_id(key))
    jsonlines.append(
        files.audit_log,
        {"ts": time.time(), "event": event, **body, "mac": mac(key, body), **extra},
    )


def audit_anchors(files: LedgerFiles) -> list[dict[str, Any]]:
    """This ledger's anchor lines in the audit log, oldest first (MACs unchecked)."""
    return [
        r
        for r in jsonlines.read(files.audit_log)
        if r.get("event") in _MAC_EVENTS and r.get("ledger") == files.ledger.name
    ]


def latest_anchor(files: LedgerFiles, key: bytes) -> Head | None:
    """The highest counter anchored in the audit log (None when none is).

    Raises
    ------
    LedgerIntegrityError
        An anchor line's MAC does not verify (the audit log was edited).
    """
    best: Head | None = None
    kid = key_id(key)
    for r in audit_anchors(files):
        try:
            h = Head(int(r["counter"]), str(r["head"]))
            ok = hmac.compare_digest(str(r["mac"]), mac(key, h.body(files.ledger, kid)))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise LedgerIntegrityError(
                f"the audit log {files.audit_log} holds a {r.get('event')!r} line for privacy "
                f"ledger {files.ledger} whose MAC does not verify (written with another key, or "
                "edited). Nothing was charged. Restore the ledger key and audit log from backup."
            )
        if best is None or h.counter > best.counter:
            best = h
    return best


def site_history(files: LedgerFiles) -> str | None:
    """Why a missing ledger must not be recreated: a head file, anchors, or charged releases.

    Returns
    -------
    str or None
        What shows the site had a ledger, or None for a site that never charged anything.
    """
    if files.head.exists():
        return f"its head file {files.head} exists"
    if audit_anchors(files):
        return f"the audit log {files.audit_log} anchors its head"
    charged = [
        r
        for r in jsonlines.read(files.audit_log)
        if r.get("event") == "sent" and r.get("epsilon") is not None
    ]
    if charged:
        return f"the audit log {files.audit_log} records {len(charged)} releases that spent ε"
    return None
