"""Turn fedhealth's errors into one clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from rich.console import Console
from rich.markup import escape

from fedhealth.errors import FedHealthError

F = TypeVar("F", bound=Callable)
_err = Console(stderr=True)


def error_line(exc: BaseException) -> str:
    """``error: <message>`` as Rich markup, the message escaped so that ``[keys]`` and
    ``[datasets.NAME]`` (what to do) print literally instead of being read as markup."""
    return f"[bold red]error:[/] {escape(str(exc))}"


def print_error(exc: BaseException, console: Console | None = None) -> None:
    """Print ``error: <message>`` literally to ``console`` (default: stderr)."""
    (console or _err).print(error_line(exc), highlight=False, soft_wrap=True)


def guarded(fn: F) -> F:
    """Decorator for CLI commands: a FedHealthError prints ``error: ...`` and exits."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FedHealthError as exc:
            print_error(exc)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            _err.print("[yellow]interrupted[/]")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
