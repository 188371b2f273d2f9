"""Render the config reference (docs/config-reference.md) from the schemas themselves.

The docs cannot drift from the code: a test regenerates this text and compares.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fedhealth.catalogue import MODELS, PROXIMAL, READERS, STRATEGIES, WEIGHTED_MEAN
from fedhealth.config.experiment import ExperimentConfig
from fedhealth.config.site import SiteProfile


def _type(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if args and all(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
            return "table (one of: " + ", ".join(a.__name__ for a in args) + ")"
        return " or ".join(_type(a) for a in args) + (
            " (optional)" if type(None) in typing.get_args(ann) else ""
        )
    if origin is typing.Annotated:
        return _type(typing.get_args(ann)[0])
    if origin in (list, dict):
        return str(ann).replace("typing.", "").replace("pathlib.", "")
    return getattr(ann, "__name__", str(ann))


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    d = field.default
    if d is PydanticUndefined and field.default_factory is not None:
        d = field.default_factory()
    if isinstance(d, BaseModel):
        return "(table)"
    return f"`{d!r}`".replace("PosixPath", "Path")


def _section(model: type[BaseModel], prefix: str, out: list[str], note: str = "") -> None:
    doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    out += [
        f"### `[{prefix}]`",
        "",
        f"{doc} {note}".strip(),
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    nested = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        ann = field.annotation
        inner = [a for a in typing.get_args(ann) if isinstance(a, type)] + [ann]
        sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            nested.append((sub, f"{prefix}.{key}"))
            out.append(f"| `{key}` | table | | see `[{prefix}.{key}]` |")
            continue
        desc = (field.description or "").replace("|", "\\|")
        out.append(f"| `{key}` | {_type(ann)} | {_default(field)} | {desc} |")
    out.append("")
    for sub, p in nested:
        _section(sub, p, out)


def render_reference() -> str:
    """The Markdown config reference for experiments and site profiles."""
    out = [
        "# Config reference",
        "",
        "Generated from the schemas (`python -m fedhealth.config.reference > "
        "docs/config-reference.md`). Unknown keys are errors. Relative paths are relative "
        "to the file that contains them.",
        "",
        "## Experiment config (`experiments/*.toml`)",
        "",
    ]
    for name, field in ExperimentConfig.model_fields.items():
        _section(_unwrap(field.annotation), name, out)
        if name == "model":
            _models(out)
        elif name == "strategy":
            _strategies(out)
    out += ["## Site profile (`sites/*.toml`)", ""]
    for name, field in SiteProfile.model_fields.items():
        if name == "datasets":
            out += [
                "### `[datasets.<name>]`",
                "",
                "Each registered dataset is a table keyed by the name experiments use "
                "(`task.dataset`); `kind` selects one of the layouts below.",
                "",
            ]
            for entry in READERS.entries():
                feeds = " or ".join(sorted(entry.traits))
                assert entry.options is not None
                prefix = f'datasets.<name>] kind = "{entry.name}" ['
                _section(entry.options, prefix, out, f"Feeds {feeds} tasks.")
            continue
        _section(_unwrap(field.annotation), name, out)
    out += _environment()
    return "\n".join(out).rstrip() + "\n"


def _models(out: list[str]) -> None:
    """One table of options per model of the catalogue."""
    out += [
        "Models of the catalogue (`fedhealth/models/`), the task kind each serves and "
        "its options (keys of `[model]` beside `name`):",
        "",
    ]
    for entry in MODELS.entries():
        kinds = " or ".join(sorted(entry.traits))
        out += [f'#### `[model] name = "{entry.name}"` ({kinds})', "", entry.summary, ""]
        fields = entry.options.model_fields if entry.options is not None else {}
        if not fields:
            out += ["No options.", ""]
            continue
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, field in fields.items():
            desc = (field.description or "").replace("|", "\\|")
            out.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
        out.append("")


def _strategies(out: list[str]) -> None:
    """The strategy catalogue with the traits that decide where each may run."""
    out += [
        "Named strategies (`fedhealth/strategies/`). *Weighted mean*: the aggregate is a "
        "weighted mean of the replies, so it works with `privacy.he` and site-level DP. "
        "*Proximal*: sites add a proximal term, which DP cannot protect.",
        "",
        "| name | weighted mean | proximal | what it does |",
        "|---|---|---|---|",
    ]
    for entry in STRATEGIES.entries():
        mean = "yes" if WEIGHTED_MEAN in entry.traits else "no"
        prox = "yes" if PROXIMAL in entry.traits else "no"
        out.append(f"| `{entry.name}` | {mean} | {prox} | {entry.summary} |")
    out.append("")


def _environment() -> list[str]:
    """The ``FEDHEALTH_*`` environment variables, from their declarations."""
    from fedhealth import settings

    out = [
        "## Environment variables",
        "",
        "Declared in `fedhealth/settings.py`; an empty value means unset.",
        "",
        "| variable | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for var in settings.ALL:
        kind = getattr(var.parse, "__name__", "str").lstrip("_").replace("seconds", "float (s)")
        default = f"`{var.default}`" if var.default != "" else "unset"
        if var is settings.SHARED_DATA:
            default = "`../shared/data` beside the project"
        out.append(f"| `{var.name}` | {kind} | {default} | {var.doc} |")
    return [*out, ""]


def render_analysis_reference() -> str:
    """The Markdown reference of analysis configs (``experiments/*.analysis.toml``)."""
    from fedhealth.config import analysis as a

    out = [
        "# Analysis config reference",
        "",
        "Generated from the schema (`python -m fedhealth.config.reference --analysis > "
        "docs/analysis-reference.md`). Unknown keys are errors. Relative paths are relative "
        "to the file that contains them. How the numbers are protected: docs/privacy.md.",
        "",
    ]
    _section(a.AnalysisSection, "analysis", out)
    out += ["### `[columns.<name>]`", "", "The analysis's schema; `type` selects one of:", ""]
    for col in (a.NumericColumn, a.CategoricalColumn, a.BinaryColumn):
        kind = typing.get_args(col.model_fields["type"].annotation)[0]
        _section(col, f'columns.<name>] type = "{kind}" [', out)
    _section(a.CohortSection, "cohort", out)
    _section(a.Predicate, "cohort.where[]", out)
    out += ["### `[[queries]]`", "", "One table per query; `kind` selects one of:", ""]
    for q in (a.CountQuery, a.MissingnessQuery, a.MeanQuery, a.HistogramQuery,
              a.QuantilesQuery, a.KaplanMeierQuery):  # fmt: skip
        kind = typing.get_args(q.model_fields["kind"].annotation)[0]
        _section(q, f'[queries]] kind = "{kind}" [', out)
    _section(a.AnalysisPrivacySection, "privacy", out)
    _section(a.AnalysisTrackingSection, "tracking", out)
    return "\n".join(out).rstrip() + "\n"


def _unwrap(ann: Any) -> type[BaseModel]:
    for a in (ann, *typing.get_args(ann)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    raise TypeError(ann)


if __name__ == "__main__":
    import sys

    print(render_analysis_reference() if "--analysis" in sys.argv else render_reference(), end="")
