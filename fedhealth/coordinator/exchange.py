"""Sending a round's messages and collecting the replies, polling often enough.

Flower's deployed grid (``HttpGrid.send_and_receive``) sleeps 3 s between polls of the
SuperLink, so every exchange loses up to 3 s after the last reply arrives (three
exchanges per encrypted round). Polling a SuperLink on the consortium's network costs one
small request, so fedhealth polls quickly at first and backs off while sites train.

Every request's content is sealed and every reply's opened here (:mod:`fedhealth.envelope`):
a small message travels as one record. A reply whose envelope does not open becomes that
site's refusal (rule ``protocol``), reported like any other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Error, Message
from flwr.serverapp import Grid

from fedhealth.envelope import open_envelope, sealed
from fedhealth.protocol import REFUSAL_CODE, ProtocolError, Refusal

#: First poll interval (s); it doubles while nothing arrives, up to :data:`MAX_POLL`.
FIRST_POLL = 0.02
#: Longest poll interval (s): the most an exchange can lose after its last reply (a poll
#: is one small request to the SuperLink; ten a second cost it little).
MAX_POLL = 0.1


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float, max_poll: float = MAX_POLL
) -> list[Message]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` passed.

    Parameters
    ----------
    grid : Grid
        Simulation or deployment grid.
    messages : iterable of Message
        The messages to send.
    timeout : float
        Seconds to wait for the replies.
    max_poll : float
        Longest pause between polls; the pause restarts short after each reply.

    Returns
    -------
    list of Message
        The replies that arrived in time (error replies included).
    """
    pending = set(push(grid, messages))
    end = time.time() + timeout
    out: list[Message] = []
    pause = FIRST_POLL
    while pending and time.time() < end:
        got = pull(grid, list(pending))
        out += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            pause = FIRST_POLL if got else min(pause * 2, max_poll)
            time.sleep(min(pause, max(end - time.time(), 0.0)))
    return out


def push(grid: Grid, messages: Iterable[Message]) -> list[str]:
    """Push ``messages`` with their contents sealed; returns their message ids."""
    return list(grid.push_messages([sealed(m) for m in messages]))


def pull(grid: Grid, message_ids: list[str]) -> list[Message]:
    """The replies to ``message_ids`` that arrived, their contents opened (:func:`opened`)."""
    return [opened(m) for m in grid.pull_messages(message_ids)]


def opened(reply: Message) -> Message:
    """``reply`` with its sealed content opened; a refusal naming the node if it does not
    open (the envelope is the protocol's, so a site's reply that breaks it is malformed)."""
    if not reply.has_content():
        return reply
    try:
        reply.content = open_envelope(reply.content)
        return reply
    except ProtocolError as exc:
        node = f"node {reply.metadata.src_node_id}"
        refusal = Refusal(site=node, rule=exc.rule, message=f"malformed reply: {exc}")
        # Flower's typed overloads omit its (supported) metadata-and-error constructor.
        error = Error(REFUSAL_CODE, refusal.encode())
        return Message(metadata=reply.metadata, error=error)  # type: ignore[call-overload]
