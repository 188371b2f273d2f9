"""The SuperNode wakes the site's app process through a named pipe (fedhealth.deploy.wake)."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from fedhealth.deploy.wake import WakeReader, ensure_fifo, notify, wake_path
from fedhealth.errors import ConfigError


def test_a_wake_up_ends_the_wait_at_once_and_none_lets_it_time_out(tmp_path: Path) -> None:
    path = wake_path(tmp_path)
    with WakeReader(path) as reader:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISFIFO(path.stat().st_mode)
        t0 = time.monotonic()
        assert reader.wait(0.2) is False
        assert time.monotonic() - t0 >= 0.19  # nobody woke it: the full timeout

        threading.Timer(0.05, notify, args=(path,)).start()
        t0 = time.monotonic()
        assert reader.wait(5.0) is True
        assert time.monotonic() - t0 < 2.0  # woken, not timed out

        # Wake-ups written while the app process was busy give one early poll, not many.
        assert notify(path) and notify(path) and notify(path)
        assert reader.wait(0) is True
        assert reader.wait(0) is False


def test_notify_never_blocks_or_raises_without_a_reader(tmp_path: Path) -> None:
    assert notify(None) is False
    assert notify(tmp_path / "missing.fifo") is False
    path = ensure_fifo(wake_path(tmp_path))
    t0 = time.monotonic()
    assert notify(path) is False  # a pipe nobody reads: ENXIO, not a blocked SuperNode
    assert time.monotonic() - t0 < 1.0


def test_a_full_pipe_drops_wake_ups_without_blocking(tmp_path: Path) -> None:
    path = wake_path(tmp_path)
    with WakeReader(path) as reader:
        written = 0
        while notify(path):
            written += 1
            assert written < 10_000_000
        assert written > 0 and notify(path) is False  # full: dropped, the reader is due anyway
        assert reader.wait(0) is True


def test_a_file_that_is_not_a_pipe_is_refused_by_name(tmp_path: Path) -> None:
    path = wake_path(tmp_path)
    path.write_text("not a pipe")
    with pytest.raises(ConfigError, match=r"app-wake\.fifo.*named pipe"):
        ensure_fifo(path)
    assert path.read_text() == "not a pipe"  # left as it was


def test_the_supernode_wakes_the_app_process_for_each_message_it_stores(tmp_path: Path) -> None:
    from fedhealth.deploy.flower_pacing import Pacer, marking_busy, split_wake_argument

    path = wake_path(tmp_path)
    with WakeReader(path) as reader:
        pulls = iter([None, 7])
        pull = marking_busy(lambda: next(pulls), Pacer(), path)
        assert pull() is None and reader.wait(0) is False  # nothing stored: no wake-up
        assert pull() == 7 and reader.wait(0) is True

    argv = ["flower-supernode", "--superlink", "x:1", "--fedhealth-wake", str(path), "--insecure"]
    assert split_wake_argument(argv) == (
        ["flower-supernode", "--superlink", "x:1", "--insecure"],
        path,
    )
    assert split_wake_argument(["flower-supernode"]) == (["flower-supernode"], None)
    with pytest.raises(SystemExit, match="wake-up pipe"):
        split_wake_argument(["flower-supernode", "--fedhealth-wake"])


def test_site_processes_are_started_with_the_same_pipe(tmp_path: Path) -> None:
    from fedhealth.deploy.site import NodeSettings, executor_argv, supernode_argv

    s = NodeSettings(superlink="127.0.0.1:9093", root_certificate=None, auth_key=None, port=1)
    pipe = ensure_fifo(wake_path(tmp_path))
    node = supernode_argv(tmp_path / "site.toml", s, tmp_path / "secret", pipe)
    app = executor_argv(tmp_path / "site.toml", s, tmp_path / "secret", pipe)
    assert node[node.index("--fedhealth-wake") + 1] == str(pipe.resolve())
    assert app[app.index("--wake") + 1] == str(pipe.resolve())
    assert os.path.exists(pipe)
