"""Turn fedhealth's errors into one clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from rich.console import Console

from fedhealth.errors import FedHealthError

F = TypeVar("F", bound=Callable)
_err = Console(stderr=True)


def guarded(fn: F) -> F:
    """Decorator for CLI commands: a FedHealthError prints ``error: ...`` and exits."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FedHealthError as exc:
            _err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            _err.print("[yellow]interrupted[/]")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
