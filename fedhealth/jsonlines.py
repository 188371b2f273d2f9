"""Append-only JSON-lines files: the site's audit log (:mod:`fedhealth.site.audit`) and the
privacy ledger's anchors in it (:mod:`fedhealth.privacy.dp.ledger_anchor`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def append(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (opened O_APPEND, so concurrent handlers never interleave)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read(path: Path) -> Iterator[dict[str, Any]]:
    """The records, oldest first (a torn last line is skipped)."""
    if not path.is_file():
        return
    with path.open() as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
