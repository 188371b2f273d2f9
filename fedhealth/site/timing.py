"""Where one site handler's time went: process start, imports, data, training, encryption.

:func:`fedhealth.site.audit.audited` opens a :class:`HandlerTiming` for every handler
invocation and writes :meth:`HandlerTiming.record` into the audit log's outcome line; the
site's code marks its phases with :func:`phase`. A phase inside another counts only for
itself (the outer one gets its own time minus the inner), so the phases and ``other_s``
add up to ``handler_s``. Everything recorded is a duration: nothing derived from data.

The fields (seconds, 4 decimals):

``process_start_s``
    From this process's creation (``/proc/self/stat``; elsewhere: when this module was
    first imported) to the handler's start, for the first handler a process runs; 0 for
    later handlers of the same process (a simulated site's long-lived worker), and for
    every handler of a process that declared itself ready with :func:`serving` (a deployed
    site's app process, which starts and imports once, before any message comes).
``queued_s``
    From the coordinator creating the request (its ``created_at``, coordinator's clock) to
    the process's creation (or the handler's start for a reused process): the SuperLink,
    the SuperNode's polling, the app process taking the task and pulling the message.
    Across machines it also holds the difference of their clocks.
``import_s``
    Modules the handler imports for this message on first use (torch, the data readers,
    Opacus when DP is on, TenSEAL when the round is encrypted).
``load_s``, ``privacy_s``, ``train_s``, ``evaluate_s``
    Reading and splitting the data (and normalising it); the DP plan, policy and ledger
    (admission, charge, site-level noise); local training steps (building the model,
    DP-SGD included); the evaluation pass.
``encrypt_s``, ``decrypt_s``, ``serialise_s``
    HE: the keys, flattening, encrypting and signing the update; checking and decrypting
    an aggregate. Building the reply's records (and reading the request's arrays).
``handler_s``, ``other_s``
    The handler's whole time (up to the audit line) and what no phase claims (reading the
    profile, the audit log itself, policy checks).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from pathlib import Path

PHASES = ("import", "load", "privacy", "train", "evaluate", "encrypt", "decrypt", "serialise")

_IMPORTED_AT = time.time()  # fallback for the process's creation time
_process: dict[str, float] = {}  # "pid", "created", "handlers", "serving" of this process


def _this_process() -> dict[str, float]:
    if _process.get("pid") != os.getpid():  # first call, or a forked child
        _process.clear()
        _process.update(pid=os.getpid(), created=_created_at(), handlers=0, serving=0)
    return _process


def serving() -> None:
    """Declare this process a long-lived app process that is ready to serve messages: its
    start (and what it imported before this call) counts for no handler's
    ``process_start_s``."""
    _this_process()["serving"] = 1


def _created_at() -> float:
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT


def process_created_at() -> float:
    """Wall-clock time (epoch seconds) at which this process was created.

    Linux: the process's start time in ``/proc/self/stat`` (clock ticks since boot, 10 ms
    resolution), converted with ``CLOCK_BOOTTIME``. Elsewhere, when this module was first
    imported (a lower bound of the process's age).
    """
    return _this_process()["created"]


class HandlerTiming:
    """Durations of one handler invocation; see the module docstring for the fields.

    Parameters
    ----------
    request_created : float or None
        The request's ``created_at`` (epoch seconds, coordinator's clock), if known.
    """

    def __init__(self, request_created: float | None = None) -> None:
        self.started = time.time()
        self._t0 = time.perf_counter()
        proc = _this_process()
        proc["handlers"] += 1
        first = proc["handlers"] == 1 and not proc["serving"]
        self.process_start = max(self.started - proc["created"], 0.0) if first else 0.0
        came = self.started - self.process_start
        self.queued = came - request_created if request_created else None
        self.phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._stack: list[str] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the time of the ``with`` block to phase ``name`` (self time only)."""
        if name not in self.phases:
            raise ValueError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")
        t0 = time.perf_counter()
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()
            took = time.perf_counter() - t0
            self.phases[name] += took
            if self._stack:  # the enclosing phase keeps only its own time
                self.phases[self._stack[-1]] -= took

    def record(self) -> dict[str, float]:
        """The audit log's ``timing`` object (seconds), as of now."""
        total = time.perf_counter() - self._t0
        out = {"process_start_s": self.process_start}
        if self.queued is not None:
            out["queued_s"] = self.queued
        out.update({f"{k}_s": v for k, v in self.phases.items()})
        out["handler_s"] = total
        out["other_s"] = max(total - sum(self.phases.values()), 0.0)
        return {k: round(v, 4) for k, v in out.items()}


_current: ContextVar[HandlerTiming | None] = ContextVar("fedhealth_handler_timing", default=None)


def start(request_created: float | None = None) -> tuple[HandlerTiming, Token]:
    """Open the timing of a handler invocation; returns it and a token for :func:`stop`."""
    timing = HandlerTiming(request_created)
    return timing, _current.set(timing)


def stop(token: Token) -> None:
    """Close the timing opened by :func:`start`."""
    _current.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the ``with`` block to phase ``name`` of the current handler (no-op outside one)."""
    timing = _current.get()
    if timing is None:
        yield
        return
    with timing.phase(name):
        yield
