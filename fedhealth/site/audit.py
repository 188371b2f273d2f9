"""The site audit log: append-only JSON lines in ``<site workspace>/audit.log``.

One line per request the site receives (``received``), and one per outcome: either
``refused`` (with the rule) or ``sent`` — what left the site: the bytes of the reply's
content, its SHA-256 digest, the ε charged (when the site reports one), the round and
the experiment. :func:`audited` wraps a ClientApp handler; the site's privacy ledger
holds the matching charge (same experiment and round).

Both outcome lines carry ``timing``: where the handler's time went (process start, imports,
data loading, training, encryption, serialising the reply; durations in seconds, see
:mod:`fedhealth.site.timing`). Durations only, nothing derived from the data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedhealth.jsonlines import append, read
from fedhealth.protocol import HEKey, ProtocolError, Record, Refusal
from fedhealth.site import timing as handler_timing

AUDIT_FILE = "audit.log"

__all__ = [
    "AUDIT_FILE",
    "append",
    "audit_path",
    "audited",
    "content_digest",
    "read",
    "record_refusal",
]


def audit_path(workspace: Path) -> Path:
    """The audit log of a site whose workspace is ``workspace``."""
    return Path(workspace) / AUDIT_FILE


def record_skipped_files(
    workspace: Path, site: str, dataset: str, skipped: list[tuple[str, str]]
) -> None:
    """Record, by name and reason, the files a dataset's reader skipped (``skip_bad_files``).

    The names stay here, at the site: a file name can carry a patient identifier, so only
    their count is ever reported to the coordinator.
    """
    files = [{"file": name, "reason": why} for name, why in skipped]
    record = {"ts": time.time(), "event": "skipped-files", "site": site, "dataset": dataset}
    append(audit_path(workspace), {**record, "count": len(files), "files": files})


def content_digest(content: Any) -> tuple[int, str, list[str]]:
    """Bytes, SHA-256 and record names of a reply's content (a Flower ``RecordDict``).

    Arrays count with their raw bytes; metric and config records as canonical JSON.
    """
    h = hashlib.sha256()
    size = 0
    names = sorted(content.keys())
    for name in names:
        record = content[name]
        h.update(name.encode())
        for key in sorted(record.keys()):
            value = record[key]
            data = getattr(value, "data", None)
            if isinstance(data, bytes):
                blob = data
            elif isinstance(value, bytes):
                blob = value
            else:
                blob = json.dumps(value, sort_keys=True, default=str).encode()
            h.update(key.encode())
            h.update(blob)
            size += len(blob)
    return size, h.hexdigest(), names


def _request_info(msg: Any) -> dict[str, Any]:
    """What the audit log records of a message that is not parsed as a round request:
    its type and, for a decryption query, the round and experiment its request names."""
    info: dict[str, Any] = {"message_type": msg.metadata.message_type}
    try:  # a decryption query names its round and experiment in its "he-request" record
        request = msg.content[Record.HE_REQUEST]
        info["round"] = int(request[HEKey.ROUND])
        # HE binding: "<experiment>:<MLflow run id>:<random>"
        parts = str(request[HEKey.EXPERIMENT_ID]).split(":")
        info["experiment"] = parts[0]
        if len(parts) == 3 and parts[1] != "no-run":
            info["mlflow_run"] = parts[1]
    except (KeyError, TypeError, ValueError):
        pass
    return {k: v for k, v in info.items() if v is not None}


def record_refusal(workspace: Path, site: str, msg: Any, refusal: Refusal) -> None:
    """Audit a request refused before any handler saw it (e.g. a sealed content that does
    not open, :mod:`fedhealth.envelope`): a ``received`` and a ``refused`` line."""
    base = {"site": site, "handler": "-", **_request_info(msg)}
    append(audit_path(workspace), {"ts": time.time(), "event": "received", **base})
    append(audit_path(workspace), {"ts": time.time(), "event": "refused", **base,
                                   "rule": refusal.rule, "message": refusal.message})  # fmt: skip


def _created_at(msg: Any) -> float | None:
    try:
        created = float(msg.metadata.created_at)
    except (AttributeError, TypeError, ValueError):
        return None
    return created if created > 0 else None


def _epsilon(content: Any) -> float | None:
    for name in content:
        record = content[name]
        for key in record.keys() if hasattr(record, "keys") else []:
            if "epsilon" in key.lower() and isinstance(record[key], (int, float)):
                return float(record[key])
    return None


def audited(
    resolve_workspace: Callable[[Any], tuple[str, Path]],
    parse: Callable[[Any], Any] | None = None,
    refuse: Callable[[Any, str, Exception], Any] | None = None,
) -> Callable:
    """Decorator for a ClientApp handler.

    Parameters
    ----------
    resolve_workspace : callable
        ``context -> (site name, site workspace)``.
    parse : callable, optional
        ``msg -> request``: parses the request once (e.g.
        :meth:`fedhealth.site.request.SiteRequest.from_message`). The handler is then
        called as ``handler(msg, context, request)`` and the audit line records
        ``request.audit_info()``. Without it the handler is ``handler(msg, context)``.
    refuse : callable, optional
        ``(msg, site, exc) -> reply``: the error reply to a request ``parse`` rejected
        (:class:`~fedhealth.protocol.ProtocolError`); the handler does not run.
    """

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def inner(msg: Any, context: Any) -> Any:
            timing, token = handler_timing.start(_created_at(msg))
            try:
                return _run(handler, msg, context, timing)
            finally:
                handler_timing.stop(token)

        return inner

    def _run(handler: Callable, msg: Any, context: Any, timing: Any) -> Any:
        try:
            site, workspace = resolve_workspace(context)
        except Exception:  # noqa: BLE001 - the handler reports a bad profile itself
            site, workspace = "?", None
        request, problem = None, None
        if parse is not None:
            try:
                request = parse(msg)
            except ProtocolError as exc:
                problem = exc

        def call() -> Any:
            if parse is None:
                return handler(msg, context)
            if problem is not None:
                assert refuse is not None, "audited(parse=...) needs refuse=..."
                return refuse(msg, site, problem)
            return handler(msg, context, request)

        if workspace is None:
            return call()
        path = audit_path(workspace)
        info = _request_info(msg)
        if request is not None:
            info.update(request.audit_info())
        base = {"site": site, "handler": handler.__name__, **info}
        append(path, {"ts": time.time(), "event": "received", **base})
        reply = call()
        if reply.has_error():
            why = Refusal.decode(reply.error.reason, node=site)
            append(path, {"ts": time.time(), "event": "refused", **base,
                          "rule": why.rule, "message": why.message,
                          "timing": timing.record()})  # fmt: skip
        else:
            size, digest, names = content_digest(reply.content)
            took = timing.record()
            append(path, {"ts": time.time(), "event": "sent", **base, "bytes": size,
                          "sha256": digest, "records": names,
                          "epsilon": _epsilon(reply.content), "timing": took})  # fmt: skip
        return reply

    return wrap
