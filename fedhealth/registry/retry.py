"""Retry MLflow calls while the tracking server restarts, so no metric or version is lost.

MLflow's own HTTP client retries a few times within seconds; a server restart takes
longer. :func:`retrying` keeps trying connection-level failures with back-off up to a
deadline, and re-raises anything that is not a connection problem at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("fedhealth.registry")

DEADLINE_ENV = "FEDHEALTH_MLFLOW_RETRY_SECONDS"
_TRANSIENT = (
    "connection refused",
    "max retries exceeded",
    "failed to establish",
    "connection reset",
    "connection aborted",
    "remote end closed",
    "temporarily unavailable",
    "503",
    "502",
    "504",
    "database is locked",
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` looks like the tracking server being briefly unreachable."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(t in text for t in _TRANSIENT)


def retrying(
    fn: Callable[..., T],
    *args,
    what: str = "MLflow call",
    deadline: float | None = None,
    **kwargs,
) -> T:
    """Call ``fn(*args, **kwargs)``, retrying transient failures until ``deadline`` seconds.

    Parameters
    ----------
    fn : callable
        The MLflow call.
    what : str
        What it does, for the log and the final error.
    deadline : float, optional
        Seconds to keep trying (default ``$FEDHEALTH_MLFLOW_RETRY_SECONDS`` or 300).
    """
    limit = deadline if deadline is not None else float(os.environ.get(DEADLINE_ENV, "300"))
    start, delay = time.monotonic(), 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() - start > limit:
                raise
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
