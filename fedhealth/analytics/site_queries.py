"""At a site: answer an analysis with noisy sufficient statistics, charged before they leave.

:func:`answer_analysis` is the whole site side. In order, and refusing at the first
failed rule with :class:`AnalysisRefused` (whose ``rule`` names it):

1. validate the request again (:class:`~fedhealth.config.analysis.AnalysisSpec`; a
   query on a column the analysis did not declare is refused: ``undeclared_column``);
2. the site's policy: ``allowed_experiments`` (the analysis name), ``max_delta``;
3. plan the noise and the ε of the whole analysis; check ``max_epsilon_per_experiment``
   and ``lifetime_epsilon_budget`` against the ledger, which composes it with every
   training charge of the same dataset;
4. read the declared columns (no other) of the site's dataset, apply the cohort,
   compute each query's exact statistics;
5. ``min_cell_count``: every count/crosstab cell, and the records behind every other
   query (per Kaplan-Meier group), must reach the site's minimum; a query that does not
   is withheld (neither charged nor released), and if every query is, the analysis is
   refused;
6. charge the ledger (committed and fsynced);
7. only then add the Gaussian noise and return the release.

Nothing is charged before step 6 and nothing is released before step 7. Refusal
messages name the rule, the query and the column, never a value read from the data;
the details go to the site's own log only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, cast

import numpy as np
import pandas as pd
from pydantic import ValidationError

from fedhealth.analytics.mechanism import (
    analysis_epsilon,
    effective_sigma,
    missingness_columns,
    plan_noise,
    sensitivity,
)
from fedhealth.config.analysis import (
    AnalysisSpec,
    BinaryColumn,
    CategoricalColumn,
    NumericColumn,
)
from fedhealth.config.ehr_sources import FhirSource, OmopSource
from fedhealth.config.site import SiteProfile
from fedhealth.data.ehr import read_ehr_frame
from fedhealth.data.imaging import DicomSource, ImageFolderSource, NpzSource
from fedhealth.data.tabular import TabularSource, normalise_value, read_raw_table
from fedhealth.errors import FedHealthError, PolicyError

log = logging.getLogger(__name__)

#: Default smallest count a site releases in a cell (``privacy.min_cell_count``).
DEFAULT_MIN_CELL_COUNT = 5
LEDGER_PREFIX = "analysis:"


class AnalysisRefused(PolicyError):
    """A site refused an analysis; ``rule`` names the rule. Nothing was charged or released.

    Attributes
    ----------
    rule : str
        E.g. ``undeclared_column``, ``min_cell_count``, ``max_epsilon_per_experiment``,
        ``lifetime_epsilon_budget``, ``max_delta``, ``allowed_experiments``, ``spec``,
        ``dataset``, ``data``.
    site : str
    """

    def __init__(self, site: str, rule: str, why: str) -> None:
        super().__init__(f"site {site!r} refuses the analysis (rule {rule}): {why}")
        self.site = site
        self.rule = rule


@dataclass
class QueryStats:
    """A query's exact statistics at one site (never leaves the site as such)."""

    values: np.ndarray  # flat float vector, the released layout
    shape: list[int]
    labels: dict[str, Any]
    # (what, count) pairs the minimum-cell rule checks
    cells: list[tuple[str, float]] = field(default_factory=list)


# -- reading ---------------------------------------------------------------------------


def _na_tokens(source: Any) -> set[str]:
    return {str(t).strip() for t in getattr(source, "na_values", ["?", ""])}


def read_columns(profile: SiteProfile, spec: AnalysisSpec) -> dict[str, np.ndarray]:
    """Read the declared columns of the site's dataset, parsed (and nothing else).

    Numeric columns become float arrays (NaN = missing), categorical and binary ones
    object arrays of category labels (None = missing).

    Raises
    ------
    AnalysisRefused
        ``dataset`` if the site lacks the dataset or its kind, ``data`` if a declared
        column is absent or holds values outside its declaration.
    """
    site = profile.name
    source = profile.datasets.get(spec.dataset)
    if source is None:
        raise AnalysisRefused(site, "dataset", f"it registers no dataset {spec.dataset!r}")
    if isinstance(source, TabularSource):
        frame = read_raw_table(source.path, list(source.columns) if source.columns else None)
        na = _na_tokens(source)
    elif isinstance(source, DicomSource | ImageFolderSource | NpzSource):
        frame = pd.DataFrame({"label": _image_labels(source)})
        na = set()
    elif isinstance(source, FhirSource | OmopSource):
        unmapped = [c for c in spec.columns if c not in source.features]
        if unmapped:
            raise AnalysisRefused(
                site,
                "data",
                f"dataset {spec.dataset!r} maps no {source.kind.upper()} feature to the "
                f"declared column(s) {', '.join(map(repr, unmapped))}",
            )
        frame = read_ehr_frame(source, list(spec.columns))
        na = set()
    else:
        raise AnalysisRefused(
            site,
            "dataset",
            f"dataset {spec.dataset!r} is a {source.kind!r} source, which analytics does not read",
        )
    absent = [c for c in spec.columns if c not in frame.columns]
    if absent:
        raise AnalysisRefused(
            site,
            "data",
            f"dataset {spec.dataset!r} has no column(s) {', '.join(map(repr, absent))} "
            "declared by the analysis",
        )
    return {name: _parse(site, name, decl, frame[name], na) for name, decl in spec.columns.items()}


def _image_labels(source: Any) -> list[str]:
    from fedhealth.data.imaging import read_dicom_folder, read_image_folder, read_npz

    if isinstance(source, NpzSource):
        data = read_npz(source.path, source.split, 8)
    else:
        labels = source.labels if source.labels.is_absolute() else source.path / source.labels
        reader = read_dicom_folder if isinstance(source, DicomSource) else read_image_folder
        data = reader(source.path, labels, 8, skip_bad_files=source.skip_bad_files)
    return [str(int(v)) for v in data.y]


def _parse(site: str, name: str, decl: Any, series: pd.Series, na: set[str]) -> np.ndarray:
    raw = series.to_numpy(dtype=object)
    text = np.array([None if v is None else str(v).strip() for v in raw], dtype=object)
    missing = np.array([t is None or t in na or t.lower() == "nan" for t in text], dtype=bool)
    if isinstance(decl, NumericColumn):
        # numpy's stubs reject a None fill, which object arrays take.
        vals = pd.to_numeric(pd.Series(np.where(missing, None, text)), errors="coerce")  # type: ignore[call-overload]
        out = np.array(vals.to_numpy(dtype=np.float64, na_value=np.nan), copy=True)
        if np.any(np.isnan(out) & ~missing):
            raise AnalysisRefused(site, "data", f"column {name!r} holds cells that are not numbers")
        out[np.isin(out, np.asarray(decl.na_values, dtype=np.float64))] = np.nan
        out[~np.isfinite(out)] = np.nan
        return out
    mapping = decl.mapping()
    extra_na = {normalise_value(v) for v in getattr(decl, "na_values", [])}
    out = np.empty(len(text), dtype=object)
    unknown = False
    for i, t in enumerate(text):
        if missing[i]:
            out[i] = None
            continue
        key = normalise_value(t)
        if key in extra_na:
            out[i] = None
        elif key in mapping:
            out[i] = mapping[key]
        else:
            unknown = True
    if unknown:
        kind = "categories" if isinstance(decl, CategoricalColumn) else "true/false values"
        raise AnalysisRefused(
            site,
            "data",
            f"column {name!r} holds values outside its declared {kind}; declare them in "
            "the analysis's [columns] (or as na_values)",
        )
    return out


# -- cohort and statistics ------------------------------------------------------------


def cohort_mask(spec: AnalysisSpec, table: dict[str, np.ndarray]) -> np.ndarray:
    """Rows meeting every predicate of ``spec.cohort`` (missing values never meet one)."""
    n = len(next(iter(table.values())))
    keep = np.ones(n, dtype=bool)
    for p in spec.cohort.where:
        col = table[p.column]
        decl = spec.columns[p.column]
        if isinstance(decl, NumericColumn):
            present = ~np.isnan(col)
            x = np.where(present, col, 0.0)
            if p.op == "not null":
                hit = present
            elif p.op == "in":
                hit = present & np.isin(x, np.asarray(p.value, dtype=np.float64))
            else:
                v = float(cast("float | str", p.value))  # the predicate checked: one value
                hit = (
                    present
                    & {
                        "==": x == v,
                        "!=": x != v,
                        "<": x < v,
                        "<=": x <= v,
                        ">": x > v,
                        ">=": x >= v,
                    }[p.op]
                )
        else:
            present = np.array([v is not None for v in col], dtype=bool)
            if p.op == "not null":
                hit = present
            elif p.op == "in":
                values = cast("list[float | str]", p.value)  # the predicate checked: a list
                hit = np.isin(col.astype(str), [str(v) for v in values]) & present
            elif p.op == "==":
                hit = (col.astype(str) == str(p.value)) & present
            else:  # "!="
                hit = (col.astype(str) != str(p.value)) & present
        keep &= hit
    return keep


def _edges(bins: list[float] | int, decl: NumericColumn) -> np.ndarray:
    if isinstance(bins, int):
        return np.linspace(decl.lower, decl.upper, bins + 1)
    return np.asarray(bins, dtype=np.float64)


def _histogram(x: np.ndarray, edges: np.ndarray, decl: NumericColumn) -> np.ndarray:
    x = np.clip(x[~np.isnan(x)], decl.lower, decl.upper)
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(idx, minlength=len(edges) - 1).astype(np.float64)


def exact_statistics(spec: AnalysisSpec, table: dict[str, np.ndarray]) -> list[QueryStats]:
    """Each query's exact sufficient statistics on the cohort, in the released layout.

    Parameters
    ----------
    spec : AnalysisSpec
    table : dict
        Parsed declared columns (:func:`read_columns`).

    Returns
    -------
    list of QueryStats
    """
    keep = cohort_mask(spec, table)
    rows = {k: v[keep] for k, v in table.items()}
    n = int(keep.sum())
    out: list[QueryStats] = []
    for q in spec.queries:
        if q.kind == "count":
            out.append(_count(spec, q, rows, n))
        elif q.kind == "missingness":
            cols = missingness_columns(q, spec.columns)
            miss = [float(np.sum(_is_missing(rows[c]))) for c in cols]
            out.append(
                QueryStats(
                    np.array([n, *miss], dtype=np.float64),
                    [1 + len(cols)],
                    {"columns": cols},
                    [("cohort", n)],
                )
            )
        elif q.kind == "mean":
            decl = cast(NumericColumn, spec.columns[q.column])  # the spec checked: numeric
            x = rows[q.column]
            x = np.clip(x[~np.isnan(x)], decl.lower, decl.upper)
            c, r = (decl.upper + decl.lower) / 2, (decl.upper - decl.lower) / 2
            z = (x - c) / r
            out.append(
                QueryStats(
                    np.array([len(z), z.sum(), (z**2).sum()], dtype=np.float64),
                    [3],
                    {"center": c, "half_range": r},
                    [(f"records with {q.column}", len(z))],
                )
            )
        elif q.kind in ("histogram", "quantiles"):
            decl = cast(NumericColumn, spec.columns[q.column])  # the spec checked: numeric
            edges = _edges(q.bins, decl)
            h = _histogram(rows[q.column], edges, decl)
            out.append(
                QueryStats(
                    h,
                    [len(h)],
                    {"edges": edges.tolist()},
                    [(f"records with {q.column}", float(h.sum()))],
                )
            )
        else:
            out.append(_kaplan_meier(spec, q, rows))
    return out


def _is_missing(col: np.ndarray) -> np.ndarray:
    if col.dtype == object:
        return np.array([v is None for v in col], dtype=bool)
    return np.isnan(col)


def _count(spec: AnalysisSpec, q: Any, rows: dict[str, np.ndarray], n: int) -> QueryStats:
    if not q.by:
        return QueryStats(np.array([n], dtype=np.float64), [1], {"by": []}, [("count", n)])
    # The spec checked: `by` columns are categorical or binary.
    levels = [cast("CategoricalColumn | BinaryColumn", spec.columns[c]).labels() for c in q.by]
    shape = [len(lv) for lv in levels]
    counts = np.zeros(shape, dtype=np.float64)
    present = np.ones(n, dtype=bool)
    for c in q.by:
        present &= ~_is_missing(rows[c])
    index = [
        np.array([lv.index(v) for v in rows[c][present]], dtype=np.int64)
        for c, lv in zip(q.by, levels, strict=True)
    ]
    np.add.at(counts, tuple(index), 1.0)
    cells = []
    for pos in np.ndindex(*shape):
        what = ", ".join(f"{c}={levels[i][pos[i]]}" for i, c in enumerate(q.by))
        cells.append((f"cell {what}", float(counts[pos])))
    return QueryStats(counts.ravel(), shape, {"by": list(q.by), "levels": levels}, cells)


def _kaplan_meier(spec: AnalysisSpec, q: Any, rows: dict[str, np.ndarray]) -> QueryStats:
    grid = np.asarray(q.grid, dtype=np.float64)
    k = len(grid)
    t, e = rows[q.time], rows[q.event]
    ok = ~np.isnan(t) & ~_is_missing(e)
    by = cast("CategoricalColumn | BinaryColumn", spec.columns[q.group]) if q.group else None
    groups = by.labels() if by is not None else ["all"]
    g = rows[q.group] if q.group else np.full(len(t), "all", dtype=object)
    if q.group:
        ok &= ~_is_missing(g)
    # Cells per group: events per bin (k), censorings per bin (k), beyond the horizon (1).
    # Bin j is (grid[j-1], grid[j]] with grid[-1] = -inf; one record is in one cell.
    cells = np.zeros((len(groups), 2 * k + 1), dtype=np.float64)
    tt = np.maximum(t[ok], cast(NumericColumn, spec.columns[q.time]).lower)
    ee, gg = e[ok], g[ok]
    idx = np.searchsorted(grid, tt, side="left")
    for gi, name in enumerate(groups):
        sel = gg == name
        ev = ee[sel] == "1"
        b = idx[sel]
        beyond = b >= k
        np.add.at(cells[gi], b[~beyond & ev], 1.0)
        np.add.at(cells[gi], k + b[~beyond & ~ev], 1.0)
        cells[gi, 2 * k] = float(beyond.sum())
    checks = [(f"records in group {q.group}={name}" if q.group else "records", cells[i].sum())
              for i, name in enumerate(groups)]  # fmt: skip
    return QueryStats(
        cells.ravel(),
        [len(groups), 2 * k + 1],
        {"grid": grid.tolist(), "groups": groups, "group": q.group},
        checks,
    )


# -- the whole site side --------------------------------------------------------------


def _allowed(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(name == p or fnmatchcase(name, p) for p in patterns)


def parse_spec(site: str, spec: dict[str, Any] | AnalysisSpec) -> AnalysisSpec:
    """Validate a received analysis request with the same rules as a config file.

    Parameters
    ----------
    site : str
        This site's name (for the refusal).
    spec : dict or AnalysisSpec
        The request as received (a dict is validated; a spec is returned as is).

    Returns
    -------
    AnalysisSpec

    Raises
    ------
    AnalysisRefused
        ``undeclared_column`` for a query on a column the analysis did not declare,
        ``spec`` for any other problem (every problem named by its key).
    """
    if isinstance(spec, AnalysisSpec):
        return spec
    try:
        return AnalysisSpec.model_validate(spec)
    except ValidationError as exc:
        text = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        rule = "undeclared_column" if "undeclared column" in text else "spec"
        raise AnalysisRefused(site, rule, f"the request is invalid: {text}") from None


def answer_analysis(
    profile: SiteProfile,
    spec: dict[str, Any] | AnalysisSpec,
    *,
    ledger: Any = None,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Answer an analysis at this site: checks, exact statistics, ledger charge, noise.

    Parameters
    ----------
    profile : SiteProfile
        The site's own profile (its data, policy and workspace).
    spec : dict or AnalysisSpec
        The request as received (validated again here).
    ledger : PrivacyLedger, optional
        The site's ledger (default: opened at ``profile.ledger_path`` and closed after).
    rng : numpy.random.Generator, optional
        Noise source for tests; default: seeded from the site's secret noise key and the
        ledger entry just committed, so every charge has fresh noise.

    Returns
    -------
    dict
        JSON-safe release: site, analysis, spec hash, ε, δ, ledger entry, and per query
        the noisy values, their shape, labels and the noise standard deviation.

    Raises
    ------
    AnalysisRefused
        At the first failed rule; nothing was charged and nothing released.
    """
    site = profile.name
    spec = parse_spec(site, spec)
    policy = profile.privacy
    min_cell = int(getattr(policy, "min_cell_count", DEFAULT_MIN_CELL_COUNT))
    if not _allowed(spec.name, policy.allowed_experiments):
        raise AnalysisRefused(
            site,
            "allowed_experiments",
            f"analysis {spec.name!r} is not among the site's allowed experiments "
            f"{list(policy.allowed_experiments or [])}; ask the operator to add it to "
            "`privacy.allowed_experiments`",
        )
    delta = float(spec.privacy.delta)
    if policy.max_delta is not None and delta > policy.max_delta:
        raise AnalysisRefused(
            site,
            "max_delta",
            f"δ={delta:g} is above the site's `privacy.max_delta` = {policy.max_delta:g}",
        )
    try:
        sigmas = plan_noise(spec.queries, spec.privacy)
    except (ValueError, FedHealthError) as exc:
        raise AnalysisRefused(site, "spec", str(exc)) from None
    eps_run = analysis_epsilon(sigmas, delta)

    own = ledger is None
    if own:
        from fedhealth.privacy.dp.ledger import PrivacyLedger

        ledger = PrivacyLedger(profile.ledger_path)
    try:
        return _answer(profile, spec, ledger, sigmas, eps_run, min_cell, rng)
    finally:
        if own:
            ledger.close()


def _answer(
    profile: SiteProfile,
    spec: AnalysisSpec,
    ledger: Any,
    sigmas: list[float],
    eps_run: float,
    min_cell: int,
    rng: np.random.Generator | None,
) -> dict[str, Any]:
    site, dataset = profile.name, spec.dataset
    experiment = LEDGER_PREFIX + spec.name
    delta = float(spec.privacy.delta)
    policy = profile.privacy
    before = ledger.spent_in_experiment(dataset, experiment)
    # Across runs of the same analysis, basic composition: the totals add up.
    total = before + eps_run
    exempt = dataset in policy.exempt_datasets
    cap = policy.max_epsilon_per_experiment
    if not exempt and cap is not None and total > cap:
        raise AnalysisRefused(
            site,
            "max_epsilon_per_experiment",
            f"the analysis would bring {experiment!r} on dataset {dataset!r} to "
            f"ε={total:.4g}, above the site's cap {cap:g} (already spent {before:.4g}); "
            "lower the analysis's ε or ask the operator to raise "
            "`privacy.max_epsilon_per_experiment`",
        )
    budget = policy.lifetime_epsilon_budget
    if not exempt and budget is not None:
        other = ledger.spent_excluding(dataset, experiment)
        if other + total > budget:
            raise AnalysisRefused(
                site,
                "lifetime_epsilon_budget",
                f"dataset {dataset!r} has spent ε={other:.4g} in other experiments and "
                f"trainings; this analysis would bring it to {other + total:.4g}, above the "
                f"site's lifetime budget {budget:g}; lower the analysis's ε or ask the "
                "operator to raise `privacy.lifetime_epsilon_budget`",
            )

    table = read_columns(profile, spec)
    stats = exact_statistics(spec, table)
    names = spec.query_names()
    # A query with a cell or group below the minimum is withheld (not computed into the
    # charge, not released); if every query is withheld the analysis is refused.
    withheld: dict[str, str] = {}
    for name, st in zip(names, stats, strict=True):
        small = [what for what, count in st.cells if count < min_cell]
        if small:
            log.warning(
                "site %s withholds query %s of analysis %s: cells below %d: %s",
                site, name, spec.name, min_cell, small,
            )  # fmt: skip
            withheld[name] = "min_cell_count"
    if len(withheld) == len(names):
        raise AnalysisRefused(
            site,
            "min_cell_count",
            f"every query ({', '.join(map(repr, names))}) has a cell or group below the "
            f"site's minimum count of {min_cell} (`privacy.min_cell_count`); coarsen the "
            "categories, widen the cohort or drop the queries",
        )
    active = [i for i, name in enumerate(names) if name not in withheld]
    eps_run = analysis_epsilon([sigmas[i] for i in active], delta)
    total = before + eps_run

    round_ = sum(1 for e in ledger.entries(dataset) if e.experiment == experiment) + 1
    entry = ledger.charge(
        dataset=dataset,
        experiment=experiment,
        round=round_,
        epsilon_increment=eps_run,
        epsilon_experiment_total=total,
        delta=delta,
        noise_multiplier=effective_sigma([sigmas[i] for i in active]),
        sample_rate=1.0,
        steps=1,
        accountant="rdp",
    )
    if rng is None:
        from fedhealth.privacy.dp.randomness import derive_seed, load_or_create_key

        key = load_or_create_key(profile.noise_key_path)
        seed = derive_seed(
            key, "analytics-noise", {"analysis": spec.spec_hash(), "charge": entry.hash}
        )
        rng = np.random.default_rng(seed)
    released: dict[str, Any] = {}
    for q, name, sigma, st in zip(spec.queries, names, sigmas, stats, strict=True):
        if name in withheld:
            released[name] = {"kind": q.kind, "withheld": withheld[name]}
            continue
        sens = sensitivity(q, spec.columns)
        std = sigma * sens
        noisy = st.values + rng.normal(0.0, std, size=st.values.shape)
        released[name] = {
            "kind": q.kind,
            "values": [float(v) for v in noisy],
            "shape": list(st.shape),
            "labels": st.labels,
            "noise_std": float(std),
            "noise_multiplier": float(sigma),
            "sensitivity": float(sens),
        }
    return {
        "site": site,
        "analysis": spec.name,
        "dataset": dataset,
        "spec_hash": spec.spec_hash(),
        "epsilon": float(eps_run),
        "epsilon_analysis_total": float(total),
        "epsilon_dataset_lifetime": float(ledger.spent(dataset)),
        "delta": delta,
        "accountant": "rdp",
        "ledger_entry": int(entry.id),
        "queries": released,
    }


def is_finite_release(release: dict[str, Any]) -> bool:
    """Whether every released number is finite (a coordinator's sanity check)."""
    return all(
        math.isfinite(v) for q in release.get("queries", {}).values() for v in q.get("values", [])
    )
