"""Read a TOML file into a pydantic model, turning every failure into one clear message.

The message names the file, the dotted key and what to do, so that a data
scientist or a site operator can fix a config without reading a traceback.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from fedhealth.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

_HINTS = {
    "extra_forbidden": "remove it or check its spelling (see docs/config-reference.md)",
    "missing": "add it",
    "greater_than": "raise the value",
    "greater_than_equal": "raise the value",
    "less_than_equal": "lower the value",
    "less_than": "lower the value",
}


def read_toml(path: Path) -> dict:
    """Parse a TOML file, reporting a missing file or a syntax error clearly.

    Parameters
    ----------
    path : Path
        The TOML file.

    Returns
    -------
    dict
        The parsed document.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (looked for {path.resolve()}).")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}. Fix the syntax at that line.") from None


def validation_message(path: Path, exc: ValidationError) -> str:
    """Render a pydantic ValidationError as ``file: key: problem -> what to do`` lines."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        hint = _HINTS.get(err["type"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif ("input" in err and err["type"].endswith("_type")) or err["type"].endswith("_parsing"):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{path}: key `{key}`: {msg}" + (f" -> {hint}" if hint else ""))
    return "\n".join(lines)


def load_model(path: Path, model: type[M], context: dict | None = None) -> M:
    """Load ``path`` and validate it against ``model``.

    Parameters
    ----------
    path : Path
        TOML file to read.
    model : type[BaseModel]
        The schema.
    context : dict, optional
        Validation context passed to pydantic (e.g. the file's folder, to
        resolve relative paths).

    Returns
    -------
    BaseModel
        The validated config.

    Raises
    ------
    ConfigError
        With one line per problem, each naming the file and the key.
    """
    path = Path(path)
    data = read_toml(path)
    ctx = {"base_dir": path.resolve().parent, "file": path}
    ctx.update(context or {})
    try:
        return model.model_validate(data, context=ctx)
    except ValidationError as exc:
        raise ConfigError(validation_message(path, exc)) from None
