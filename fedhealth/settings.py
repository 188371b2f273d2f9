"""Every ``FEDHEALTH_*`` environment variable, declared once, typed and documented.

Like MLflow's ``mlflow.environment_variables``: code reads a variable through its
declaration here (``WORKSPACE.get()``), never through ``os.environ`` with a literal name,
so a name is spelled in one place and ``docs/config-reference.md`` lists them all. This
module imports nothing from fedhealth, so every layer may use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class EnvironmentVariable(Generic[T]):
    """One environment variable: its name, type, default and meaning.

    Parameters
    ----------
    name : str
        The variable's name (``FEDHEALTH_...``).
    parse : callable
        Turns the variable's text into its value (``float``, ``Path``, ...).
    default : object
        The value when the variable is unset or empty.
    doc : str
        What it does, for the docs.
    """

    name: str
    parse: Callable[[str], T]
    default: T
    doc: str

    def is_set(self) -> bool:
        """Whether the variable is set to a non-empty value."""
        return bool(os.environ.get(self.name))

    def get(self) -> T:
        """The variable's value, or the default when unset or empty.

        Raises
        ------
        ValueError
            If the text cannot be parsed (the message names the variable).
        """
        text = os.environ.get(self.name)
        if not text:
            return self.default
        try:
            return self.parse(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"environment variable {self.name}={text!r}: {exc}") from None


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must be a number of seconds, 0 or more")
    return value


WORKSPACE = EnvironmentVariable(
    "FEDHEALTH_WORKSPACE",
    Path,
    Path("workspace"),
    "Folder of the default MLflow store (`<workspace>/mlflow`) and other local state.",
)
TRACKING_URI = EnvironmentVariable(
    "FEDHEALTH_TRACKING_URI",
    str,
    "",
    "MLflow tracking URI of a deployed ServerApp; `coordinator start` sets it for the "
    "SuperLink's apps. A run config's `tracking-uri` takes precedence.",
)
MLFLOW_RETRY_SECONDS = EnvironmentVariable(
    "FEDHEALTH_MLFLOW_RETRY_SECONDS",
    _seconds,
    300.0,
    "How long one MLflow call is retried while the tracking server is unreachable, "
    "before the run fails naming the server and how to resume.",
)
SIM_SITE_PROFILES = EnvironmentVariable(
    "FEDHEALTH_SIM_SITE_PROFILES",
    str,
    "",
    "Internal: the simulation engine passes the site roster (JSON) to its ClientApps.",
)
SHARED_DATA = EnvironmentVariable(
    "FEDHEALTH_SHARED_DATA",
    Path,
    Path(__file__).resolve().parents[2] / "shared" / "data",
    "Tests only: where the small real data sets are (default `../shared/data` beside the "
    "project); tests that need them skip when absent.",
)

ALL: tuple[EnvironmentVariable, ...] = (
    WORKSPACE,
    TRACKING_URI,
    MLFLOW_RETRY_SECONDS,
    SIM_SITE_PROFILES,
    SHARED_DATA,
)
