"""A long-lived process's start-up objects leave the collector's scans; new garbage does not."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from collections.abc import Iterator

import pytest

from fedhealth.deploy.heap import settle


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process goes on collecting everything


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_settle_freezes_what_exists_and_still_collects_new_cycles(unfrozen: None) -> None:
    survivor = Cycle()
    frozen = settle()
    assert frozen > 0 and gc.get_freeze_count() == frozen
    assert not any(o is survivor for o in gc.get_objects())  # no longer scanned
    garbage = Cycle()
    gone = weakref.ref(garbage)
    del garbage
    gc.collect()
    assert gone() is None  # a cycle made after settling is collected as usual
    assert survivor.me is survivor  # and the frozen objects are untouched


def test_a_full_collection_after_settling_skips_the_import_heap() -> None:
    """In a fresh process that imported torch, a full collection scans far fewer objects
    once settled (the ratio, measured side by side in one process, not a time)."""
    code = (
        "import gc, torch, fedhealth.deploy.heap as h\n"
        "before = len(gc.get_objects())\n"
        "h.settle()\n"
        "after = len(gc.get_objects())\n"
        "print(before, after)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()  # fmt: skip
    before, after = int(out[0]), int(out[1])
    assert before > 50_000 and after < before / 20, (before, after)
