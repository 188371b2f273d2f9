"""A site's persistent, append-only, keyed hash-chained privacy ledger (SQLite).

Every privacy charge a site makes is one row of ``entries``, committed and
fsynced (``journal_mode=WAL``, ``synchronous=FULL``) *before* the update that
spent it leaves the site, so a crash can only ever over-count, never lose a
release. Rows are append-only: the API has no update or delete, and SQLite
triggers abort any ``UPDATE`` / ``DELETE`` on the table.

Each row stores ``hash = HMAC-SHA256(key, prev_hash + canonical_json(row))`` (the
first row chains from 64 zeros) under the site's ledger key, a file only the site
administrator can read (:mod:`fedhealth.privacy.dp.ledger_anchor`). Without the key
nobody can re-forge the chain after an edit. The number of entries and the newest
hash are also kept outside the ledger file -- in a MAC'd head file beside it and in
the site's audit log -- and every open and every charge checks the ledger against
them, so a truncated, rolled-back, replaced or deleted ledger is refused
(:class:`LedgerIntegrityError`) before anything is charged or released.

A ledger of the old, unkeyed format (sha256 chain) is upgraded automatically the
first time it is opened, if no keyed ledger was ever anchored for it: its rows stay
as they are, its head is sealed with the new key (``meta`` table), new rows chain
from it with the key, and a ``ledger-migrated`` line goes to the audit log.

Composition. Within one experiment the site's accountant composes all rounds
tightly (RDP/PRV), and each charge records that experiment's running total
``epsilon_experiment_total``. Across experiments the ledger composes
*basically*: the lifetime ε of a dataset is the sum over experiments of each
experiment's latest total (and the lifetime δ is the sum of their δ). This is
a valid upper bound whatever the experiments did.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedhealth.errors import FedHealthError
from fedhealth.privacy.dp.ledger_anchor import (
    CREATED_EVENT,
    MIGRATED_EVENT,
    RECOVERED_EVENT,
    Head,
    LedgerFiles,
    LedgerIntegrityError,
    anchor,
    audit_anchors,
    key_id,
    latest_anchor,
    load_key,
    mac,
    read_head,
    site_history,
    write_head,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GENESIS_HASH",
    "IntegrityReport",
    "LedgerCorruptError",
    "LedgerEntry",
    "LedgerError",
    "LedgerIntegrityError",
    "PrivacyLedger",
    "entry_hash",
]

GENESIS_HASH = "0" * 64
KINDS = ("record", "site")
#: The keyed format (format 1 was the unkeyed sha256 chain without a ``meta`` table).
FORMAT = "2"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp TEXT NOT NULL,
    dataset TEXT NOT NULL,
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    kind TEXT NOT NULL,
    epsilon_increment REAL NOT NULL,
    epsilon_experiment_total REAL NOT NULL,
    delta REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    accountant TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS entries_by_dataset ON entries (dataset, experiment, kind, id);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger entries are append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger entries are append-only: DELETE refused'); END;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS meta_no_update BEFORE UPDATE ON meta
BEGIN SELECT RAISE(ABORT, 'privacy ledger meta is write-once: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS meta_no_delete BEFORE DELETE ON meta
BEGIN SELECT RAISE(ABORT, 'privacy ledger meta is write-once: DELETE refused'); END;
"""

_FIELDS = (
    "id",
    "timestamp",
    "dataset",
    "experiment",
    "round",
    "kind",
    "epsilon_increment",
    "epsilon_experiment_total",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "accountant",
)


class LedgerError(FedHealthError):
    """A charge was refused by the ledger (it would make the record inconsistent)."""


class LedgerCorruptError(LedgerError):
    """The ledger's hash chain does not verify, or the file is not a ledger."""


@dataclass(frozen=True)
class LedgerEntry:
    """One committed privacy charge."""

    id: int
    timestamp: str
    dataset: str
    experiment: str
    round: int
    kind: str
    epsilon_increment: float
    epsilon_experiment_total: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    prev_hash: str
    hash: str

    def payload(self) -> dict[str, Any]:
        """The hashed fields (everything but the hashes)."""
        d = asdict(self)
        return {k: d[k] for k in _FIELDS}


@dataclass(frozen=True)
class IntegrityReport:
    """What opening (or charging) a ledger checked, and found consistent.

    Attributes
    ----------
    entries : int
        Entries in the ledger (the counter).
    legacy_entries : int
        Of these, entries of the old unkeyed format, sealed by the migration.
    head : str
        Hash of the newest entry.
    files : LedgerFiles
        Key, head file and audit log checked.
    head_file_counter : int
        Counter the head file holds (after any roll-forward).
    audit_counter : int or None
        Highest counter anchored in the audit log.
    events : list of str
        What the open did: created, migrated, head file rolled forward.
    """

    entries: int
    legacy_entries: int
    head: str
    files: LedgerFiles
    head_file_counter: int
    audit_counter: int | None
    events: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable lines, one per check."""
        keyed = self.entries - self.legacy_entries
        chain = f"HMAC-SHA256 chain of {keyed} entries verified with key {self.files.key} (0600)"
        if self.legacy_entries:
            chain += f", after {self.legacy_entries} migrated unkeyed entries sealed by the key"
        audit = (
            f"audit log {self.files.audit_log} anchors counter {self.audit_counter}"
            if self.audit_counter is not None
            else f"no anchor in audit log {self.files.audit_log}"
        )
        return [
            chain,
            f"head file {self.files.head}: counter {self.head_file_counter} = "
            f"{self.entries} entries, head {self.head[:16]}… matches",
            audit + " (not ahead of the ledger, and its head matches)",
            *self.events,
        ]


def _canonical(payload: dict[str, Any]) -> str:
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(prev_hash: str, payload: dict[str, Any], key: bytes | None = None) -> str:
    """The hash of an entry, as hex.

    ``HMAC-SHA256(key, prev_hash + canonical JSON of payload)``; without ``key`` the old
    unkeyed ``sha256(prev_hash + canonical JSON)`` (migrated ledgers' first rows).

    Parameters
    ----------
    prev_hash : str
        Hash of the previous entry (``GENESIS_HASH`` for the first).
    payload : dict
        The entry's fields, see ``LedgerEntry.payload``.
    key : bytes, optional
        The site's ledger key.

    Returns
    -------
    str
    """
    data = (prev_hash + _canonical(payload)).encode("utf-8")
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _seal(key: bytes, ledger: Path, legacy_count: int, legacy_head: str) -> str:
    body = {"ledger": ledger.name, "legacy_count": legacy_count, "legacy_head": legacy_head}
    return mac(key, body)


def _what_to_do(counter: int) -> str:
    return (
        "Nothing was charged and nothing left the site. Restore the newest backup of the "
        "ledger together with its head file and key (same backup); if no backup holds "
        f"{counter} entries, the spend of the missing ones is unknown: keep DP training off "
        "this site's data until the operator has re-established the true spend."
    )


class PrivacyLedger:
    """A site's privacy ledger in one SQLite file, checked against its outside anchors.

    Parameters
    ----------
    path : Path
        The ledger file (created with its folder if missing, unless the site already had
        a ledger there: then it is refused).
    key_path, head_path, audit_log : Path, optional
        The ledger key, head file and audit log (default: ``<stem>.key``, ``<stem>.head``
        and ``audit.log`` beside the ledger, i.e. in the site's workspace).

    Raises
    ------
    LedgerCorruptError
        If the file is not a ledger or its hash chain does not verify.
    LedgerIntegrityError
        If the ledger is missing, truncated, rolled back or replaced (it disagrees with its
        head file or the audit log), or its key is missing or readable by others.
    """

    def __init__(
        self,
        path: Path,
        *,
        key_path: Path | None = None,
        head_path: Path | None = None,
        audit_log: Path | None = None,
    ) -> None:
        self.path = Path(path)
        self.files = LedgerFiles.beside(
            self.path, key=key_path, head=head_path, audit_log=audit_log
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self.files.locked():
            if not self.path.exists():
                why = site_history(self.files)
                if why is not None:
                    raise LedgerIntegrityError(
                        f"privacy ledger {self.path} is missing, but this site had one ({why}). "
                        "It is not recreated: a new ledger would start the site's privacy "
                        "budget afresh. " + _what_to_do(self._anchored_counter())
                    )
            self._connect()
            try:
                self.integrity = self._check(full=True)
            except BaseException:
                self._db.close()
                raise

    def _anchored_counter(self) -> int:
        counters = [int(r.get("counter", 0)) for r in audit_anchors(self.files)]
        return max(counters, default=0)

    def _connect(self) -> None:
        try:
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._db.execute("PRAGMA busy_timeout = 30000")
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("privacy ledger %s: journal_mode is %s, not WAL", self.path, mode)
            self._db.execute("PRAGMA synchronous=FULL")
            existed = self._db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='entries'"
            ).fetchone()[0]
            triggers = self._db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type='trigger' AND tbl_name='entries'"
            ).fetchone()[0]
            if existed and triggers < 2:
                logger.warning(
                    "privacy ledger %s: append-only triggers were missing; recreating them and "
                    "verifying the hash chain",
                    self.path,
                )
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(AttributeError, sqlite3.Error):
                self._db.close()
            raise LedgerCorruptError(
                f"privacy ledger {self.path} cannot be opened as a ledger ({exc}). Restore it "
                "from a backup; do not delete it -- it is the site's record of privacy spent."
            ) from exc

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- integrity -----------------------------------------------------------------------

    def verify(self) -> int:
        """Re-verify the whole keyed hash chain and the outside anchors.

        Returns
        -------
        int
            Number of entries.

        Raises
        ------
        LedgerCorruptError
            Naming the first entry whose link or content does not verify.
        LedgerIntegrityError
            The ledger disagrees with its head file or the audit log, or the key is bad.
        """
        with self._lock, self.files.locked():
            self.integrity = self._check(full=True)
        return self.integrity.entries

    def _meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT name, value FROM meta").fetchall())

    def _check(self, full: bool) -> IntegrityReport:
        """Check the ledger against its key, head file and audit anchors (lock held).

        ``full`` re-verifies every entry; otherwise the tail is compared with the anchors
        and the whole chain is verified only if they disagree.
        """
        meta = self._meta()
        if "format" not in meta:
            return self._initialise()
        if meta["format"] != FORMAT:
            raise LedgerCorruptError(
                f"privacy ledger {self.path} has format {meta['format']!r}, which this version "
                f"of fedhealth does not know (it writes format {FORMAT}); upgrade fedhealth."
            )
        key = load_key(self.files, create=False)
        if meta.get("key_id") != key_id(key):
            raise LedgerIntegrityError(
                f"privacy ledger {self.path} was written with key {meta.get('key_id')}, but "
                f"{self.files.key} is key {key_id(key)}. Restore the key from the backup taken "
                "with the ledger."
            )
        legacy_n, legacy_head = int(meta["legacy_count"]), meta["legacy_head"]
        seal = _seal(key, self.path, legacy_n, legacy_head)
        if not hmac.compare_digest(meta["legacy_mac"], seal):
            raise LedgerIntegrityError(
                f"privacy ledger {self.path}: its migration seal does not verify (the meta "
                "table was edited). " + _what_to_do(self._anchored_counter())
            )
        n, tail = self._tail()
        head = read_head(self.files, key)
        if full or head is None or head.counter != n:
            n = self._verify_chain(key, legacy_n, legacy_head)
            n, tail = self._tail()
        anchored = latest_anchor(self.files, key)
        events: list[str] = []
        if head is None:
            if anchored is not None:
                raise LedgerIntegrityError(
                    f"privacy ledger {self.path}: its head file {self.files.head} is missing, "
                    f"but the audit log anchors counter {anchored.counter}. "
                    + _what_to_do(anchored.counter)
                )
            # Created or migrated, then stopped before the head file was first written.
            head = Head(n, tail)
            write_head(self.files, key, head)
            anchor(self.files, key, head, RECOVERED_EVENT, previous=None)
            events.append(f"head file {self.files.head} written (it had never been written)")
        for source, where, h in (
            ("head file", self.files.head, head),
            ("audit log", self.files.audit_log, anchored),
        ):
            if h is None:
                continue
            if h.counter > n:
                raise LedgerIntegrityError(
                    f"privacy ledger {self.path} holds {n} entries, but its {source} {where} "
                    f"expects {h.counter} (expected counter {h.counter}, found {n}): it was "
                    "truncated or rolled back to an older copy. " + _what_to_do(h.counter)
                )
            if self._hash_at(h.counter) != h.head:
                raise LedgerIntegrityError(
                    f"privacy ledger {self.path}: entry {h.counter} is not the one its {source} "
                    f"{where} anchors (expected head {h.head[:16]}…, found "
                    f"{self._hash_at(h.counter)[:16]}…): the ledger was replaced or re-forged. "
                    + _what_to_do(max(h.counter, n))
                )
        if head.counter < n:
            # A charge committed, then the process stopped before the head file was replaced.
            # The newer rows verified under the key, so only this site can have written them.
            previous = head.counter
            head = Head(n, tail)
            write_head(self.files, key, head)
            anchor(self.files, key, head, RECOVERED_EVENT, previous=previous)
            events.append(f"head file rolled forward from counter {previous} to {n} (a charge "
                          "had committed before the site stopped)")  # fmt: skip
            anchored = head
        self._key = key
        return IntegrityReport(
            entries=n,
            legacy_entries=legacy_n,
            head=tail,
            files=self.files,
            head_file_counter=head.counter,
            audit_counter=anchored.counter if anchored is not None else None,
            events=events,
        )

    def _tail(self) -> tuple[int, str]:
        row = self._db.execute("SELECT id, hash FROM entries ORDER BY id DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)

    def _hash_at(self, counter: int) -> str:
        if counter == 0:
            return GENESIS_HASH
        row = self._db.execute("SELECT hash FROM entries WHERE id=?", (counter,)).fetchone()
        return str(row[0]) if row else ""

    def _verify_chain(self, key: bytes | None, legacy_n: int, legacy_head: str | None) -> int:
        """Verify every entry: ids 1..n with no gap, links, and each hash (keyed after the
        first ``legacy_n``); returns n."""
        prev, n = GENESIS_HASH, 0
        rows = self._db.execute("SELECT * FROM entries ORDER BY id").fetchall()
        for row in rows:
            try:
                entry = LedgerEntry(*row)
                keyed = key is not None and entry.id > legacy_n
                expected = entry_hash(prev, entry.payload(), key if keyed else None)
            except (TypeError, ValueError) as exc:
                raise self._corrupt(row[0], f"the entry is malformed ({exc})") from exc
            if entry.id != n + 1 or entry.prev_hash != prev:
                raise self._corrupt(
                    entry.id,
                    "its link to the previous entry is broken (an entry before it was removed, "
                    "inserted or changed)",
                )
            if entry.hash != expected:
                raise self._corrupt(
                    entry.id,
                    "its content does not match its hash (it was edited, or the chain was "
                    "re-forged without the ledger key)",
                )
            if legacy_head is not None and entry.id == legacy_n and entry.hash != legacy_head:
                raise self._corrupt(entry.id, "it is not the entry sealed by the migration")
            prev, n = entry.hash, n + 1
        if legacy_head is not None and n < legacy_n:
            raise LedgerIntegrityError(
                f"privacy ledger {self.path} holds {n} entries, fewer than the {legacy_n} sealed "
                f"when it was migrated (expected counter >= {legacy_n}, found {n}). "
                + _what_to_do(legacy_n)
            )
        return n

    def _initialise(self) -> IntegrityReport:
        """Bind a new ledger, or upgrade an unkeyed one, to the key (once, lock held)."""
        if self.files.head.exists() or audit_anchors(self.files):
            raise LedgerIntegrityError(
                f"privacy ledger {self.path} is not bound to a key (a new or an old-format "
                f"file), but this site already anchored a keyed ledger there (head file "
                f"{self.files.head} or audit log {self.files.audit_log}): the ledger was "
                "replaced. " + _what_to_do(self._anchored_counter())
            )
        n = self._verify_chain(None, 0, None)  # the old unkeyed chain, if any
        n, tail = self._tail()
        key = load_key(self.files, create=True)
        meta = {
            "format": FORMAT,
            "key_id": key_id(key),
            "legacy_count": str(n),
            "legacy_head": tail,
            "legacy_mac": _seal(key, self.path, n, tail),
            "bound_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", meta.items())
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        head = Head(n, tail)
        write_head(self.files, key, head)
        if n:
            logger.warning(
                "privacy ledger %s: upgraded %d unkeyed entries to the keyed format (key %s)",
                self.path, n, self.files.key,
            )  # fmt: skip
            anchor(self.files, key, head, MIGRATED_EVENT, legacy_entries=n)
            event = f"migrated: {n} unkeyed entries sealed with key {self.files.key}"
        else:
            anchor(self.files, key, head, CREATED_EVENT)
            event = f"created, bound to key {self.files.key}"
        self._key = key
        return IntegrityReport(n, n, tail, self.files, n, n, [event])

    def _corrupt(self, entry_id: Any, why: str) -> LedgerCorruptError:
        return LedgerCorruptError(
            f"privacy ledger {self.path} is corrupt at entry id {entry_id}: {why}. The site must "
            "not train until the ledger is restored from a backup or the operator has "
            "re-established the true privacy spend."
        )

    @property
    def head_hash(self) -> str:
        """Hash of the last entry (``GENESIS_HASH`` when empty)."""
        with self._lock:
            return self._tail()[1]

    # -- writing -------------------------------------------------------------------------

    def charge(
        self,
        dataset: str,
        experiment: str,
        round: int,
        epsilon_increment: float,
        epsilon_experiment_total: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: str,
        kind: str = "record",
    ) -> LedgerEntry:
        """Append one charge; it is committed and fsynced before this returns.

        Call it *before* the update that spent the budget leaves the site.

        Parameters
        ----------
        dataset, experiment : str
            What was spent.
        round : int
            Round number.
        epsilon_increment : float
            ε this round added to the experiment (informational).
        epsilon_experiment_total : float
            The experiment's composed ε after this round (what ``spent`` sums).
        delta : float
            δ of the experiment.
        noise_multiplier, sample_rate : float
            σ and q of the round's steps.
        steps : int
            Number of steps the round ran.
        accountant : str
            Accountant that computed the totals.
        kind : {"record", "site"}
            Privacy unit: record-level DP-SGD or site-level DP.

        Returns
        -------
        LedgerEntry

        Raises
        ------
        LedgerError
            If a value is invalid, or the experiment's total would go down (its
            accountant state was lost: restore it instead of starting afresh).
        LedgerIntegrityError
            If the ledger no longer matches its head file or the audit log, or its key is
            missing or readable by others (nothing is charged).
        """
        payload = self._validated(
            dataset,
            experiment,
            round,
            epsilon_increment,
            epsilon_experiment_total,
            delta,
            noise_multiplier,
            sample_rate,
            steps,
            accountant,
            kind,
        )
        with self._lock, self.files.locked():
            # Every admission re-checks the key's mode, the head file and the audit anchors.
            self.integrity = self._check(full=False)
            key = self._key
            self._db.execute("BEGIN IMMEDIATE")
            try:
                last = self._db.execute(
                    "SELECT epsilon_experiment_total, round FROM entries WHERE dataset=? AND "
                    "experiment=? AND kind=? ORDER BY id DESC LIMIT 1",
                    (payload["dataset"], payload["experiment"], payload["kind"]),
                ).fetchone()
                if last is not None and payload["epsilon_experiment_total"] < last[0] - 1e-9:
                    raise LedgerError(
                        f"refusing to record round {payload['round']} of experiment "
                        f"{payload['experiment']!r} on dataset {payload['dataset']!r}: its total "
                        f"ε {payload['epsilon_experiment_total']:.4g} is below the "
                        f"{last[0]:.4g} already recorded after round {last[1]}. The experiment's "
                        "accountant lost its state -- restore it with "
                        "PrivacyAccountant.from_dict before training again."
                    )
                head = self._db.execute(
                    "SELECT id, hash FROM entries ORDER BY id DESC LIMIT 1"
                ).fetchone()
                prev_id, prev_hash = head if head else (0, GENESIS_HASH)
                payload["id"] = prev_id + 1
                payload["timestamp"] = datetime.now(UTC).isoformat(timespec="microseconds")
                digest = entry_hash(prev_hash, payload, key)
                entry = LedgerEntry(**payload, prev_hash=prev_hash, hash=digest)
                cols = (*_FIELDS, "prev_hash", "hash")
                marks = ", ".join("?" * len(cols))
                self._db.execute(
                    f"INSERT INTO entries ({', '.join(cols)}) VALUES ({marks})",
                    tuple(getattr(entry, c) for c in cols),
                )
                self._db.execute("COMMIT")
            except BaseException:
                # a failed COMMIT may already have rolled back
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            # After the commit: a crash in between leaves the head file one entry behind,
            # which the next open rolls forward (the new row verifies under the key).
            head = Head(entry.id, entry.hash)
            write_head(self.files, key, head)
            anchor(self.files, key, head)
        return entry

    @staticmethod
    def _validated(
        dataset: str,
        experiment: str,
        round: int,
        epsilon_increment: float,
        epsilon_experiment_total: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: str,
        kind: str,
    ) -> dict[str, Any]:
        where = f"charge of round {round!r} of experiment {experiment!r} on dataset {dataset!r}"
        v: Any  # the checks below take values of any type (a ledger row, a caller's mistake)
        for name, v in (
            ("dataset", dataset),
            ("experiment", experiment),
            ("accountant", accountant),
        ):
            if not isinstance(v, str) or not v:
                raise LedgerError(f"{where}: {name} must be a non-empty string, got {v!r}")
        if kind not in KINDS:
            raise LedgerError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
        for name, v in (("round", round), ("steps", steps)):
            if isinstance(v, bool) or int(v) != v or v < 0:
                raise LedgerError(f"{where}: {name} must be a whole number >= 0, got {v!r}")
        floats = {
            "epsilon_increment": epsilon_increment,
            "epsilon_experiment_total": epsilon_experiment_total,
            "delta": delta,
            "noise_multiplier": noise_multiplier,
            "sample_rate": sample_rate,
        }
        out: dict[str, Any] = {}
        for name, v in floats.items():
            f = float(v)
            if not math.isfinite(f) or f < 0:
                raise LedgerError(
                    f"{where}: {name} must be a finite number >= 0, got {v!r}"
                    + (
                        " (a round without DP has unbounded ε and cannot be charged)"
                        if name.startswith("epsilon")
                        else ""
                    )
                )
            out[name] = f
        if not 0 < out["delta"] < 1:
            raise LedgerError(f"{where}: delta must be in (0, 1), got {delta!r}")
        out.update(
            dataset=dataset,
            experiment=experiment,
            round=int(round),
            kind=kind,
            steps=int(steps),
            accountant=accountant,
        )
        return out

    # -- reading -------------------------------------------------------------------------

    def entries(self, dataset: str | None = None) -> list[LedgerEntry]:
        """All entries (of one dataset), oldest first.

        Parameters
        ----------
        dataset : str, optional
            Only this dataset's entries.

        Returns
        -------
        list of LedgerEntry
        """
        with self._lock:
            if dataset is None:
                rows = self._db.execute("SELECT * FROM entries ORDER BY id").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM entries WHERE dataset=? ORDER BY id", (dataset,)
                ).fetchall()
        return [LedgerEntry(*r) for r in rows]

    def spent_in_experiment(self, dataset: str, experiment: str, kind: str = "record") -> float:
        """The experiment's latest composed ε on ``dataset`` (0 if never charged).

        Parameters
        ----------
        dataset, experiment : str
        kind : {"record", "site"}

        Returns
        -------
        float
        """
        with self._lock:
            row = self._db.execute(
                "SELECT epsilon_experiment_total FROM entries WHERE dataset=? AND experiment=? "
                "AND kind=? ORDER BY id DESC LIMIT 1",
                (dataset, experiment, kind),
            ).fetchone()
        return float(row[0]) if row else 0.0

    def _per_experiment(self, dataset: str, kind: str) -> dict[str, float]:
        with self._lock:
            rows = self._db.execute(
                "SELECT e.experiment, e.epsilon_experiment_total FROM entries e JOIN ("
                " SELECT MAX(id) AS mid FROM entries WHERE dataset=? AND kind=? GROUP BY experiment"
                ") l ON e.id = l.mid",
                (dataset, kind),
            ).fetchall()
        return {exp: float(eps) for exp, eps in rows}

    def spent(self, dataset: str, kind: str = "record") -> float:
        """Lifetime ε of ``dataset``: the sum over experiments of their latest totals.

        Parameters
        ----------
        dataset : str
        kind : {"record", "site"}
            Privacy unit; the two are never added together.

        Returns
        -------
        float
        """
        return float(sum(self._per_experiment(dataset, kind).values()))

    def spent_excluding(self, dataset: str, experiment: str, kind: str = "record") -> float:
        """Lifetime ε of ``dataset`` in experiments other than ``experiment``.

        This is ``RoundRequest.spent_lifetime_other_experiments``.

        Parameters
        ----------
        dataset, experiment : str
        kind : {"record", "site"}

        Returns
        -------
        float
        """
        per = self._per_experiment(dataset, kind)
        return float(sum(v for k, v in per.items() if k != experiment))

    def summary(self) -> list[dict[str, Any]]:
        """One row per (dataset, experiment, kind), ordered by first charge.

        Returns
        -------
        list of dict
            Keys: dataset, experiment, kind, epsilon_total, delta, accountant,
            rounds (distinct rounds charged), charges, last_round,
            first_timestamp, last_timestamp.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT dataset, experiment, kind, COUNT(DISTINCT round), COUNT(*), MAX(round), "
                "MIN(timestamp), MAX(timestamp), MAX(id), MIN(id) FROM entries "
                "GROUP BY dataset, experiment, kind ORDER BY MIN(id)"
            ).fetchall()
            out = []
            for ds, exp, kind, rounds, charges, last_round, first_ts, last_ts, mid, _ in rows:
                eps, delta, acc = self._db.execute(
                    "SELECT epsilon_experiment_total, delta, accountant FROM entries WHERE id=?",
                    (mid,),
                ).fetchone()
                out.append(
                    {
                        "dataset": ds,
                        "experiment": exp,
                        "kind": kind,
                        "epsilon_total": float(eps),
                        "delta": float(delta),
                        "accountant": acc,
                        "rounds": int(rounds),
                        "charges": int(charges),
                        "last_round": int(last_round),
                        "first_timestamp": first_ts,
                        "last_timestamp": last_ts,
                    }
                )
        return out

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"
