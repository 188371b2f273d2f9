"""The privacy ledger: durable, append-only, hash-chained, and summed correctly."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fedhealth.errors import FedHealthError
from fedhealth.privacy.dp.ledger import (
    GENESIS_HASH,
    LedgerCorruptError,
    LedgerError,
    PrivacyLedger,
)

ROOT = Path(__file__).resolve().parents[1]


def _charge(led: PrivacyLedger, exp: str, rnd: int, total: float, dataset: str = "heart", **kw):
    args = dict(
        dataset=dataset,
        experiment=exp,
        round=rnd,
        epsilon_increment=0.1,
        epsilon_experiment_total=total,
        delta=1e-5,
        noise_multiplier=1.1,
        sample_rate=0.01,
        steps=100,
        accountant="rdp",
    )
    args.update(kw)
    return led.charge(**args)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "site" / "privacy-ledger.sqlite"


def test_pragmas_and_schema(ledger_path):
    with PrivacyLedger(ledger_path) as led:
        assert led._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert led._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        names = {
            r[0] for r in led._db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
        }
        assert {"entries_no_update", "entries_no_delete"} <= names
        assert led.head_hash == GENESIS_HASH
        assert led.verify() == 0


def test_charge_chain_and_spend_across_experiments_and_restart(ledger_path):
    with PrivacyLedger(ledger_path) as led:
        e1 = _charge(led, "exp-a", 1, 0.5)
        e2 = _charge(led, "exp-a", 2, 0.8)
        _charge(led, "exp-b", 1, 1.2)
        _charge(led, "exp-a", 3, 1.0)
        _charge(led, "exp-c", 1, 2.0, dataset="mri")
        assert e1.prev_hash == GENESIS_HASH and e2.prev_hash == e1.hash
        assert led.spent_in_experiment("heart", "exp-a") == pytest.approx(1.0)
        assert led.spent("heart") == pytest.approx(1.0 + 1.2)  # latest total per experiment
        assert led.spent_excluding("heart", "exp-a") == pytest.approx(1.2)
        head = led.head_hash
    with PrivacyLedger(ledger_path) as led:  # restart: everything is still there
        assert led.verify() == 5
        assert led.head_hash == head
        assert led.spent("heart") == pytest.approx(2.2)
        assert led.spent("mri") == pytest.approx(2.0)
        assert led.spent("unknown") == 0.0
        assert [e.round for e in led.entries("heart")] == [1, 2, 1, 3]
        _charge(led, "exp-b", 2, 1.5)
        assert led.spent("heart") == pytest.approx(2.5)
        rows = {(r["dataset"], r["experiment"]): r for r in led.summary()}
        a = rows[("heart", "exp-a")]
        assert a["epsilon_total"] == pytest.approx(1.0)
        assert (a["rounds"], a["charges"], a["last_round"], a["delta"]) == (3, 3, 3, 1e-5)
        assert a["first_timestamp"] <= a["last_timestamp"]
        assert rows[("heart", "exp-b")]["epsilon_total"] == pytest.approx(1.5)
        assert [r["experiment"] for r in led.summary()] == ["exp-a", "exp-b", "exp-c"]


def test_record_and_site_level_spend_are_kept_apart(ledger_path):
    with PrivacyLedger(ledger_path) as led:
        _charge(led, "exp-a", 1, 1.0)
        _charge(led, "exp-a", 1, 5.0, kind="site")
        assert led.spent("heart") == pytest.approx(1.0)
        assert led.spent("heart", kind="site") == pytest.approx(5.0)


def test_decreasing_experiment_total_is_refused(ledger_path):
    with PrivacyLedger(ledger_path) as led:
        _charge(led, "exp-a", 1, 1.0)
        with pytest.raises(LedgerError) as exc:
            _charge(led, "exp-a", 2, 0.3)
        msg = str(exc.value)
        assert "exp-a" in msg and "round 2" in msg and "from_dict" in msg
        assert led.verify() == 1


@pytest.mark.parametrize(
    "kw,fragment",
    [
        ({"epsilon_experiment_total": float("inf")}, "unbounded"),
        ({"delta": 0.0}, "delta"),
        ({"kind": "user"}, "kind"),
        ({"steps": -1}, "steps"),
        ({"dataset": ""}, "dataset"),
    ],
)
def test_invalid_charges_are_refused(ledger_path, kw, fragment):
    with PrivacyLedger(ledger_path) as led:
        with pytest.raises(LedgerError, match=fragment):
            _charge(led, "exp-a", 1, 1.0, **kw)
        assert led.verify() == 0


def test_triggers_refuse_update_and_delete(ledger_path):
    with PrivacyLedger(ledger_path) as led:
        _charge(led, "exp-a", 1, 1.0)
    db = sqlite3.connect(ledger_path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE entries SET epsilon_experiment_total = 0.0")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM entries")
    db.close()
    assert not hasattr(PrivacyLedger, "update") and not hasattr(PrivacyLedger, "delete")


def _tamper(path: Path, sql: str) -> None:
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER entries_no_update")
    db.execute("DROP TRIGGER entries_no_delete")
    db.execute(sql)
    db.commit()
    db.close()


def test_edited_entry_is_detected_and_named(ledger_path):
    with PrivacyLedger(ledger_path) as led:
        for r in range(1, 5):
            _charge(led, "exp-a", r, 0.5 * r)
    _tamper(ledger_path, "UPDATE entries SET epsilon_experiment_total = 0.1 WHERE id = 3")
    with pytest.raises(LedgerCorruptError) as exc:
        PrivacyLedger(ledger_path)
    assert "entry id 3" in str(exc.value) and "edited" in str(exc.value)
    assert isinstance(exc.value, FedHealthError)


def test_deleted_entry_is_detected_and_named(ledger_path):
    with PrivacyLedger(ledger_path) as led:
        for r in range(1, 5):
            _charge(led, "exp-a", r, 0.5 * r)
    _tamper(ledger_path, "DELETE FROM entries WHERE id = 2")
    with pytest.raises(LedgerCorruptError, match="entry id 3"):
        PrivacyLedger(ledger_path)


def test_not_a_ledger_is_refused(tmp_path):
    bad = tmp_path / "ledger.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerCorruptError, match="cannot be opened"):
        PrivacyLedger(bad)


def test_two_writers_keep_one_chain(ledger_path):
    a, b = PrivacyLedger(ledger_path), PrivacyLedger(ledger_path)

    def work(led: PrivacyLedger, exp: str) -> None:
        for r in range(15):
            _charge(led, exp, r, 0.1 * (r + 1))

    threads = [
        threading.Thread(target=work, args=(a, "exp-a")),
        threading.Thread(target=work, args=(b, "exp-b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.close()
    b.close()
    with PrivacyLedger(ledger_path) as led:
        assert led.verify() == 30
        assert led.spent("heart") == pytest.approx(1.5 + 1.5)


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from fedhealth.privacy.dp.ledger import PrivacyLedger
    led = PrivacyLedger(Path(sys.argv[1]))
    start = int(sys.argv[3])
    print("ready", flush=True)
    i = start
    while True:
        e = led.charge("heart", "exp-kill", i, 0.01, 0.01 * (i + 1), 1e-5, 1.1, 0.01, 10, "rdp")
        print(f"committed {e.id} {e.hash}", flush=True)
        i += 1
    """
)


def test_survives_kill_9_mid_write(ledger_path, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    committed: dict[int, str] = {}
    start = 0
    for cycle, wanted in enumerate((25, 60, 40)):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(ledger_path), str(ROOT), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        seen = 0
        deadline = time.monotonic() + 20
        while seen < wanted and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("committed"):
                _, eid, digest = line.split()
                committed[int(eid)] = digest
                seen += 1
        os.kill(proc.pid, signal.SIGKILL)  # mid-loop: most of its time is inside a commit
        rest, _ = proc.communicate(timeout=10)
        for line in rest.splitlines():  # lines already in the pipe were committed too
            if line.startswith("committed"):
                _, eid, digest = line.split()
                committed[int(eid)] = digest
        assert proc.returncode == -signal.SIGKILL
        assert seen == wanted, f"cycle {cycle}: child was too slow"

        with PrivacyLedger(ledger_path) as led:
            n = led.verify()
            stored = {e.id: e.hash for e in led.entries()}
            assert n >= len(committed)  # at most one more: committed, killed before printing
            assert n <= len(committed) + 1
            for eid, digest in committed.items():
                assert stored[eid] == digest
            last = led.entries()[-1]
            start = last.round + 1
            assert led.spent_in_experiment("heart", "exp-kill") == pytest.approx(0.01 * start)
