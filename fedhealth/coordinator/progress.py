"""Progress events of a federated run, for whoever is watching.

The coordinator calls the ``on_event`` observer it was given (the CLI's live table in
simulation, where the ServerApp runs in-process; none on a SuperLink, where MLflow records
the same figures). The run's result is not an event: ``Federation.run`` returns its
``RunSummary``. An observer must not raise; if it does, the run goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fedhealth.coordinator")


@dataclass
class Event:
    """One thing that happened in a run."""

    kind: str  # run-started | round-started | train-done | evaluate-done | site-refused | ...
    round: int = 0
    data: dict[str, Any] = field(default_factory=dict)


Observer = Callable[[Event], None]


def notify(observer: Observer | None, kind: str, round: int = 0, **data: Any) -> None:
    """Send an event to ``observer`` (and to the log at debug level); a failing observer
    is logged, never raised: a broken display must never break a run."""
    log.debug("%s round=%s %s", kind, round, data)
    if observer is None:
        return
    try:
        observer(Event(kind, round, data))
    except Exception:
        log.exception("progress observer failed")
