"""Read an OMOP CDM database into the experiment's table, read-only and parameterised.

The cohort is every person with an inclusion event (a concept id in one CDM
table); the first (or latest) such event is the person's index date. Each schema
column then comes from ``person`` (age at the index date, gender) or from the
person's ``measurement``, ``observation``, ``condition_occurrence`` or
``drug_exposure`` rows of the declared concept ids. Rows are ordered by
``person_id``; the table goes through the same encoder as a CSV
(:func:`fedhealth.data.tabular.encode_frame`).

Every query is a SQLAlchemy Core ``select`` with bound parameters. The session
is read-only (PostgreSQL: ``default_transaction_read_only``; SQLite: the file is
opened with ``mode=ro``). The password comes from the environment or a 0600
file (:func:`fedhealth.config.ehr_sources.read_password`), and no message shows it.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import pandas as pd
from sqlalchemy import column, func, select, table
from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from fedhealth.config.ehr_sources import OmopFeature, OmopSource, read_password
from fedhealth.data.ehr_rules import apply_rule
from fedhealth.data.tabular import TabularData, TabularSchema, encode_frame
from fedhealth.errors import DataError

# CDM table -> (concept column, date column, value columns read).
_EVENT = {
    "measurement": ("measurement_concept_id", "measurement_date"),
    "observation": ("observation_concept_id", "observation_date"),
    "condition_occurrence": ("condition_concept_id", "condition_start_date"),
    "drug_exposure": ("drug_concept_id", "drug_exposure_start_date"),
    "procedure_occurrence": ("procedure_concept_id", "procedure_date"),
    "visit_occurrence": ("visit_concept_id", "visit_start_date"),
}
_VALUED = ("measurement", "observation")


@dataclass
class OmopTable:
    """The table read from an OMOP CDM, and the person id of each row."""

    data: TabularData
    persons: list[int]


def safe_url(source: OmopSource) -> str:
    """The database URL as shown in messages: never with a password."""
    if source.path is not None:
        return f"sqlite:///{source.path}"
    assert source.url is not None  # validated: exactly one of path and url
    return make_url(source.url).render_as_string(hide_password=True)


def engine_for(source: OmopSource) -> Engine:
    """A read-only engine for the source (password from env or file, never the profile)."""
    if source.path is not None:
        if not source.path.is_file():
            raise DataError(
                f"OMOP SQLite file not found: {source.path}. Check path in the site profile."
            )
        # mode=ro: SQLite itself refuses every write on this connection.
        url = URL.create(
            "sqlite", database=f"file:{source.path}", query={"mode": "ro", "uri": "true"}
        )
        return create_engine(url)
    assert source.url is not None  # validated: exactly one of path and url
    url = make_url(source.url)
    password = read_password(source)
    if password is not None:
        url = url.set(password=password)
    args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        args = {"connect_timeout": 5, "options": "-c default_transaction_read_only=on"}
    return create_engine(url, connect_args=args, pool_pre_ping=True)


@contextmanager
def connect(source: OmopSource) -> Iterator[Connection]:
    """Open a read-only connection; a failure names the URL (without the password)."""
    engine = engine_for(source)
    try:
        try:
            conn = engine.connect()
        except SQLAlchemyError as exc:
            raise DataError(
                f"cannot connect to the OMOP database {safe_url(source)}: "
                f"{_reason(exc, source)}. Check the host, port, user and password "
                f"({_credential_hint(source)})."
            ) from None
        with conn:
            yield conn
    finally:
        engine.dispose()


def read_omop(source: OmopSource, schema: TabularSchema) -> OmopTable:
    """Read the cohort's table from the OMOP CDM.

    Parameters
    ----------
    source : OmopSource
        Database, schema, cohort and column mapping.
    schema : TabularSchema
        The experiment's schema (columns, categories, label, missing policy).

    Returns
    -------
    OmopTable
        The encoded table and the person id of each row.

    Raises
    ------
    DataError
        If the database is unreachable or refuses the login, a table is missing, a
        concept id matches no record, a unit differs from the declared one, a value
        concept is not in ``values``, or the cohort is empty.
    """
    needed = [*schema.numeric, *schema.categorical, schema.label]
    frame, persons = omop_frame(source, needed)
    data = encode_frame(
        frame, schema, safe_url(source), row_names=[f"person_id {p}" for p in persons]
    )
    return OmopTable(data=data, persons=persons)


def omop_frame(source: OmopSource, columns: list[str]) -> tuple[pd.DataFrame, list[int]]:
    """The raw values of ``columns``, one row per person of the cohort, before encoding.

    What training encodes (:func:`read_omop`) and what an analysis reads
    (``fedhealth.analytics``) are the same values.

    Parameters
    ----------
    source : OmopSource
        Database, schema, cohort and column mapping.
    columns : list of str
        Schema columns to read; each must be mapped in ``source.features``.

    Returns
    -------
    tuple
        The frame (``None`` where a person has no value) and the person ids in row order.

    Raises
    ------
    DataError
        As :func:`read_omop`.
    """
    where = safe_url(source)
    unmapped = [c for c in columns if c not in source.features]
    if unmapped:
        raise DataError(
            f"{where}: the OMOP source maps no concept to column(s) "
            f"{', '.join(map(repr, unmapped))}; add [features.<column>] tables to the "
            "site profile's dataset"
        )
    with connect(source) as conn:
        index = _cohort(conn, source)
        persons = sorted(index)
        frame = pd.DataFrame(index=persons)
        for col in [c for c in source.features if c in columns]:
            frame[col] = _feature(conn, source, col, source.features[col], index, persons)
    return frame.astype(object).where(frame.notna(), None), persons


def check_source(source: OmopSource) -> str:
    """Pre-flight: connect, find the cohort, and check every concept matches records.

    Returns
    -------
    str
        A one-line summary (cohort size).
    """
    with connect(source) as conn:
        index = _cohort(conn, source)
        for col, feat in source.features.items():
            if feat.table != "person":
                _check_concepts(conn, source, col, feat)
    return f"OMOP {safe_url(source)}: cohort of {len(index)} persons, concepts found"


# --- queries -----------------------------------------------------------------


def _table(source: OmopSource, name: str, *cols: str):
    return table(name, *(column(c) for c in cols), schema=source.cdm_schema)


def _run(conn: Connection, source: OmopSource, stmt, what: str) -> list:
    try:
        return list(conn.execute(stmt))
    except SQLAlchemyError as exc:
        conn.rollback()
        raise DataError(
            f"{safe_url(source)}: cannot read {what}: {_reason(exc, source)}. Is this an "
            f"OMOP CDM{' in schema ' + source.cdm_schema if source.cdm_schema else ''}?"
        ) from None


def _cohort(conn: Connection, source: OmopSource) -> dict[int, dt.date]:
    c = source.cohort
    concept_col, date_col = _EVENT[c.table]
    t = _table(source, c.table, "person_id", concept_col, date_col)
    agg = func.min if c.index == "first" else func.max
    stmt = (
        select(t.c.person_id, agg(t.c[date_col]))
        .where(t.c[concept_col].in_(c.concept_ids))
        .group_by(t.c.person_id)
    )
    rows = _run(conn, source, stmt, f"the cohort from {c.table}")
    if not rows:
        raise DataError(
            f"{safe_url(source)}: cohort concept id(s) {c.concept_ids} match no record in "
            f"{_qualified(source, c.table)}.{concept_col}; check cohort.concept_ids"
        )
    # The CDM's event start dates are NOT NULL, so every cohort member has an index date.
    return {int(pid): cast(dt.date, _as_date(day)) for pid, day in rows}


def _check_concepts(conn: Connection, source: OmopSource, col: str, feat: OmopFeature) -> None:
    concept_col, _ = _EVENT[feat.table]
    t = _table(source, feat.table, concept_col)
    stmt = (
        select(t.c[concept_col], func.count())
        .where(t.c[concept_col].in_(feat.concept_ids))
        .group_by(t.c[concept_col])
    )
    found = {int(cid) for cid, _ in _run(conn, source, stmt, f"{feat.table} for {col!r}")}
    absent = [cid for cid in feat.concept_ids if cid not in found]
    if len(absent) == len(feat.concept_ids):
        raise DataError(
            f"{safe_url(source)}: column {col!r}: concept id(s) {absent} match no record in "
            f"{_qualified(source, feat.table)}.{concept_col}. Check the concept ids in the "
            "site profile against your vocabulary."
        )


def _feature(
    conn: Connection,
    source: OmopSource,
    col: str,
    feat: OmopFeature,
    index: dict[int, dt.date],
    persons: list[int],
) -> list[Any]:
    if feat.table == "person":
        return _person(conn, source, col, feat, index, persons)
    _check_concepts(conn, source, col, feat)
    concept_col, date_col = _EVENT[feat.table]
    cols = ["person_id", concept_col, date_col]
    if feat.table in _VALUED:
        cols += ["value_as_number", "value_as_concept_id", "unit_concept_id"]
    t = _table(source, feat.table, *cols)
    stmt = select(*(t.c[c] for c in cols)).where(t.c[concept_col].in_(feat.concept_ids))
    found: dict[int, list[tuple[dt.date | None, Any]]] = defaultdict(list)
    for row in _run(conn, source, stmt, f"{feat.table} for {col!r}"):
        pid = int(row[0])
        if pid not in index:
            continue
        day = _as_date(row[2])
        if feat.window_days is not None and (
            day is None or not index[pid] - dt.timedelta(days=feat.window_days) <= day <= index[pid]
        ):
            continue
        found[pid].append((day, _value(source, col, feat, row, pid)))
    out: list[Any] = []
    for pid in persons:
        values = [(d, v) for d, v in found.get(pid, []) if v is not None]
        if feat.kind == "present":
            out.append(1.0 if found.get(pid) else 0.0)
        else:
            out.append(apply_rule(feat.rule, values) if values else None)
    return out


def _value(source: OmopSource, col: str, feat: OmopFeature, row: Any, pid: int) -> Any:
    if feat.kind == "present":
        return 1.0
    number, concept, unit = row[3], row[4], row[5]
    if feat.kind == "number":
        if number is None:
            return None
        if feat.unit_concept_id is not None and unit != feat.unit_concept_id:
            raise DataError(
                f"{safe_url(source)}: {_qualified(source, feat.table)}, person_id {pid}: column "
                f"{col!r} expects unit_concept_id {feat.unit_concept_id} but the record has "
                f"{unit} ({number}). Convert it in the CDM, or declare its unit."
            )
        return float(number)
    if concept is None:
        return None
    return _mapped(source, col, feat, concept, f"person_id {pid}")


def _mapped(source: OmopSource, col: str, feat: OmopFeature, concept: Any, who: str) -> Any:
    key = str(int(concept))
    table_ = feat.values or {}
    if key not in table_:
        raise DataError(
            f"{safe_url(source)}: {_qualified(source, feat.table)}, {who}: column {col!r}: "
            f"concept id {key} is not in the values table (known: {sorted(table_)}). "
            "Add it to values in the site profile."
        )
    return table_[key]


def _person(
    conn: Connection,
    source: OmopSource,
    col: str,
    feat: OmopFeature,
    index: dict[int, dt.date],
    persons: list[int],
) -> list[Any]:
    cols = ["person_id", "gender_concept_id", "year_of_birth", "month_of_birth", "day_of_birth"]
    t = _table(source, "person", *cols)
    rows = _run(conn, source, select(*(t.c[c] for c in cols)), "person")
    people = {int(r[0]): r for r in rows}
    out: list[Any] = []
    for pid in persons:
        r = people.get(pid)
        if r is None:
            out.append(None)
        elif feat.kind == "gender":
            out.append(
                None if r[1] in (None, 0) else _mapped(source, col, feat, r[1], f"person_id {pid}")
            )
        elif r[2] is None:
            out.append(None)
        else:
            born = (int(r[2]), int(r[3] or 1), int(r[4] or 1))
            day = index[pid]
            out.append(day.year - born[0] - ((day.month, day.day) < born[1:]))
    return out


# --- helpers -----------------------------------------------------------------


def _qualified(source: OmopSource, name: str) -> str:
    return f"{source.cdm_schema}.{name}" if source.cdm_schema else name


def _as_date(value: Any) -> dt.date | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


def _reason(exc: BaseException, source: OmopSource) -> str:
    """The driver's own first line, with any password scrubbed."""
    orig = getattr(exc, "orig", None) or exc
    text = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    try:
        password = read_password(source) if source.url else None
    except Exception:  # noqa: BLE001 - only to scrub; the real error is reported elsewhere
        password = None
    if password:
        text = text.replace(password, "***")
    return text


def _credential_hint(source: OmopSource) -> str:
    if source.password_env:
        return f"password from ${source.password_env}"
    if source.password_file:
        return f"password from {source.password_file}"
    return "no password configured"
