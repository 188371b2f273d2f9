"""A site's SuperNode that polls in tens of milliseconds while a run is active.

Flower 1.41's SuperNode (``flwr.supernode.start_client_internal``) has three fixed pauses
and no setting for any of them:

* ``time.sleep(3)`` after asking the SuperLink for a message and getting none: with a
  round of three exchanges, an idle site loses up to 3 s per exchange before it even sees
  the request;
* ``time.sleep(0.5)`` between checks for the app's reply in its own (in-memory) state, and
  the same between checks for the reply's object contents: up to 0.5 s after the app
  answered.

This module is the one place where fedhealth changes Flower's behaviour. It does so only on
the Flower release it was written against (:data:`FLOWER_SERIES`, checked at
:func:`install` together with the exact pauses in that module's source; otherwise it warns
and leaves Flower as it is) and only in the SuperNode process it starts:
``python -m fedhealth.deploy.flower_pacing [flower-supernode arguments]`` installs the pacing
and runs Flower's own ``flower-supernode``. What changes is how long those three pauses
last, nothing else:

* the idle pause follows a :class:`Pacer`: :data:`ACTIVE_POLL` seconds right after a
  message, doubling up to :data:`SETTLED_POLL` while a run is active (less than
  :data:`ACTIVE_WINDOW` seconds since the SuperNode last received a message), then up to
  :data:`IDLE_POLL`, so an idle site asks the SuperLink about once a second instead of
  every 3 s, and a busy one within tens of milliseconds of the next message when it comes
  soon. Every poll costs the SuperLink a request (TLS, node authentication, database
  reads: an estimated 10-15 ms of its CPU on a 2-core box), so three sites polling every
  50 ms kept it busy more than half the time and every request queued behind the polls;
* the reply checks pause :data:`REPLY_POLL` seconds (a lookup in the SuperNode's own
  memory).

Run with ``--fedhealth-wake PIPE`` (removed from the arguments before Flower sees them),
the SuperNode also writes to the site's wake-up pipe (:mod:`fedhealth.deploy.wake`) each
time it has stored a message, so that the site's own app process
(:mod:`fedhealth.deploy.site_exec`) asks for it at once instead of polling.
"""

from __future__ import annotations

import inspect
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from fedhealth.deploy.wake import notify

#: The Flower release whose SuperNode source this module was checked against.
FLOWER_SERIES = "1.41."
#: First pause (s) before polling the SuperLink again after a message (Flower: 3 s always).
ACTIVE_POLL = 0.025
#: Longest pause (s) between polls while a run is active.
SETTLED_POLL = 0.2
#: Longest pause between polls of an idle SuperNode (s).
IDLE_POLL = 1.0
#: A run counts as active this long after the SuperNode last received a message (s).
ACTIVE_WINDOW = 60.0
#: Seconds between checks for the app's reply and its contents (Flower: 0.5 s).
REPLY_POLL = 0.01

#: The pauses of ``flwr.supernode.start_client_internal`` (seconds -> how many calls).
FLOWER_PAUSES = {"time.sleep(3)": 1, "time.sleep(0.5)": 2}
_IDLE, _REPLY = 3, 0.5


@dataclass
class Pacer:
    """How long to pause before the next poll: short after a message, backing off after.

    The pause starts at ``active`` after :meth:`busy` and doubles with every empty poll, up
    to ``settled`` while less than ``window`` seconds have passed since :meth:`busy`, then
    up to ``idle``.

    Parameters
    ----------
    active : float
        First pause (s) after :meth:`busy`.
    settled : float
        Longest pause (s) within ``window`` seconds of :meth:`busy`.
    idle : float
        Longest pause (s) once idle.
    window : float
        Seconds after the last :meth:`busy` during which polling stays at most ``settled``.
    clock : callable
        Monotonic clock (seconds); injectable for tests.
    """

    active: float = ACTIVE_POLL
    settled: float = SETTLED_POLL
    idle: float = IDLE_POLL
    window: float = ACTIVE_WINDOW
    clock: Callable[[], float] = time.monotonic
    _last: float = field(default=float("-inf"), init=False)
    _pause: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._pause = self.active

    def busy(self) -> None:
        """Something arrived: poll fast for the next ``window`` seconds."""
        self._last = self.clock()
        self._pause = self.active

    def pause(self) -> float:
        """The pause before the next poll (s) after a poll that found nothing."""
        cap = self.settled if self.clock() - self._last < self.window else self.idle
        pause, self._pause = min(self._pause, cap), min(self._pause * 2, cap)
        return pause


class PacedTime:
    """Stand-in for the ``time`` module inside Flower's SuperNode main loop.

    Everything is ``time``'s own except :meth:`sleep`, which turns Flower's idle pause
    (3 s) into the pacer's and its reply checks (0.5 s) into :data:`REPLY_POLL`; any other
    duration is slept as asked.
    """

    def __init__(self, pacer: Pacer, reply: float = REPLY_POLL) -> None:
        self.pacer = pacer
        self.reply = reply

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def paced(self, seconds: float) -> float:
        """How long Flower's ``time.sleep(seconds)`` lasts here."""
        if seconds == _IDLE:
            return self.pacer.pause()
        if seconds == _REPLY:
            return self.reply
        return seconds

    def sleep(self, seconds: float) -> None:
        """Sleep the paced duration of ``seconds``."""
        time.sleep(self.paced(seconds))


def mismatch(module: ModuleType, version: str) -> str:
    """Why the pacing cannot be installed on ``module`` of Flower ``version`` ("" if it can)."""
    if not version.startswith(FLOWER_SERIES):
        return f"Flower {version} is installed; the pacing was written for {FLOWER_SERIES}x"
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return f"the source of {module.__name__} cannot be read"
    for call, count in FLOWER_PAUSES.items():
        if source.count(call) != count:
            return f"{module.__name__} no longer calls {call} {count} time(s)"
    if not callable(getattr(module, "_pull_and_store_message", None)):
        return f"{module.__name__} has no _pull_and_store_message"
    return ""


def install(pacer: Pacer | None = None, wake: Path | None = None) -> PacedTime | None:
    """Pace this process's Flower SuperNode; returns the stand-in, or ``None`` (with a
    warning) when the installed Flower is not the one this was checked against.

    Parameters
    ----------
    pacer : Pacer, optional
        The idle-poll pacer (default: :data:`ACTIVE_POLL`, :data:`IDLE_POLL`,
        :data:`ACTIVE_WINDOW`).
    wake : Path, optional
        The site's wake-up pipe, written to after each stored message.
    """
    import flwr.supernode.start_client_internal as loop
    from flwr.supercore.version import package_version

    why = mismatch(loop, package_version)
    if why:
        warnings.warn(f"SuperNode polling left as Flower's: {why}", stacklevel=2)
        return None
    if isinstance(loop.time, PacedTime):
        return loop.time
    paced = PacedTime(pacer or Pacer())
    loop._pull_and_store_message = marking_busy(loop._pull_and_store_message, paced.pacer, wake)
    loop.time = paced  # type: ignore[assignment]
    return paced


def marking_busy(
    pull: Callable[..., int | None], pacer: Pacer, wake: Path | None = None
) -> Callable[..., int | None]:
    """Wrap Flower's ``_pull_and_store_message`` (returns the run id of a received
    message, or ``None``) so that every received message marks ``pacer`` busy and, with
    ``wake``, wakes the site's app process (:func:`fedhealth.deploy.wake.notify`)."""

    def pull_and_store_message(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            pacer.busy()
            notify(wake)
        return run_id

    return pull_and_store_message


def split_wake_argument(argv: list[str]) -> tuple[list[str], Path | None]:
    """``argv`` without ``--fedhealth-wake PIPE``, and that pipe (``None`` if absent)."""
    if "--fedhealth-wake" not in argv:
        return argv, None
    i = argv.index("--fedhealth-wake")
    if i + 1 >= len(argv):
        raise SystemExit("--fedhealth-wake needs the path of the site's wake-up pipe")
    return argv[:i] + argv[i + 2 :], Path(argv[i + 1])


def main() -> None:
    """Run ``flower-supernode`` (arguments from ``sys.argv``) with the pacing installed."""
    from fedhealth.flower_object_pulls import pace_object_pulls

    sys.argv, wake = split_wake_argument(sys.argv)
    install(wake=wake)
    pace_object_pulls()
    from flwr.supernode.cli import flower_supernode

    from fedhealth.deploy.heap import settle

    settle()  # Flower's imports are done; the SuperNode serves from here on
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
