"""A site's SuperNode wakes the site's app process when a message has arrived.

The site's app process (:mod:`fedhealth.deploy.site_exec`) learns of a message by asking
the SuperNode's local Runtime API for a task (``AcquireTask``). Asking every few tens of
milliseconds, as Flower's SuperExec does, took 805-855 requests per site in a three-round
benchmark run (each costing the app process and its SuperNode CPU time): on a 2-core
coordinator-and-sites box that load made every SuperLink request slower. Instead the SuperNode
(:mod:`fedhealth.deploy.flower_pacing`) writes one byte to a named pipe in the site's
workspace when it has stored a message, and the app process waits on that pipe, asking
for a task at once when woken and otherwise only every :data:`FALLBACK_POLL` seconds (so a
lost wake-up costs at most that long).

The pipe carries no data, only "ask now": the app process still takes the task from the
SuperNode's Runtime API with the site's SuperExec secret. It is created 0600 in the site's
workspace; another local account could at most make the app process ask once more.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
from pathlib import Path

from fedhealth.errors import ConfigError

#: The pipe's name in the site's workspace.
FIFO_NAME = "app-wake.fifo"
#: Seconds between the app process's polls when no wake-up comes.
FALLBACK_POLL = 1.0


def wake_path(workspace: Path) -> Path:
    """The wake-up pipe of the site whose workspace is ``workspace``."""
    return Path(workspace) / FIFO_NAME


def ensure_fifo(path: Path) -> Path:
    """Create the named pipe ``path`` (0600) unless it exists; returns ``path``.

    Raises
    ------
    ConfigError
        If something other than a named pipe is at ``path``.
    """
    path = Path(path)
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(path.lstat().st_mode):
            raise ConfigError(
                f"{path}: expected the site's wake-up pipe (a named pipe), found another "
                "kind of file; remove it and start the site again"
            ) from None
    return path


def notify(path: Path | None) -> bool:
    """Wake whoever waits on the pipe ``path``; never blocks, never raises.

    Returns
    -------
    bool
        Whether a wake-up was written (``False``: no pipe, nobody waiting, or the pipe is
        already full of unread wake-ups).
    """
    if path is None:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader; ENOENT: no pipe
        return False
    try:
        os.write(fd, b"\n")
        return True
    except OSError:  # EAGAIN: full, the reader has wake-ups waiting; a wake-up is best effort
        return False
    finally:
        os.close(fd)


class WakeReader:
    """The app process's end of the pipe: :meth:`wait` returns early when woken.

    Parameters
    ----------
    path : Path
        The named pipe (created if missing, see :func:`ensure_fifo`).
    """

    def __init__(self, path: Path) -> None:
        self.path = ensure_fifo(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        # Holding a write end keeps the pipe from reading as "closed" (always readable)
        # between two writers.
        self._keep = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a wake-up; ``True`` if one came.

        Every wake-up already written is consumed, so several messages stored while the
        app process was busy give one early poll (which then finds the tasks one by one).
        """
        ready, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            while os.read(self._fd, 4096):
                pass
        return True

    def close(self) -> None:
        """Close both ends held by this process."""
        for fd in (self._fd, self._keep):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> WakeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
