"""A site's persistent, append-only, hash-chained privacy ledger (SQLite).

Every privacy charge a site makes is one row of ``entries``, committed and
fsynced (``journal_mode=WAL``, ``synchronous=FULL``) *before* the update that
spent it leaves the site, so a crash can only ever over-count, never lose a
release. Rows are append-only: the API has no update or delete, and SQLite
triggers abort any ``UPDATE`` / ``DELETE`` on the table.

Each row stores ``hash = sha256(prev_hash + canonical_json(row))`` (the first
row chains from 64 zeros). Opening a ledger re-verifies the whole chain and
raises :class:`LedgerCorruptError` naming the first bad entry. The chain makes
edits, insertions and deletions in the middle evident; it cannot by itself
reveal a truncated *tail* or a fully re-forged chain -- anchor
:attr:`PrivacyLedger.head_hash` outside the site (e.g. in the run's audit log)
for that.

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
import json
import logging
import math
import sqlite3
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedhealth.errors import FedHealthError

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
KINDS = ("record", "site")

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


def _canonical(payload: dict[str, Any]) -> str:
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(prev_hash: str, payload: dict[str, Any]) -> str:
    """``sha256(prev_hash + canonical JSON of payload)`` as hex.

    Parameters
    ----------
    prev_hash : str
        Hash of the previous entry (``GENESIS_HASH`` for the first).
    payload : dict
        The entry's fields, see ``LedgerEntry.payload``.

    Returns
    -------
    str
    """
    return hashlib.sha256((prev_hash + _canonical(payload)).encode("utf-8")).hexdigest()


class PrivacyLedger:
    """A site's privacy ledger in one SQLite file.

    Parameters
    ----------
    path : Path
        The ledger file (created with its folder if missing).

    Raises
    ------
    LedgerCorruptError
        If the file is not a ledger or its hash chain does not verify.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
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
            raise LedgerCorruptError(
                f"privacy ledger {self.path} cannot be opened as a ledger ({exc}). Restore it "
                "from a backup; do not delete it -- it is the site's record of privacy spent."
            ) from exc
        try:
            self.verify()
        except BaseException:
            self._db.close()
            raise

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
        """Re-verify the whole hash chain.

        Returns
        -------
        int
            Number of entries.

        Raises
        ------
        LedgerCorruptError
            Naming the first entry whose link or content does not verify.
        """
        prev, n = GENESIS_HASH, 0
        with self._lock:
            rows = self._db.execute("SELECT * FROM entries ORDER BY id").fetchall()
        for row in rows:
            try:
                entry = LedgerEntry(*row)
                payload = entry.payload()
                expected = entry_hash(prev, payload)
            except (TypeError, ValueError) as exc:
                raise self._corrupt(row[0], f"the entry is malformed ({exc})") from exc
            if entry.prev_hash != prev:
                raise self._corrupt(
                    entry.id,
                    "its link to the previous entry is broken (an entry before it was removed, "
                    "inserted or changed)",
                )
            if entry.hash != expected:
                raise self._corrupt(entry.id, "its content does not match its hash (it was edited)")
            prev, n = entry.hash, n + 1
        return n

    def _corrupt(self, entry_id: Any, why: str) -> LedgerCorruptError:
        return LedgerCorruptError(
            f"privacy ledger {self.path} is corrupt at entry id {entry_id}: {why}. The site must "
            "not train until the ledger is restored from a backup or the operator has "
            "re-established the true privacy spend."
        )

    @property
    def head_hash(self) -> str:
        """Hash of the last entry (``GENESIS_HASH`` when empty); anchor it externally."""
        with self._lock:
            row = self._db.execute("SELECT hash FROM entries ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else GENESIS_HASH

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
        with self._lock:
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
                digest = entry_hash(prev_hash, payload)
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
