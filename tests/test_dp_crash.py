"""Kill -9 a site in the middle of a round, restart it: the ledger never lets a release go
uncharged, keeps every charge, opens cleanly, and the restarted site resumes its spend.

A child process plays the site: it calls the ClientApp's train handler round after round
(``tests/dp_consortium.py``) and prints ``{"released": round, "epsilon": ...}`` once a reply
(the update) has been built and handed over. The parent SIGKILLs it right after a charge
commits, or at a random moment while it trains.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dp_consortium import write_experiment, write_site

from fedhealth.privacy.dp.ledger import PrivacyLedger

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.rdp import RdpAccountant  # noqa: E402

TESTS = Path(__file__).resolve().parent

SITE = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from dp_consortium import reply_metrics, train_round
from fedhealth.privacy.dp.ledger import PrivacyLedger

kill_round = int(os.environ.get("KILL_AFTER_CHARGE_OF_ROUND", "0"))
if kill_round:
    charge = PrivacyLedger.charge

    def charge_then_die(self, *args, **kwargs):
        entry = charge(self, *args, **kwargs)  # committed and fsynced
        if entry.round == kill_round:
            os.kill(os.getpid(), signal.SIGKILL)
        return entry

    PrivacyLedger.charge = charge_then_die

print(json.dumps({{"ready": True}}), flush=True)
for r in [int(x) for x in sys.argv[2].split(",")]:
    reply, _ = train_round(Path(sys.argv[1]), 0, r)
    m = reply_metrics(reply)
    print(json.dumps({{"released": r, "epsilon": m["epsilon"]}}), flush=True)
"""


def _site_process(tmp: Path, exp: Path, rounds: str, **env: str) -> subprocess.Popen:
    script = tmp / "site_process.py"
    script.write_text(SITE.format(tests=str(TESTS)))
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", str(script), str(exp), rounds],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def _released(lines: list[str]) -> list[dict]:
    return [d for d in map(json.loads, lines) if "released" in d]


def _check_every_release_was_charged(ledger_path: Path, released: list[dict]) -> list:
    with PrivacyLedger(ledger_path) as ledger:  # opening re-verifies the hash chain
        entries = ledger.entries()
    for rel in released:  # ... at the exact total the site reported with the update
        assert any(
            e.round == rel["released"]
            and e.epsilon_experiment_total == pytest.approx(rel["epsilon"], rel=1e-12)
            for e in entries
        ), (rel, entries)
    totals = [e.epsilon_experiment_total for e in entries]
    assert totals == sorted(totals)
    return entries


def _google_rdp(entries, delta: float) -> float:
    acc = RdpAccountant()
    for e in entries:
        event = dp_accounting.PoissonSampledDpEvent(
            e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
        )
        acc.compose(event, e.steps)
    return acc.get_epsilon(delta)


@pytest.fixture
def site_experiment(tmp_path):
    site = write_site(tmp_path, "h1", n=200, seed=30)
    exp = write_experiment(
        tmp_path,
        [site],
        rounds=40,
        min_sites=1,
        training={"batch_size": 8, "local_epochs": 3},
        dp={"noise_multiplier": 1.5},
    )
    return tmp_path, exp, tmp_path / "workspace" / "h1" / "privacy-ledger.sqlite"


def test_kill_right_after_the_charge_then_restart(site_experiment):
    tmp, exp, ledger_path = site_experiment
    child = _site_process(tmp, exp, "1,2,3", KILL_AFTER_CHARGE_OF_ROUND="2")
    out, _ = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL
    released = _released(out.splitlines())
    assert [r["released"] for r in released] == [1]  # round 2 was charged, never released
    entries = _check_every_release_was_charged(ledger_path, released)
    assert [e.round for e in entries] == [1, 2]  # the charge of round 2 survived the kill

    child = _site_process(tmp, exp, "2,3")  # the restarted site is asked round 2 again
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    released += _released(out.splitlines())
    entries = _check_every_release_was_charged(ledger_path, released)
    assert [e.round for e in entries] == [1, 2, 2, 3]
    # It resumed the experiment's spend: the killed round still counts.
    assert released[-1]["epsilon"] == pytest.approx(_google_rdp(entries, 1e-3), rel=0.01)


def test_kill_at_random_moments_mid_round(site_experiment):
    tmp, exp, ledger_path = site_experiment
    rng = random.Random(7)
    released: list[dict] = []
    for attempt in range(2):
        first = 1 + len({r["released"] for r in released}) + attempt
        child = _site_process(tmp, exp, ",".join(map(str, range(first, 41))))
        assert child.stdout is not None
        assert "ready" in child.stdout.readline()
        # Let it release one update, then kill it somewhere inside a later round.
        released += _released([child.stdout.readline()])
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL
        released += _released(rest.splitlines())
        entries = _check_every_release_was_charged(ledger_path, released)
        # At most one round was charged without its update leaving (killed in between).
        assert len(released) <= len(entries) <= len(released) + attempt + 1
    assert released[-1]["epsilon"] <= _google_rdp(entries, 1e-3) * 1.01
