"""Read a site's tabular data (CSV or Parquet) into a numeric feature matrix.

Every site of a consortium reads its table with the *same* :class:`TabularSchema`,
so the features come out in the same order and categorical columns are one-hot
encoded against the same consortium-wide category list, whatever subset of
categories a site happens to hold.

Rows in error messages are 1-based data rows: row 1 is the first row after the
header (for a header-less file, the first line). For CSV files the file line is
given as well.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from fedhealth.catalogue import READERS
from fedhealth.config.site import DataSourceBase
from fedhealth.errors import ConfigError, DataError

if TYPE_CHECKING:  # pandas is imported to read a table, not to validate a site profile
    import pandas as pd

CSV_SUFFIXES = {".csv", ".data", ".txt"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
MISSING_POLICIES = ("drop", "error", "mean")

# Only plain decimal numbers are normalised as numbers, so that category names
# such as "nan", "inf" or "1_000" (which float() would accept) stay strings.
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class TabularSchema:
    """How to turn one table into features and labels, identical at every site.

    Parameters
    ----------
    numeric : list of str
        Numeric feature columns, in feature order.
    categorical : dict of str to list of str
        Column -> consortium-wide category list. Each column is one-hot encoded
        in this order (after the numeric features, in dict order), so every site
        encodes identically. Values are compared as strings after stripping;
        numbers are normalised, so ``"1"``, ``"1.0"`` and ``1`` all match ``"1"``.
    label : str
        Label column.
    label_map : dict of str to int, optional
        Raw label -> class. Without it, labels must be integers (or numbers, when
        ``binarize_label_above`` is set).
    binarize_label_above : float, optional
        If set, ``y = label > binarize_label_above`` (e.g. 0 for heart disease).
    missing : {"drop", "error", "mean"}
        What to do with missing values in a used column: drop the row, raise a
        :class:`DataError`, or impute the column mean of this site (for a
        categorical column, the site's category frequencies; rows with a missing
        label are always dropped under ``"mean"``).
    na_values : list of str
        Tokens (after stripping) that mean missing.
    columns : list of str, optional
        Column names for a header-less CSV (e.g. the UCI files). The file must
        have exactly this many fields per row.
    drop : list of str
        Columns to ignore. Columns the schema does not use are ignored anyway;
        listing them here documents that and guards against using them by mistake.
    drop_first : bool
        Leave out the first category of every categorical column (reference
        coding, like ``pandas.get_dummies(drop_first=True)``), as FLamby does.
    """

    numeric: list[str]
    categorical: dict[str, list[str]]
    label: str
    label_map: dict[str, int] | None = None
    binarize_label_above: float | None = None
    missing: str = "drop"
    na_values: Sequence[str] = ("?", "")
    columns: list[str] | None = None
    drop: Sequence[str] = ()
    drop_first: bool = False

    def __post_init__(self) -> None:
        if self.missing not in MISSING_POLICIES:
            raise ConfigError(
                f"tabular schema: missing must be one of {', '.join(MISSING_POLICIES)}, "
                f"not {self.missing!r}"
            )
        used = [*self.numeric, *self.categorical, self.label]
        repeated = sorted({c for c in used if used.count(c) > 1})
        if repeated:
            raise ConfigError(
                f"tabular schema: column(s) {', '.join(map(repr, repeated))} listed more "
                "than once among numeric, categorical and label"
            )
        clash = sorted(set(used) & set(self.drop))
        if clash:
            raise ConfigError(
                f"tabular schema: column(s) {', '.join(map(repr, clash))} are both used "
                "and listed in drop"
            )
        for col, cats in self.categorical.items():
            norm = [normalise_value(c) for c in cats]
            if not norm or len(set(norm)) != len(norm):
                raise ConfigError(
                    f"tabular schema: categorical column {col!r} needs a non-empty list "
                    f"of distinct categories, got {list(cats)!r}"
                )
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ConfigError("tabular schema: columns has duplicate names")


@dataclass
class TabularData:
    """Features and labels read from one table.

    Attributes
    ----------
    X : numpy.ndarray
        float32, shape (n, d).
    y : numpy.ndarray
        int64, shape (n,).
    feature_names : list of str
        Numeric column names, then one-hot names such as ``cp=1``.
    n_dropped : int
        Rows dropped for missing values.
    one_hot : numpy.ndarray, optional
        Boolean mask (d,) of one-hot columns, e.g. to leave them unscaled.
    """

    X: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    n_dropped: int
    one_hot: np.ndarray | None = field(default=None)


def normalise_value(value: Any) -> str:
    """Canonical string of a cell, so ``"1"``, ``" 1.0 "`` and ``1`` compare equal.

    Parameters
    ----------
    value : Any
        A raw cell value (string, number, ...).

    Returns
    -------
    str
        Stripped string; numbers are written as ``"1"`` if integral, else ``repr(float)``.
    """
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return _format_number(float(value))
    text = str(value).strip()
    if _NUMBER.match(text):
        return _format_number(float(text))
    return text


def _format_number(x: float) -> str:
    if math.isfinite(x) and x == int(x):
        return str(int(x))
    return repr(x)


class _Where:
    """Formats "where" in messages: file, column, row (and CSV line)."""

    def __init__(
        self, path: Path | str, header_lines: int | None, row_names: list[str] | None = None
    ):
        self.path = path
        self.header_lines = header_lines  # None for Parquet: no lines
        # Original 0-based row of each position (blank CSV lines are removed).
        self.rows: np.ndarray | None = None
        self.row_names = row_names  # e.g. patient ids of a table built from EHR records

    def row(self, pos: int) -> str:
        if self.row_names is not None:
            return f"row {pos + 1} ({self.row_names[pos]})"
        row = (int(self.rows[pos]) if self.rows is not None else pos) + 1
        if self.header_lines is None:
            return f"row {row}"
        return f"row {row} (line {row + self.header_lines})"

    def cell(self, column: str, pos: int) -> str:
        return f"{self.path}: column {column!r}, {self.row(pos)}"


def read_table(path: Path, schema: TabularSchema) -> TabularData:
    """Read a CSV or Parquet table into features and integer labels.

    Parameters
    ----------
    path : Path
        ``.csv``, ``.data`` or ``.txt`` (CSV) or ``.parquet``/``.pq``.
    schema : TabularSchema
        Columns, encoding, label and missing-value policy.

    Returns
    -------
    TabularData
        ``X`` (float32, n x d), ``y`` (int64), feature names, rows dropped.

    Raises
    ------
    DataError
        If the file is missing or unreadable, a declared column is absent, a value
        is not a number / not a declared category / not a valid label, a value is
        missing under ``missing="error"``, or no rows are left.
    """
    path = Path(path)
    frame, where = _load_frame(path, schema)
    return _encode(frame, schema, path, where)


def read_raw_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A table's cells as stored, unparsed (CSV cells as text), blank lines dropped.

    For readers that parse columns themselves (e.g. the analytics, which report
    missingness instead of dropping or imputing).

    Parameters
    ----------
    path : Path
        ``.csv``, ``.data``, ``.txt``, ``.parquet`` or ``.pq``.
    columns : list of str, optional
        Column names of a header-less CSV.

    Returns
    -------
    pandas.DataFrame
    """
    schema = TabularSchema(numeric=[], categorical={}, label="", columns=columns)
    return _load_frame(Path(path), schema)[0]


def encode_frame(
    frame: pd.DataFrame, schema: TabularSchema, origin: str, row_names: list[str] | None = None
) -> TabularData:
    """Encode an already-built table exactly as :func:`read_table` encodes a file.

    Readers of other sources (FHIR, OMOP) build the raw table (one row per record,
    one column per schema column; missing values as None/NaN) and hand it here, so
    every kind of site gets the same features, categories and missing-value policy.

    Parameters
    ----------
    frame : pandas.DataFrame
        Raw values; categories as text or numbers.
    schema : TabularSchema
        Columns, encoding, label and missing-value policy.
    origin : str
        Where the table came from, for messages (a folder, a database URL).
    row_names : list of str, optional
        A name per row (e.g. the patient id) for messages.
    """
    frame = frame.reset_index(drop=True)
    return _encode(frame, schema, origin, _Where(origin, None, row_names))


def _encode(frame: pd.DataFrame, schema: TabularSchema, path: Any, where: _Where) -> TabularData:
    present = [str(c) for c in frame.columns]
    needed = [*schema.numeric, *schema.categorical, schema.label]
    absent = [c for c in needed if c not in present]
    if absent:
        raise DataError(
            f"{path}: column(s) {', '.join(map(repr, absent))} declared in the schema "
            f"are not in the file; its columns are: {', '.join(present)}. "
            "Fix the column names in the schema or the file."
        )
    n = len(frame)
    if n == 0:
        raise DataError(f"{path}: the table has no data rows")
    na = {str(t).strip() for t in schema.na_values}
    where.rows = frame.index.to_numpy()
    missing = {c: _missing(frame[c], na) for c in needed}
    if schema.missing == "error":
        _raise_first_missing(missing, needed, where)

    numeric = [_parse_numeric(frame[c], missing[c], c, where) for c in schema.numeric]
    codes = {
        c: _parse_categories(frame[c], missing[c], c, cats, where)
        for c, cats in schema.categorical.items()
    }
    y_raw = _parse_label(frame[schema.label], missing[schema.label], schema, where)

    if schema.missing == "drop":
        keep = ~np.logical_or.reduce([missing[c] for c in needed])
    else:  # "mean" (or "error", where nothing is missing by now)
        keep = ~missing[schema.label]
    n_dropped = int(n - keep.sum())
    if not keep.any():
        raise DataError(
            f"{path}: no rows left after dropping {n_dropped} of {n} rows with missing "
            f"values ({_worst_missing(missing, n)}). Remove that column from the schema "
            "or set missing: mean."
        )

    blocks: list[np.ndarray] = []
    names: list[str] = []
    one_hot: list[bool] = []
    for col, values in zip(schema.numeric, numeric, strict=True):
        values = values[keep]
        if schema.missing == "mean":
            values = _impute_mean(values, col, path)
        blocks.append(values[:, None])
        names.append(col)
        one_hot.append(False)
    for col, cats in schema.categorical.items():
        block = _one_hot(codes[col][keep], len(cats), schema.missing == "mean", col, path)
        labels = [normalise_value(c) for c in cats]
        if schema.drop_first:
            block, labels = block[:, 1:], labels[1:]
        blocks.append(block)
        names.extend(f"{col}={c}" for c in labels)
        one_hot.extend([True] * len(labels))

    X = np.hstack(blocks) if blocks else np.zeros((int(keep.sum()), 0))
    y = y_raw[keep]
    if schema.binarize_label_above is not None:
        y = (y > schema.binarize_label_above).astype(np.int64)
    return TabularData(
        X=X.astype(np.float32),
        y=y.astype(np.int64),
        feature_names=names,
        n_dropped=n_dropped,
        one_hot=np.array(one_hot, dtype=bool),
    )


def _load_frame(path: Path, schema: TabularSchema) -> tuple[pd.DataFrame, _Where]:
    import pandas as pd

    if not path.is_file():
        raise DataError(
            f"data file not found: {path.resolve()}. Check the path in the site profile."
        )
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types for a bad file
            raise DataError(f"{path}: cannot read as Parquet: {exc}") from exc
        if schema.columns is not None:
            raise DataError(
                f"{path}: the schema gives columns for a header-less CSV, but this is a "
                "Parquet file with its own column names; remove columns from the schema"
            )
        frame = frame.reset_index(drop=True)
        frame.columns = [str(c).strip() for c in frame.columns]
        return frame, _Where(path, None)
    if suffix not in CSV_SUFFIXES:
        raise DataError(
            f"{path}: unknown table format {suffix!r}; use .csv, .data, .txt, .parquet or .pq"
        )
    header = schema.columns is None
    try:
        # Everything as text: we parse numbers ourselves to report the bad cell.
        frame = pd.read_csv(
            path,
            header=0 if header else None,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: the file is empty; it has no header and no rows") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as CSV: {exc}") from exc
    if not header:
        assert schema.columns is not None  # no header: the schema names the columns
        if frame.shape[1] != len(schema.columns):
            raise DataError(
                f"{path}: rows have {frame.shape[1]} fields but the schema's columns "
                f"names {len(schema.columns)}; make columns list one name per field"
            )
        frame.columns = list(schema.columns)
    # Blank lines are kept by read_csv (so row numbers match file lines); drop them.
    blank = frame.apply(lambda s: s.isna() | (s.astype(str).str.strip() == "")).all(axis=1)
    if blank.any():
        frame = frame[~blank.to_numpy()]
    # The index keeps each row's original position, so messages give true rows.
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame, _Where(path, 1 if header else 0)


def _missing(series: pd.Series, na: set[str]) -> np.ndarray:
    """True where a cell is null or, after stripping, one of the na tokens."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    missing = series.isna().to_numpy(dtype=bool, copy=True)
    if not (is_numeric_dtype(series) or is_bool_dtype(series)):
        present = ~missing
        text = series[present].astype(str).str.strip()
        missing[present] = text.isin(na).to_numpy(dtype=bool)
    return missing


def _raise_first_missing(missing: dict[str, np.ndarray], columns: list[str], where: _Where) -> None:
    # Report the missing cell that comes first in the file.
    first: tuple[int, str] | None = None
    for col in columns:
        hits = np.flatnonzero(missing[col])
        if hits.size and (first is None or hits[0] < first[0]):
            first = (int(hits[0]), col)
    if first is not None:
        raise DataError(
            f"{where.cell(first[1], first[0])}: value is missing. Fill it in, or set "
            "missing: drop or missing: mean in the schema."
        )


def _parse_numeric(series: pd.Series, missing: np.ndarray, col: str, where: _Where) -> np.ndarray:
    """Floats, NaN where missing; DataError at the first cell that is not a number."""
    import pandas as pd
    from pandas.api.types import is_numeric_dtype

    if is_numeric_dtype(series):  # includes booleans, read as 0/1
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        text = series.astype(str).str.strip().where(~missing)
        parsed = pd.to_numeric(text, errors="coerce")
        values = parsed.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(~missing & ~np.isfinite(values))
    if bad.size:
        raise DataError(
            f"{where.cell(col, int(bad[0]))}: {str(series.iloc[bad[0]]).strip()!r} is not a "
            "number. Correct the value, or add it to na_values if it means missing."
        )
    return np.where(missing, np.nan, values)


def _to_number(value: Any) -> float | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        x = float(value)
    else:
        text = str(value).strip()
        if not _NUMBER.match(text):
            return None
        x = float(text)
    return x if math.isfinite(x) else None


def _map_distinct(
    series: pd.Series, missing: np.ndarray, convert: Callable[[Any], Any], fill: Any
) -> tuple[np.ndarray, Any | None]:
    """Apply ``convert`` once per distinct value (fast on long columns).

    Returns the converted column (``fill`` where missing) and the position of
    the first cell ``convert`` rejected (returned None for), if any.
    """
    import pandas as pd

    values = series.to_numpy(dtype=object)
    present = ~missing
    table = {v: convert(v) for v in pd.unique(values[present])}
    rejected = {v for v, out in table.items() if out is None}
    if rejected:
        first = next(i for i in np.flatnonzero(present) if values[i] in rejected)
        return values, int(first)
    out = np.full(values.size, fill, dtype=object)
    out[present] = [table[v] for v in values[present]]
    return out, None


def _parse_categories(
    series: pd.Series, missing: np.ndarray, col: str, cats: list[str], where: _Where
) -> np.ndarray:
    """Index of each cell's category in ``cats``, -1 where missing."""
    lookup = {normalise_value(c): i for i, c in enumerate(cats)}
    codes, bad = _map_distinct(series, missing, lambda v: lookup.get(normalise_value(v)), -1)
    if bad is not None:
        raise DataError(
            f"{where.cell(col, bad)}: {str(series.iloc[bad]).strip()!r} is not one of the "
            f"declared categories {list(lookup)}. Add it to the schema's category list "
            "(at every site) or correct the value."
        )
    return codes.astype(np.int64)


def _parse_label(
    series: pd.Series, missing: np.ndarray, schema: TabularSchema, where: _Where
) -> np.ndarray:
    """Numeric label of each cell (via label_map if given), 0 where missing."""
    col = schema.label
    if schema.label_map is not None:
        lookup = {normalise_value(k): int(v) for k, v in schema.label_map.items()}
        y, bad = _map_distinct(series, missing, lambda v: lookup.get(normalise_value(v)), 0)
        if bad is not None:
            raise DataError(
                f"{where.cell(col, bad)}: label {str(series.iloc[bad]).strip()!r} is not in "
                f"label_map (known: {list(lookup)}). Add it to label_map or correct it."
            )
        return y.astype(np.float64)

    def number(value: Any) -> float | None:
        x = _to_number(value)
        if x is None or (schema.binarize_label_above is None and x != int(x)):
            return None
        return x

    y, bad = _map_distinct(series, missing, number, 0.0)
    if bad is not None:
        raise DataError(
            f"{where.cell(col, bad)}: label {str(series.iloc[bad]).strip()!r} is not an "
            "integer. Give a label_map for text labels, or binarize_label_above for numbers."
        )
    return y.astype(np.float64)


def _impute_mean(values: np.ndarray, col: str, path: Path) -> np.ndarray:
    gaps = np.isnan(values)
    if gaps.all():
        raise DataError(
            f"{path}: column {col!r} has no values at all, so missing: mean cannot "
            "impute it; remove it from the schema"
        )
    if gaps.any():
        values = values.copy()
        values[gaps] = values[~gaps].mean()
    return values


def _one_hot(codes: np.ndarray, k: int, impute: bool, col: str, path: Path) -> np.ndarray:
    block = np.zeros((codes.size, k))
    known = codes >= 0
    block[np.flatnonzero(known), codes[known]] = 1.0
    if impute and not known.all():
        if not known.any():
            raise DataError(
                f"{path}: column {col!r} has no values at all, so missing: mean cannot "
                "impute it; remove it from the schema"
            )
        # Mean of a one-hot block = the site's category frequencies.
        block[~known] = block[known].mean(axis=0)
    return block


def _worst_missing(missing: dict[str, np.ndarray], n: int) -> str:
    col = max(missing, key=lambda c: int(missing[c].sum()))
    return f"column {col!r} is missing in {int(missing[col].sum())} of {n} rows"


# --- the dataset kind a site profile registers ---------------------------------


class TabularSource(DataSourceBase):
    """A table of EHR records (CSV or Parquet)."""

    kind: Literal["tabular"] = Field(description="A CSV or Parquet table.")
    path: Path = Field(description="The table file (.csv, .data, .txt or .parquet).")
    columns: list[str] | None = Field(
        None, description="Header names for a header-less CSV (e.g. the UCI files)."
    )
    na_values: list[str] = Field(
        default_factory=lambda: ["?", ""], description="Tokens that mean a missing value."
    )


def tabular_schema(task: dict[str, Any], source: DataSourceBase) -> TabularSchema:
    """Merge the experiment's consortium-wide schema with the site's file layout.

    Sources without a file layout of their own (FHIR, OMOP) give no header names and
    the default missing-value tokens.
    """
    s = task["schema"]
    columns = getattr(source, "columns", None)  # header names of a header-less CSV
    return TabularSchema(
        numeric=list(s["numeric"]),
        categorical={k: list(v) for k, v in s["categorical"].items()},
        label=s["label"],
        label_map=s.get("label_map"),
        binarize_label_above=s.get("binarize_label_above"),
        missing=s.get("missing", "drop"),
        na_values=list(getattr(source, "na_values", ["?", ""])),
        columns=list(columns) if columns else None,
        drop=list(s.get("drop", [])),
        drop_first=bool(s.get("drop_first", False)),
    )


@READERS.register("tabular", traits={"tabular"}, options=TabularSource)
def read_tabular_source(source: TabularSource, task: dict[str, Any]) -> Any:
    """Read a registered table with the experiment's schema (``task["schema"]``)."""
    data = read_table(source.path, tabular_schema(task, source))
    return data.X, data.y, list(data.feature_names), []
