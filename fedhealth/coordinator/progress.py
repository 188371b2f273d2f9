"""Progress events of a federated run, for whoever is watching.

The coordinator publishes events; the CLI subscribes a live table in
simulation (where the ServerApp runs in-process), and MLflow records the same
figures for a real deployment. Subscribers must not raise.
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


Subscriber = Callable[[Event], None]
_subscribers: list[Subscriber] = []


def subscribe(fn: Subscriber) -> Callable[[], None]:
    """Register ``fn`` for every event; returns a function that unsubscribes it."""
    _subscribers.append(fn)
    return lambda: _subscribers.remove(fn) if fn in _subscribers else None


def publish(kind: str, round: int = 0, **data: Any) -> None:
    """Send an event to every subscriber (and to the log at debug level)."""
    event = Event(kind, round, data)
    log.debug("%s round=%s %s", kind, round, data)
    for fn in _subscribers:
        try:
            fn(event)
        except Exception:  # a broken display must never break a run
            log.exception("progress subscriber failed")
