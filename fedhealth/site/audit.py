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
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedhealth.site import timing as handler_timing

AUDIT_FILE = "audit.log"


def audit_path(workspace: Path) -> Path:
    """The audit log of a site whose workspace is ``workspace``."""
    return Path(workspace) / AUDIT_FILE


def append(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (opened O_APPEND, so concurrent handlers never interleave)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


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


def read(path: Path) -> Iterator[dict[str, Any]]:
    """The audit records, oldest first (a torn last line is skipped)."""
    if not path.is_file():
        return
    with path.open() as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


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
    info: dict[str, Any] = {"message_type": msg.metadata.message_type}
    try:
        config = msg.content["config"]
        info["round"] = int(config.get("server-round", 0))
        spec = json.loads(str(config.get("spec", "{}")) or "{}")
        info["experiment"] = spec.get("experiment")
        info["model"] = (spec.get("model") or {}).get("name")
        info["dataset"] = (spec.get("task") or {}).get("dataset")
        # The MLflow run, and through it the model version, this round contributes to.
        info["mlflow_run"] = str(config.get("mlflow-run-id", "")) or None
        info["registered_model"] = str(config.get("registered-model", "")) or None
    except (KeyError, TypeError, ValueError):
        pass
    try:  # a decryption query names its round and experiment in its "he-request" record
        request = msg.content["he-request"]
        info["round"] = int(request["round"])
        # HE binding: "<experiment>:<MLflow run id>:<random>"
        parts = str(request["experiment_id"]).split(":")
        info["experiment"] = parts[0]
        if len(parts) == 3 and parts[1] != "no-run":
            info["mlflow_run"] = parts[1]
    except (KeyError, TypeError, ValueError):
        pass
    return {k: v for k, v in info.items() if v is not None}


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


def audited(resolve_workspace: Callable[[Any], tuple[str, Path]]) -> Callable:
    """Decorator for a ClientApp handler ``(msg, context) -> Message``.

    Parameters
    ----------
    resolve_workspace : callable
        ``context -> (site name, site workspace)``.
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
            return handler(msg, context)
        path = audit_path(workspace)
        base = {"site": site, "handler": handler.__name__, **_request_info(msg)}
        append(path, {"ts": time.time(), "event": "received", **base})
        reply = handler(msg, context)
        if reply.has_error():
            try:
                why = json.loads(reply.error.reason or "{}")
            except json.JSONDecodeError:
                why = {"message": reply.error.reason}
            append(path, {"ts": time.time(), "event": "refused", **base,
                          "rule": why.get("rule", "error"), "message": why.get("message", ""),
                          "timing": timing.record()})  # fmt: skip
        else:
            size, digest, names = content_digest(reply.content)
            took = timing.record()
            append(path, {"ts": time.time(), "event": "sent", **base, "bytes": size,
                          "sha256": digest, "records": names,
                          "epsilon": _epsilon(reply.content), "timing": took})  # fmt: skip
        return reply

    return wrap
