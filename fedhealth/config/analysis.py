"""Schema of an analysis config (``experiments/*.analysis.toml``): federated analytics.

An analysis asks every site of a consortium for descriptive statistics of one of
its registered datasets -- counts and crosstabs, missingness, mean and standard
deviation, quantiles, histograms, Kaplan-Meier survival -- each released under
the Gaussian mechanism and charged to the site's privacy ledger before it
leaves. The ``[columns]`` table is the analysis's whole schema: a site reads
those columns and no others, and every bound that decides a sensitivity is
declared here, never derived from the data.

:class:`AnalysisSpec` is what a site receives; it validates the same rules again
at the site, so a hand-crafted request from a hostile coordinator is refused in
the same words as a bad file.
"""

from __future__ import annotations

import hashlib
import json
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from fedhealth.config.federation import SiteProfiles, StudyName, check_min_sites
from fedhealth.config.loader import load_model
from fedhealth.config.site import SITE_NAME, SiteProfile, load_site
from fedhealth.errors import ConfigError

QUERY_KINDS = ("count", "missingness", "mean", "quantiles", "histogram", "kaplan_meier")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- columns ---------------------------------------------------------------------------


class NumericColumn(_Strict):
    """A numeric column, clamped to declared bounds (they set the sensitivity)."""

    type: Literal["numeric"] = Field(description="A number per record.")
    lower: float = Field(description="Values below are clamped to this bound.")
    upper: float = Field(description="Values above are clamped to this bound.")
    na_values: list[float] = Field(
        default_factory=list,
        description="Numbers that mean 'not recorded' (e.g. 0 for the UCI files' cholesterol).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> NumericColumn:
        if not self.upper > self.lower:
            raise ValueError(f"upper ({self.upper:g}) must be above lower ({self.lower:g})")
        return self


class CategoricalColumn(_Strict):
    """A categorical column: a list of categories, or a map raw value -> category."""

    type: Literal["categorical"] = Field(description="One of a declared set of values.")
    categories: list[str] | dict[str, str] = Field(
        description="The categories in report order, or raw value -> category label "
        "(several raw values may share a label, e.g. diagnosis 1-4 -> 'disease')."
    )
    na_values: list[str] = Field(
        default_factory=list, description="Raw values that mean 'not recorded'."
    )

    @field_validator("categories")
    @classmethod
    def _cats(cls, v: list[str] | dict[str, str]) -> list[str] | dict[str, str]:
        raw = list(v) if isinstance(v, list) else list(v.keys())
        if not raw:
            raise ValueError("declare at least one category")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError("categories are listed more than once")
        return v

    def labels(self) -> list[str]:
        """The released categories, in order (mapped labels once each)."""
        vals = self.categories if isinstance(self.categories, list) else self.categories.values()
        return list(dict.fromkeys(str(c) for c in vals))

    def mapping(self) -> dict[str, str]:
        """Raw value -> category label."""
        if isinstance(self.categories, list):
            return {str(c): str(c) for c in self.categories}
        return {str(k): str(v) for k, v in self.categories.items()}


class BinaryColumn(_Strict):
    """A yes/no column, e.g. a survival event indicator."""

    type: Literal["binary"] = Field(description="True/false per record.")
    true_values: list[str] = Field(
        default_factory=lambda: ["1"], description="Raw values meaning true (event)."
    )
    false_values: list[str] = Field(
        default_factory=lambda: ["0"], description="Raw values meaning false (censored)."
    )

    def labels(self) -> list[str]:
        """The released categories: ``["0", "1"]``."""
        return ["0", "1"]

    def mapping(self) -> dict[str, str]:
        """Raw value -> ``"1"`` or ``"0"``."""
        out = {str(v): "1" for v in self.true_values}
        out.update({str(v): "0" for v in self.false_values})
        return out


Column = Annotated[NumericColumn | CategoricalColumn | BinaryColumn, Field(discriminator="type")]

# -- cohort ----------------------------------------------------------------------------

OPS = ("==", "!=", "<", "<=", ">", ">=", "in", "not null")


class Predicate(_Strict):
    """One condition on a declared column; the cohort is the rows meeting all of them."""

    column: str = Field(description="A column of `[columns]`.")
    op: Literal[OPS] = Field(description="Comparison.")  # type: ignore[valid-type]
    value: float | str | list[float | str] | None = Field(
        None,
        description="Right-hand side: a number (numeric columns), a category (categorical), "
        "a list (op 'in'), nothing (op 'not null').",
    )

    @model_validator(mode="after")
    def _value(self) -> Predicate:
        if self.op == "not null":
            if self.value is not None:
                raise ValueError("op 'not null' takes no value")
        elif self.op == "in":
            if not isinstance(self.value, list) or not self.value:
                raise ValueError("op 'in' needs a non-empty list as value")
        elif self.value is None or isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs one value")
        return self


class CohortSection(_Strict):
    """Which of a site's records the analysis covers (all predicates must hold)."""

    where: list[Predicate] = Field(
        default_factory=list, description="Predicates on declared columns; none = every record."
    )


# -- queries ---------------------------------------------------------------------------


class _Query(_Strict):
    name: str | None = Field(None, description="Name in the results (default: kind and columns).")
    epsilon: float | None = Field(
        None,
        gt=0,
        description="ε of this query alone at each site; default: an equal share of "
        "`privacy.epsilon`.",
    )


class CountQuery(_Query):
    """Record count, overall or by one or two categorical columns (a crosstab)."""

    kind: Literal["count"]
    by: list[str] = Field(
        default_factory=list, max_length=2, description="Up to two categorical/binary columns."
    )

    def default_name(self) -> str:
        return "count" + ("-by-" + "-".join(self.by) if self.by else "")


class MissingnessQuery(_Query):
    """Share of records with no value, per column."""

    kind: Literal["missingness"]
    columns: list[str] = Field(
        default_factory=list, description="Columns to check; none = every declared column."
    )

    def default_name(self) -> str:
        return "missingness"


class MeanQuery(_Query):
    """Mean and standard deviation of a numeric column (values clamped to its bounds)."""

    kind: Literal["mean"]
    column: str = Field(description="A numeric column.")

    def default_name(self) -> str:
        return f"mean-{self.column}"


class HistogramQuery(_Query):
    """Counts of a numeric column's values in declared bins."""

    kind: Literal["histogram"]
    column: str = Field(description="A numeric column.")
    bins: list[float] | int = Field(
        20,
        description="Bin edges covering the column's bounds, or a number of equal-width bins "
        "between them.",
    )

    def default_name(self) -> str:
        return f"histogram-{self.column}"


class QuantilesQuery(_Query):
    """Quantiles of a numeric column, read off a noisy histogram."""

    kind: Literal["quantiles"]
    column: str = Field(description="A numeric column.")
    quantiles: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75], description="Probabilities in (0, 1)."
    )
    bins: list[float] | int = Field(
        100,
        description="Edges of the histogram the quantiles are read from, or a number of "
        "equal-width bins between the column's bounds (the resolution).",
    )

    @field_validator("quantiles")
    @classmethod
    def _probs(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < p < 1 for p in v):
            raise ValueError("quantiles must be probabilities strictly between 0 and 1")
        return v

    def default_name(self) -> str:
        return f"quantiles-{self.column}"


class KaplanMeierQuery(_Query):
    """Kaplan-Meier survival, from noisy event and censoring counts per time bin."""

    kind: Literal["kaplan_meier"]
    time: str = Field(description="Numeric column: time to event or censoring.")
    event: str = Field(description="Binary column: 1 = event observed, 0 = censored.")
    group: str | None = Field(None, description="Optional categorical column: one curve each.")
    grid: list[float] = Field(
        description="Time points of the curve, increasing, > 0; the last is the horizon."
    )

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v or v[0] <= 0 or any(b <= a for a, b in pairwise(v)):
            raise ValueError("grid must be a non-empty list of increasing times above 0")
        if len(v) > 500:
            raise ValueError("grid has more than 500 points")
        return v

    def default_name(self) -> str:
        return f"km-{self.time}" + (f"-by-{self.group}" if self.group else "")


Query = Annotated[
    CountQuery | MissingnessQuery | MeanQuery | HistogramQuery | QuantilesQuery | KaplanMeierQuery,
    Field(discriminator="kind"),
]

# -- privacy ---------------------------------------------------------------------------


class AnalysisPrivacySection(_Strict):
    """How every released number is protected, per site."""

    epsilon: float | None = Field(
        None,
        gt=0,
        le=100,
        description="ε of the whole analysis at each site (queries without their own "
        "`epsilon` share what the others leave); give this or `epsilon` on every query.",
    )
    delta: float = Field(1e-5, gt=0, lt=1e-2, description="δ of the guarantee at each site.")
    mechanism: Literal["gaussian"] = Field(
        "gaussian",
        description="Gaussian noise scaled to each query's L2 sensitivity from declared bounds.",
    )
    accountant: Literal["rdp"] = Field(
        "rdp", description="Rényi-DP accountant (Opacus) composing the queries."
    )


class AnalysisSection(_Strict):
    """Identity and shape of the analysis."""

    name: StudyName = Field(
        description="Analysis name; the ledger charges it as 'analysis:<name>'."
    )
    description: str = Field("", description="Free text shown in MLflow.")
    sites: SiteProfiles = Field(min_length=1, description="Site profiles, relative to this file.")
    dataset: str = Field(description="Name of the dataset every site registers.")
    min_sites: int = Field(
        2, ge=1, description="Fewest sites whose releases a consortium answer needs."
    )

    @model_validator(mode="after")
    def _min_sites(self) -> AnalysisSection:
        check_min_sites(self.min_sites, self.sites)
        return self


class AnalysisTrackingSection(_Strict):
    """Where the results are recorded."""

    uri: str | None = Field(
        None, description="MLflow tracking URI; default: sqlite in ./workspace/mlflow."
    )
    experiment: str | None = Field(None, description="MLflow experiment; default: the name.")


# -- the spec a site receives, and the whole config ------------------------------------


def _check_queries(
    columns: dict[str, Any],
    cohort: CohortSection,
    queries: list[Any],
    privacy: AnalysisPrivacySection,
) -> None:
    """Cross-checks shared by the config and the spec a site receives."""

    def need(col: str, where: str, types: tuple[type, ...], what: str) -> Any:
        decl = columns.get(col)
        if decl is None:
            raise ValueError(
                f"{where}: column {col!r} is not declared in [columns] (undeclared column); "
                "declare it there with its type and bounds"
            )
        if not isinstance(decl, types):
            raise ValueError(f"{where}: column {col!r} is {decl.type}, but this needs {what}")
        return decl

    for i, p in enumerate(cohort.where):
        where = f"cohort.where.{i}"
        decl = need(p.column, where, (NumericColumn, CategoricalColumn, BinaryColumn), "")
        if p.op in ("<", "<=", ">", ">=") and not isinstance(decl, NumericColumn):
            raise ValueError(f"{where}: op {p.op!r} needs a numeric column")
        if isinstance(decl, NumericColumn) and p.op != "not null":
            vals = p.value if isinstance(p.value, list) else [p.value]
            if any(isinstance(x, str) for x in vals):
                raise ValueError(f"{where}: numeric column {p.column!r} compares with numbers")
        if isinstance(decl, CategoricalColumn | BinaryColumn) and p.op != "not null":
            vals = p.value if isinstance(p.value, list) else [p.value]
            labels = decl.labels()
            bad = [x for x in vals if str(x) not in labels]
            if bad:
                raise ValueError(
                    f"{where}: {bad!r} not among the categories of {p.column!r} ({labels})"
                )
    names: set[str] = set()
    cat = (CategoricalColumn, BinaryColumn)
    for i, q in enumerate(queries):
        where = f"queries.{i}"
        name = q.name or q.default_name()
        if name in names:
            raise ValueError(f"{where}: two queries are named {name!r}; give them names")
        names.add(name)
        if q.kind == "count":
            for c in q.by:
                need(c, where + ".by", cat, "a categorical or binary column")
            if len(set(q.by)) != len(q.by):
                raise ValueError(f"{where}.by: a column is listed twice")
        elif q.kind == "missingness":
            for c in q.columns:
                need(c, where + ".columns", (NumericColumn, *cat), "")
        elif q.kind in ("mean", "histogram", "quantiles"):
            decl = need(q.column, where + ".column", (NumericColumn,), "a numeric column")
            if q.kind != "mean":
                _check_bins(q.bins, decl, where + ".bins")
        elif q.kind == "kaplan_meier":
            need(q.time, where + ".time", (NumericColumn,), "a numeric column")
            need(q.event, where + ".event", (BinaryColumn,), "a binary column")
            if q.group is not None:
                need(q.group, where + ".group", cat, "a categorical or binary column")
    if privacy.epsilon is None:
        missing = [q.name or q.default_name() for q in queries if q.epsilon is None]
        if missing:
            raise ValueError(
                f"privacy.epsilon is not set and queries {missing} have no `epsilon` of their "
                "own; set `privacy.epsilon` (for the whole analysis) or each query's `epsilon`"
            )
    else:
        # A quick check (sites plan the exact split in Rényi DP and refuse what does not fit).
        own = [q.epsilon for q in queries if q.epsilon is not None]
        if own and len(own) < len(queries) and max(own) >= privacy.epsilon:
            raise ValueError(
                f"the queries' own `epsilon` values use up `privacy.epsilon` = "
                f"{privacy.epsilon:g}, leaving nothing for the queries without one; raise "
                "`privacy.epsilon` or lower the queries' own"
            )


def _check_bins(bins: list[float] | int, decl: NumericColumn, where: str) -> None:
    if isinstance(bins, int):
        if not 1 <= bins <= 1000:
            raise ValueError(f"{where}: between 1 and 1000 bins")
        return
    if len(bins) < 2 or any(b <= a for a, b in pairwise(bins)):
        raise ValueError(f"{where}: bin edges must be at least two increasing numbers")
    if len(bins) > 1001:
        raise ValueError(f"{where}: more than 1000 bins")
    if bins[0] > decl.lower or bins[-1] < decl.upper:
        raise ValueError(
            f"{where}: the edges [{bins[0]:g}, {bins[-1]:g}] must cover the column's bounds "
            f"[{decl.lower:g}, {decl.upper:g}] (values are clamped to the bounds)"
        )


class AnalysisSpec(_Strict):
    """What a site is asked: dataset, schema, cohort, queries and privacy (no site list)."""

    name: str = Field(description="The analysis name.")
    dataset: str = Field(description="The site's registered dataset.")
    columns: dict[str, Column] = Field(min_length=1)
    cohort: CohortSection = CohortSection()
    queries: list[Query] = Field(min_length=1, max_length=50)
    privacy: AnalysisPrivacySection = AnalysisPrivacySection()

    @model_validator(mode="after")
    def _cross(self) -> AnalysisSpec:
        if not SITE_NAME.match(self.name):
            raise ValueError("name: use lower-case letters, digits, '-' or '_' (max 63)")
        _check_queries(self.columns, self.cohort, self.queries, self.privacy)
        return self

    def query_names(self) -> list[str]:
        """Each query's name in the results, in order."""
        return [q.name or q.default_name() for q in self.queries]

    def canonical_bytes(self) -> bytes:
        """Deterministic JSON (sorted keys, no whitespace, ASCII): what travels and is hashed."""
        return json.dumps(
            self.model_dump(mode="json"),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        ).encode("ascii")

    def spec_hash(self) -> str:
        """SHA-256 of the canonical JSON spec: what a site approves and charges."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


class AnalysisConfig(_Strict):
    """A whole analysis config."""

    analysis: AnalysisSection
    columns: dict[str, Column] = Field(
        min_length=1,
        description="The analysis's schema: the only columns a site reads, with bounds.",
    )
    cohort: CohortSection = CohortSection()
    queries: list[Query] = Field(min_length=1, max_length=50)
    privacy: AnalysisPrivacySection = AnalysisPrivacySection()
    tracking: AnalysisTrackingSection = AnalysisTrackingSection()

    @model_validator(mode="after")
    def _cross(self) -> AnalysisConfig:
        _check_queries(self.columns, self.cohort, self.queries, self.privacy)
        return self

    @property
    def name(self) -> str:
        """The analysis name."""
        return self.analysis.name

    def spec(self) -> AnalysisSpec:
        """The request every site receives."""
        return AnalysisSpec(
            name=self.analysis.name,
            dataset=self.analysis.dataset,
            columns=self.columns,
            cohort=self.cohort,
            queries=self.queries,
            privacy=self.privacy,
        )


def load_analysis(path: Path) -> AnalysisConfig:
    """Load and validate an analysis config (not its sites).

    Parameters
    ----------
    path : Path
        The analysis TOML.

    Returns
    -------
    AnalysisConfig

    Raises
    ------
    ConfigError
        One line per problem, naming the file and the key.
    """
    return load_model(Path(path), AnalysisConfig)


def load_analysis_with_sites(path: Path) -> tuple[AnalysisConfig, list[SiteProfile]]:
    """Load an analysis and its site profiles, and check every site registers the dataset.

    Raises
    ------
    ConfigError
        A profile is invalid, two share a name, or one lacks the dataset.
    """
    cfg = load_analysis(path)
    sites = [load_site(p) for p in cfg.analysis.sites]
    seen: dict[str, Path] = {}
    for site_path, site in zip(cfg.analysis.sites, sites, strict=True):
        if site.name in seen:
            raise ConfigError(
                f"{path}: key `analysis.sites`: site name {site.name!r} is used by both "
                f"{seen[site.name]} and {site_path}; give each hospital its own name"
            )
        seen[site.name] = site_path
        if cfg.analysis.dataset not in site.datasets:
            raise ConfigError(
                f"{site_path}: site {site.name!r} has no dataset named "
                f"{cfg.analysis.dataset!r} (analysis {path} key `analysis.dataset`); it "
                f"registers {', '.join(sorted(site.datasets))}"
            )
    return cfg, sites
