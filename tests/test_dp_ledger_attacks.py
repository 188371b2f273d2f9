"""Attacks on a site's privacy ledger from someone who can write the site's files but does
not hold the ledger key: each must be refused, with the file, the expected and found
counters and what to do, and nothing may be charged or released.

Every attack here opened as "hash chain verified" with the unkeyed ledger (before the keyed
chain and the head kept outside the ledger file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from fedhealth.errors import FedHealthError
from fedhealth.privacy.dp.ledger import PrivacyLedger
from fedhealth.site.audit import read

_COLS = (
    "id, timestamp, dataset, experiment, round, kind, epsilon_increment, "
    "epsilon_experiment_total, delta, noise_multiplier, sample_rate, steps, accountant"
)


def _charge(led: PrivacyLedger, rnd: int, total: float, exp: str = "exp-a"):
    return led.charge("heart", exp, rnd, 0.1, total, 1e-5, 1.1, 0.01, 100, "rdp")


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return tmp_path / "workspace" / "h1"


@pytest.fixture
def ledger(ws: Path) -> Path:
    """A site ledger with five charges (closed, so the file alone holds them)."""
    path = ws / "privacy-ledger.sqlite"
    with PrivacyLedger(path) as led:
        for r in range(1, 6):
            _charge(led, r, 0.5 * r)
    return path


def _rows(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT count(*) FROM entries").fetchone()[0]
    finally:
        db.close()


def _sql(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER IF EXISTS entries_no_update")
    db.execute("DROP TRIGGER IF EXISTS entries_no_delete")
    for s in statements:
        db.execute(s)
    db.commit()
    db.close()


def _copy(src: Path, dst: Path) -> None:
    for suffix in ("", "-wal", "-shm"):  # a closed ledger has no WAL; be safe anyway
        s = src.with_name(src.name + suffix)
        d = dst.with_name(dst.name + suffix)
        if s.exists():
            shutil.copy2(s, d)
        elif d.exists():
            d.unlink()


def _refused(path: Path, *fragments: str, names: Path | None = None) -> str:
    with pytest.raises(FedHealthError) as exc:
        PrivacyLedger(path)
    msg = str(exc.value)
    assert str(names or path) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_deleting_the_newest_rows_is_refused(ledger):
    _sql(ledger, "DELETE FROM entries WHERE id > 3")
    msg = _refused(ledger, "expected counter 5, found 3", "rolled back", "backup")
    assert "Nothing was charged" in msg


def test_reforged_chain_without_the_key_is_refused(ledger):
    # Lower round 2's spend and re-chain every row the way the unkeyed ledger did.
    _sql(ledger, "UPDATE entries SET epsilon_experiment_total = 0.01 WHERE id >= 2")
    db = sqlite3.connect(ledger)
    prev = "0" * 64
    rows = db.execute(f"SELECT {_COLS} FROM entries ORDER BY id").fetchall()
    names = [c.strip() for c in _COLS.split(",")]
    db.execute("DROP TABLE entries")  # rebuilt with the forged hashes (no triggers left)
    db.execute(f"CREATE TABLE entries ({_COLS}, prev_hash, hash)")
    for row in rows:
        payload = dict(zip(names, row, strict=True))
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256((prev + canonical).encode()).hexdigest()
        db.execute(f"INSERT INTO entries VALUES ({', '.join('?' * 15)})", (*row, prev, digest))
        prev = digest
    db.commit()
    db.close()
    _refused(ledger, "entry id 1", "without the ledger key")


def test_rolling_back_to_an_older_copy_is_refused(ledger, tmp_path):
    old = tmp_path / "old-copy.sqlite"
    _copy(ledger, old)  # the attacker keeps a copy with five charges ...
    with PrivacyLedger(ledger) as led:  # ... the site charges three more ...
        for r in range(6, 9):
            _charge(led, r, 0.5 * r)
    _copy(old, ledger)  # ... and the copy is put back
    _refused(ledger, "expected counter 8, found 5", "truncated or rolled back", "backup")


def test_rolling_back_the_ledger_and_its_head_file_together_is_caught_by_the_audit_log(
    ledger, ws, tmp_path
):
    head = ws / "privacy-ledger.head"
    _copy(ledger, tmp_path / "old.sqlite")
    shutil.copy2(head, tmp_path / "old.head")
    with PrivacyLedger(ledger) as led:
        _charge(led, 6, 3.0)
    _copy(tmp_path / "old.sqlite", ledger)
    shutil.copy2(tmp_path / "old.head", head)
    _refused(ledger, "audit log", "expected counter 6, found 5")


def test_an_open_ledger_refuses_to_charge_after_a_rollback(ledger, tmp_path):
    led = PrivacyLedger(ledger)  # the site has it open (a long-lived process)
    try:
        _charge(led, 6, 3.0)
        _sql(ledger, "DELETE FROM entries WHERE id = 6")  # the newest charge disappears
        with pytest.raises(FedHealthError, match="expected counter 6, found 5"):
            _charge(led, 7, 3.5)
    finally:
        led.close()
    assert _rows(ledger) == 5  # nothing was charged


def test_deleting_the_ledger_does_not_give_a_fresh_budget(ledger, ws):
    for p in ws.glob("privacy-ledger.sqlite*"):
        p.unlink()
    msg = _refused(ledger, "is missing", "not recreated", "backup")
    assert "5 entries" in msg or "counter" in msg or "head file" in msg
    assert not ledger.exists()  # refused, not recreated


def test_deleting_ledger_and_head_file_is_caught_by_the_audit_log(ledger, ws):
    for p in [*ws.glob("privacy-ledger.sqlite*"), ws / "privacy-ledger.head"]:
        p.unlink()
    _refused(ledger, "is missing", "audit log")
    assert not ledger.exists()


def test_a_tampered_head_file_is_refused(ledger, ws):
    head = ws / "privacy-ledger.head"
    d = json.loads(head.read_text())
    d["counter"] = 3  # claim fewer charges (to hide a later truncation)
    head.write_text(json.dumps(d))
    _refused(ledger, "head file", "MAC does not verify", names=head)


def test_a_deleted_head_file_is_refused(ledger, ws):
    (ws / "privacy-ledger.head").unlink()
    _refused(ledger, "head file", "missing", "counter 5")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_readable_by_others_is_refused(ledger, ws, mode):
    key = ws / "privacy-ledger.key"
    assert key.stat().st_mode & 0o777 == 0o600  # created readable by the site user only
    os.chmod(key, mode)
    with pytest.raises(FedHealthError, match="chmod 600") as exc:
        PrivacyLedger(ledger)
    assert str(key) in str(exc.value)
    os.chmod(key, 0o600)
    with PrivacyLedger(ledger) as led:
        assert led.verify() == 5


def test_a_replaced_key_is_refused(ledger, ws):
    key = ws / "privacy-ledger.key"
    key.unlink()
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    with pytest.raises(FedHealthError, match="was written with key"):
        PrivacyLedger(ledger)


def test_a_deleted_key_is_refused_not_recreated(ledger, ws):
    (ws / "privacy-ledger.key").unlink()
    with pytest.raises(FedHealthError, match=r"key .* is missing"):
        PrivacyLedger(ledger)
    assert not (ws / "privacy-ledger.key").exists()


def test_a_forged_audit_anchor_is_refused(ledger, ws):
    log = ws / "audit.log"
    lines = log.read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["event"] == "ledger-head" and last["counter"] == 5
    log.write_text("\n".join([*lines, json.dumps({**last, "counter": 2})]) + "\n")
    with pytest.raises(FedHealthError, match="MAC does not verify"):
        PrivacyLedger(ledger)


def test_a_crash_between_charge_and_head_file_rolls_the_head_forward(ledger, ws, tmp_path):
    head = ws / "privacy-ledger.head"
    shutil.copy2(head, tmp_path / "head-before")
    with PrivacyLedger(ledger) as led:
        _charge(led, 6, 3.0)
    shutil.copy2(tmp_path / "head-before", head)  # as if the site died right after COMMIT
    with PrivacyLedger(ledger) as led:
        assert any("rolled forward from counter 5 to 6" in e for e in led.integrity.events)
        assert led.verify() == 6
    assert json.loads(head.read_text())["counter"] == 6


def test_every_charge_is_anchored_in_the_audit_log(ledger, ws):
    anchors = [r for r in read(ws / "audit.log") if r.get("ledger") == ledger.name]
    assert [r["event"] for r in anchors] == ["ledger-created"] + ["ledger-head"] * 5
    assert [r["counter"] for r in anchors] == [0, 1, 2, 3, 4, 5]
    with PrivacyLedger(ledger) as led:
        assert anchors[-1]["head"] == led.head_hash
        report = led.integrity
    assert (report.entries, report.head_file_counter, report.audit_counter) == (5, 5, 5)


# -- migration of the old, unkeyed format ----------------------------------------------------

_OLD_SCHEMA = """
CREATE TABLE entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp TEXT NOT NULL, dataset TEXT NOT NULL,
    experiment TEXT NOT NULL, round INTEGER NOT NULL, kind TEXT NOT NULL,
    epsilon_increment REAL NOT NULL, epsilon_experiment_total REAL NOT NULL, delta REAL NOT NULL,
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,
    accountant TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL UNIQUE
);
"""


def _old_ledger(path: Path, n: int) -> None:
    """A ledger as the unkeyed version wrote it (sha256 chain, no meta table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(_OLD_SCHEMA)
    prev = "0" * 64
    for i in range(1, n + 1):
        payload = {
            "id": i, "timestamp": f"2025-01-0{i}T00:00:00.000000+00:00", "dataset": "heart",
            "experiment": "old", "round": i, "kind": "record", "epsilon_increment": 0.2,
            "epsilon_experiment_total": 0.2 * i, "delta": 1e-5, "noise_multiplier": 1.1,
            "sample_rate": 0.01, "steps": 10, "accountant": "rdp",
        }  # fmt: skip
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256((prev + canonical).encode()).hexdigest()
        db.execute(
            f"INSERT INTO entries VALUES ({', '.join('?' * 15)})",
            (*payload.values(), prev, digest),
        )
        prev = digest
    db.commit()
    db.close()


def test_an_old_ledger_is_upgraded_once_with_a_line_in_the_audit_log(ws):
    path = ws / "privacy-ledger.sqlite"
    _old_ledger(path, 3)
    with PrivacyLedger(path) as led:
        assert led.integrity.legacy_entries == 3
        assert led.spent("heart") == pytest.approx(0.6)
        _charge(led, 4, 0.9, exp="old")
    with PrivacyLedger(path) as led:
        assert led.verify() == 4 and led.integrity.events == []  # upgraded once only
    events = [r["event"] for r in read(ws / "audit.log")]
    assert events == ["ledger-migrated", "ledger-head"]
    # The migrated rows are sealed by the key: editing one is still caught.
    _sql(path, "UPDATE entries SET epsilon_experiment_total = 0.0 WHERE id = 2")
    _refused(path, "entry id 2")


def test_an_old_format_file_cannot_replace_a_keyed_ledger(ledger, ws):
    for p in ws.glob("privacy-ledger.sqlite*"):
        p.unlink()
    _old_ledger(ledger, 1)  # a forged unkeyed ledger with a smaller spend
    _refused(ledger, "not bound to a key", "replaced")


def test_a_site_that_released_dp_updates_refuses_a_missing_ledger(ws):
    # A site upgraded from a version without anchors: only its audit log shows the spend.
    ws.mkdir(parents=True)
    (ws / "audit.log").write_text(json.dumps({"event": "sent", "epsilon": 0.7}) + "\n")
    _refused(ws / "privacy-ledger.sqlite", "is missing", "1 releases that spent")


# -- through the site's train handler: refused, nothing charged, nothing leaves ----------------


def test_the_site_refuses_a_round_after_a_rollback_and_releases_nothing(tmp_path):
    pytest.importorskip("opacus")
    from dp_consortium import refusal, reply_metrics, train_round, write_experiment, write_site

    site = write_site(tmp_path, "h1", n=200, seed=30)
    exp = write_experiment(
        tmp_path, [site], rounds=10, min_sites=1,
        training={"batch_size": 8, "local_epochs": 1}, dp={"noise_multiplier": 1.5},
    )  # fmt: skip
    path = tmp_path / "workspace" / "h1" / "privacy-ledger.sqlite"
    reply_metrics(train_round(exp, 0, 1)[0])
    _copy(path, tmp_path / "after-round-1.sqlite")
    reply_metrics(train_round(exp, 0, 2)[0])
    _copy(tmp_path / "after-round-1.sqlite", path)  # roll the ledger back one round

    reply, _ = train_round(exp, 0, 3)
    why = refusal(reply)
    assert why["rule"] == "ledger"
    assert "expected counter 2, found 1" in why["message"] and str(path) in why["message"]
    assert not reply.has_content()  # nothing left the site
    assert _rows(path) == 1  # and nothing was charged
    refused = [r for r in read(tmp_path / "workspace" / "h1" / "audit.log")]
    assert refused[-1]["event"] == "refused" and refused[-1]["rule"] == "ledger"


# -- `fedhealth site ledger` ---------------------------------------------------------------------


def test_site_ledger_cli_shows_what_it_checked_and_refuses_a_rolled_back_ledger(tmp_path):
    from dp_consortium import write_site
    from typer.testing import CliRunner

    from fedhealth.cli.main import app

    runner = CliRunner()
    site = write_site(tmp_path, "h1", n=50, seed=3)
    path = tmp_path / "workspace" / "h1" / "privacy-ledger.sqlite"
    with PrivacyLedger(path) as led:
        for r in range(1, 4):
            _charge(led, r, 0.5 * r)
    _copy(path, tmp_path / "old.sqlite")
    result = runner.invoke(app, ["site", "ledger", str(site)], terminal_width=400)
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "3 entries, keyed hash chain verified" in out
    assert "HMAC-SHA256 chain of 3 entries verified with key" in out
    assert "head file" in out and "counter 3 = 3 entries" in out
    assert "anchors counter 3" in out

    with PrivacyLedger(path) as led:
        _charge(led, 4, 2.5)
    _copy(tmp_path / "old.sqlite", path)
    result = runner.invoke(app, ["site", "ledger", str(site)], terminal_width=400)
    out = " ".join(result.output.split())
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "expected counter 4, found 3" in out

    for p in path.parent.glob("privacy-ledger.sqlite*"):
        p.unlink()
    result = runner.invoke(app, ["site", "ledger", str(site)], terminal_width=400)
    assert result.exit_code != 0 and "is missing" in " ".join(result.output.split())
    assert "no privacy ledger yet" not in result.output
    assert not path.exists()


def test_the_ledger_anchors_in_the_sites_audit_log():
    from fedhealth.privacy.dp.ledger_anchor import AUDIT_FILE
    from fedhealth.site.audit import AUDIT_FILE as SITE_AUDIT_FILE

    assert AUDIT_FILE == SITE_AUDIT_FILE
