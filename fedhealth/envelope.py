"""A small message's records travel as one record, so Flower moves fewer objects.

Flower 1.41 sends a message as a tree of objects — the message, its ``RecordDict``, every
record, every array and every array chunk — and each object is pushed to the SuperLink and
pulled from it with a request of its own, two at a time. A training request for the
tabular model is 8 objects and its encrypted reply 6: most of a deployed exchange's
requests, on a SuperLink that serves them one Python request at a time.

:func:`seal` replaces a message content of several records whose payload is at most
:data:`MAX_SEALED_BYTES` (Flower's own array chunk size, so no object grows beyond what
Flower already sends) by a single ``ConfigRecord`` named :data:`ENVELOPE` holding the
content as Flower's own protobuf encoding (``flwr.common.serde.recorddict_to_proto``);
:func:`open_envelope` restores it, checking that the envelope is the content's only record,
is well formed and holds no envelope itself. Anything larger (a DenseNet's weights, their
encrypted update) travels unchanged, in Flower's chunks. The coordinator seals every request
and opens every reply (:mod:`fedhealth.coordinator.exchange`); the site opens every request
and seals every reply (:func:`envelope_mod`, a Flower ClientApp mod), in simulation and in
deployment alike. A site still validates the opened records exactly as if they had come
one by one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Final

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

from fedhealth.protocol import ProtocolError

#: The record name of a sealed content.
ENVELOPE: Final = "fedhealth-envelope"
#: The envelope's key holding the encoded ``RecordDict``.
PAYLOAD: Final = "recorddict"
#: The envelope's format version key and value.
VERSION: Final = "v"
FORMAT: Final = 1
#: Largest payload sealed (bytes): Flower's array chunk size (5 MiB by default).
MAX_SEALED_BYTES: Final = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE


def _payload_bytes(content: RecordDict) -> int:
    """An upper bound of the encoded content's size without encoding it (8 bytes per number,
    the length of every array, string and bytes value, plus the names)."""
    size = 0
    for name, record in content.items():
        size += len(name) + 16
        if isinstance(record, ArrayRecord):
            size += sum(len(key) + len(a.data) + 8 * len(a.shape) + 32 for key, a in record.items())
        else:
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                size += len(key) + 16
                size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in values)
    return size


def _objects(content: RecordDict) -> int:
    """How many objects Flower makes of ``content``'s records (an array and its chunks)."""
    count = 0
    for record in content.values():
        count += 1
        if isinstance(record, ArrayRecord):
            count += sum(1 + max(1, -(-len(a.data) // MAX_SEALED_BYTES)) for a in record.values())
    return count


def seal(content: RecordDict, limit: int = MAX_SEALED_BYTES) -> RecordDict:
    """``content`` as one envelope record, or ``content`` itself when sealing saves no
    object (one plain record) or the payload exceeds ``limit`` bytes.

    Parameters
    ----------
    content : RecordDict
        A message's records.
    limit : int
        Largest payload to seal (bytes).

    Returns
    -------
    RecordDict
    """
    if _objects(content) <= 1 or _payload_bytes(content) > limit:
        return content
    from flwr.common.serde import recorddict_to_proto

    payload = recorddict_to_proto(content).SerializeToString()
    return RecordDict({ENVELOPE: ConfigRecord({VERSION: FORMAT, PAYLOAD: payload})})


def open_envelope(content: RecordDict) -> RecordDict:
    """The records sealed in ``content``; ``content`` itself if it is not sealed.

    Raises
    ------
    ProtocolError
        If the envelope is not the only record, has another format, does not decode as a
        ``RecordDict`` or holds another envelope (``field`` is the envelope's name).
    """
    if ENVELOPE not in content:
        return content
    where = f"record `{ENVELOPE}`"
    if len(content) != 1:
        others = ", ".join(sorted(k for k in content if k != ENVELOPE))
        raise ProtocolError(f"{where} must be the message's only record (also: {others})", ENVELOPE)
    record = content[ENVELOPE]
    if not isinstance(record, ConfigRecord):
        raise ProtocolError(f"{where} must be a ConfigRecord", ENVELOPE)
    if record.get(VERSION) != FORMAT:
        raise ProtocolError(
            f"{where}: format {record.get(VERSION)!r}, this fedhealth reads {FORMAT}", ENVELOPE
        )
    payload = record.get(PAYLOAD)
    if not isinstance(payload, bytes) or set(record) != {VERSION, PAYLOAD}:
        raise ProtocolError(f"{where} must hold `{VERSION}` and `{PAYLOAD}` (bytes) only", ENVELOPE)
    from flwr.common.serde import ProtoRecordDict, recorddict_from_proto
    from google.protobuf.message import DecodeError

    try:
        inner = recorddict_from_proto(ProtoRecordDict.FromString(payload))
    except (DecodeError, ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(
            f"{where}: `{PAYLOAD}` is not an encoded RecordDict ({type(exc).__name__})", ENVELOPE
        ) from None
    if ENVELOPE in inner:
        raise ProtocolError(f"{where} holds another envelope", ENVELOPE)
    return inner


def sealed(message: Message) -> Message:
    """A copy of ``message`` with its content sealed (:func:`seal`), or ``message`` itself
    when there is nothing to seal (an error, a one-record content). The caller's message
    keeps its records: the coordinator reads what it sent (to announce a round again)."""
    if not message.has_content():
        return message
    content = seal(message.content)
    if content is message.content:
        return message
    # Flower's typed overloads omit its (supported) metadata-and-content constructor.
    return Message(metadata=copy.copy(message.metadata), content=content)  # type: ignore[call-overload]


def envelope_mod(
    message: Message,
    context: Context,
    call_next: Callable[[Message, Context], Message],
    refuse: Callable[[Message, Context, ProtocolError], Message] | None = None,
) -> Message:
    """Flower ClientApp mod: open the request's envelope, seal the reply's content.

    A request whose envelope does not open is answered by ``refuse(message, context, error)``
    (the site's refusal reply); without ``refuse`` the error propagates.
    """
    if message.has_content():
        try:
            message.content = open_envelope(message.content)
        except ProtocolError as exc:
            if refuse is None:
                raise
            return refuse(message, context, exc)
    return sealed(call_next(message, context))
