"""Read a FHIR R4 export (Bundles or resources, JSON or NDJSON) into the experiment's table.

Each resource is parsed and validated with ``fhir.resources`` (the R4B models,
which read R4 content). Each Patient becomes one row, ordered by ``Patient.id``;
each schema column comes from the resource its :class:`FhirFeature` names:

* Observation by code (e.g. LOINC) -> ``valueQuantity`` in the declared UCUM unit,
  a coded value or ``interpretation`` mapped through ``values``, or ``valueBoolean``;
  several in the window -> the ``rule`` (latest, first, mean, max, min);
* Condition by code (SNOMED, ICD-10) -> 1 if present, else 0 (or a category);
* Patient -> ``age`` (whole years at the index date) or ``gender``.

A value the patient does not have is missing, and the experiment's missing-value
policy applies, as for a CSV cell. The resulting table goes through the same
encoder as a CSV (:func:`fedhealth.data.tabular.encode_frame`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fedhealth.config.ehr_sources import FhirFeature, FhirSource
from fedhealth.data.ehr_rules import apply_rule
from fedhealth.data.tabular import TabularData, TabularSchema, encode_frame
from fedhealth.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = {".json", ".ndjson"}
# Records that do not count: cancelled, refuted or entered in error.
_VOID_STATUS = {"entered-in-error", "cancelled"}
_VOID_VERIFICATION = {"refuted", "entered-in-error"}


@dataclass
class FhirTable:
    """The table read from a FHIR export, and what was skipped."""

    data: TabularData
    patients: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Record:
    """One clinical resource reduced to what the features read."""

    file: str
    rid: str
    rtype: str
    codes: set[str]
    date: dt.date | None
    resource: Any


@dataclass
class _Export:
    patients: dict[str, Any] = field(default_factory=dict)
    records: dict[str, list[_Record]] = field(default_factory=lambda: defaultdict(list))
    invalid: list[tuple[str, str]] = field(default_factory=list)


def read_fhir(source: FhirSource, schema: TabularSchema) -> FhirTable:
    """Read the export at ``source.path`` into features and labels.

    Parameters
    ----------
    source : FhirSource
        The folder, the bad-files policy, the index event and the column mapping.
    schema : TabularSchema
        The experiment's schema (columns, categories, label, missing policy).

    Returns
    -------
    FhirTable
        The encoded table, the patient id of each row, and skipped resources.

    Raises
    ------
    DataError
        If the folder is missing or empty, resources are invalid (under
        ``bad_files = "fail"``, all listed), a quantity is in another unit, a code
        is not in a ``values`` table, or a schema column has no mapping.
    """
    needed = [*schema.numeric, *schema.categorical, schema.label]
    frame, ids, skipped = fhir_frame(source, needed)
    data = encode_frame(frame, schema, str(source.path), row_names=[f"Patient/{p}" for p in ids])
    return FhirTable(data=data, patients=ids, skipped=skipped)


def fhir_frame(
    source: FhirSource, columns: list[str]
) -> tuple[pd.DataFrame, list[str], list[tuple[str, str]]]:
    """The raw values of ``columns``, one row per patient of the cohort, before encoding.

    What training encodes (:func:`read_fhir`) and what an analysis reads
    (``fedhealth.analytics``) are the same values.

    Parameters
    ----------
    source : FhirSource
        The folder, the bad-files policy, the index event and the column mapping.
    columns : list of str
        Schema columns to read; each must be mapped in ``source.features``.

    Returns
    -------
    tuple
        The frame (``None`` where a patient has no value), the patient ids in row order,
        and the skipped (file/resource, reason) pairs.

    Raises
    ------
    DataError
        As :func:`read_fhir`.
    """
    folder = Path(source.path)
    unmapped = [c for c in columns if c not in source.features]
    if unmapped:
        raise DataError(
            f"{folder}: the FHIR source maps no resource to column(s) "
            f"{', '.join(map(repr, unmapped))}; add [features.<column>] tables to the "
            "site profile's dataset"
        )
    export = load_export(folder)
    if export.invalid and source.bad_files == "fail":
        listed = "\n  ".join(f"{f}: {why}" for f, why in export.invalid)
        raise DataError(
            f"{folder}: {len(export.invalid)} invalid FHIR file(s) or resource(s):\n  {listed}\n"
            "Fix them, or set bad_files = 'skip' in the site profile to leave them out."
        )
    for f, why in export.invalid:
        log.warning("skipped %s: %s", f, why)
    if not export.patients:
        raise DataError(f"{folder}: no valid Patient resources in the export")

    read = [c for c in source.features if c in columns]
    rows: list[dict[str, Any]] = []
    ids: list[str] = []
    for pid in sorted(export.patients):
        records = export.records.get(pid, [])
        index = _index_date(source, records)
        if source.index is not None and index is None:
            continue  # not in the cohort: no index event
        patient = export.patients[pid]
        rows.append(
            {
                col: _feature(col, source.features[col], patient, records, index, folder)
                for col in read
            }
        )
        ids.append(pid)
    if not rows:
        assert source.index is not None  # patients exist, so only the index event left them out
        raise DataError(
            f"{folder}: no patient has the index event {source.index.resource} "
            f"{source.index.codes}; check the [index] codes"
        )
    return pd.DataFrame(rows, columns=read), ids, list(export.invalid)


def load_export(folder: Path) -> _Export:
    """Parse and validate every resource under ``folder``; invalid ones are listed, not read."""
    from fhir.resources.R4B import get_fhir_model_class

    if not folder.is_dir():
        raise DataError(
            f"FHIR folder not found: {folder.resolve()}. Check path in the site profile."
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no .json or .ndjson files (FHIR Bundles or resources)")
    export = _Export()
    full_urls: dict[str, str] = {}
    pending: list[tuple[str, Any]] = []
    for path in files:
        name = str(path.relative_to(folder))
        try:
            documents = list(_documents(path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            export.invalid.append((name, f"not JSON: {exc}"))
            continue
        for where, doc in documents:
            for full_url, raw in _resources(doc, f"{name}{where}", export):
                rtype = raw.get("resourceType")
                rid = raw.get("id", "?")
                label = f"{name}{where}: {rtype}/{rid}"
                try:
                    model = get_fhir_model_class(str(rtype))
                    res: Any = model.model_validate(raw)  # of the class `rtype` names
                except ValueError as exc:  # pydantic's ValidationError is a ValueError
                    export.invalid.append((label, _first_error(exc)))
                    continue
                if rtype == "Patient":
                    if not res.id:
                        export.invalid.append((label, "Patient without an id"))
                        continue
                    export.patients[res.id] = res
                    if full_url:
                        full_urls[full_url] = res.id
                else:
                    pending.append((label, res))
    for label, res in pending:
        subject = getattr(res, "subject", None) or getattr(res, "patient", None)
        ref = getattr(subject, "reference", None) or ""
        pid = full_urls.get(ref) or (ref.split("/", 1)[1] if ref.startswith("Patient/") else None)
        if pid is None:
            continue  # not about a patient (e.g. a Practitioner): nothing to read
        export.records[pid].append(
            _Record(
                file=label.split(": ")[0],
                rid=f"{res.get_resource_type()}/{res.id}",
                rtype=res.get_resource_type(),
                codes=_codes(getattr(res, "code", None)),
                date=_date(res),
                resource=res,
            )
        )
    return export


# --- parsing -----------------------------------------------------------------


def _documents(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, JSON document): one per file, or one per line of NDJSON."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".ndjson":
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield f" line {i}", json.loads(line)
    else:
        yield "", json.loads(text)


def _resources(doc: Any, where: str, export: _Export) -> Iterator[tuple[str | None, dict]]:
    """(fullUrl, resource) of a Bundle's entries, or the document itself."""
    from fhir.resources.R4B.bundle import Bundle

    if not isinstance(doc, dict) or "resourceType" not in doc:
        export.invalid.append((where, "not a FHIR resource (no resourceType)"))
        return
    if doc["resourceType"] != "Bundle":
        yield None, doc
        return
    entries = doc.get("entry", [])
    if not isinstance(entries, list):
        export.invalid.append((f"{where}: Bundle/{doc.get('id', '?')}", "entry is not a list"))
        return
    envelope = {k: v for k, v in doc.items() if k != "entry"}
    envelope["entry"] = [
        {k: v for k, v in e.items() if k != "resource"} for e in entries if isinstance(e, dict)
    ]
    try:  # the Bundle itself; its resources are validated one by one
        Bundle.model_validate(envelope)
    except ValueError as exc:
        export.invalid.append((f"{where}: Bundle/{doc.get('id', '?')}", _first_error(exc)))
        return
    for i, entry in enumerate(entries):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or "resourceType" not in res:
            export.invalid.append((f"{where}: entry {i}", "no resource with a resourceType"))
            continue
        yield entry.get("fullUrl"), res


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            more = len(errors()) - 1
            tail = f" (and {more} more)" if more else ""
            return f"invalid: {loc}: {first.get('msg')}{tail}"
        except (IndexError, TypeError):
            pass
    return f"invalid: {str(exc).splitlines()[0]}"


def _codes(concept: Any) -> set[str]:
    out = set()
    for concepts in concept if isinstance(concept, list) else [concept]:
        for coding in getattr(concepts, "coding", None) or []:
            if coding.code is not None:
                out.add(f"{coding.system or ''}|{coding.code}")
    return out


def _as_date(value: Any) -> dt.date | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value)
    try:  # partial dates (year, year-month) count from their first day
        return dt.date.fromisoformat((text + "-01-01")[:10] if len(text) < 10 else text[:10])
    except ValueError:
        return None


def _date(res: Any) -> dt.date | None:
    for name in ("effectiveDateTime", "performedDateTime", "onsetDateTime", "recordedDate"):
        value = getattr(res, name, None)
        if value is not None:
            return _as_date(value)
    for name in ("effectivePeriod", "performedPeriod", "period", "onsetPeriod"):
        period = getattr(res, name, None)
        if period is not None and period.start is not None:
            return _as_date(period.start)
    return _as_date(getattr(res, "issued", None))


def _void(rec: _Record) -> bool:
    status = getattr(rec.resource, "status", None)
    if status in _VOID_STATUS:
        return True
    verification = _codes(getattr(rec.resource, "verificationStatus", None))
    return any(c.split("|")[-1] in _VOID_VERIFICATION for c in verification)


# --- features ----------------------------------------------------------------


def _index_date(source: FhirSource, records: list[_Record]) -> dt.date | None:
    if source.index is None:
        return None
    want = set(source.index.codes)
    dates = [
        r.date
        for r in records
        if r.rtype == source.index.resource
        and r.date is not None
        and not _void(r)
        and (not want or r.codes & want)
    ]
    if not dates:
        return None
    return min(dates) if source.index.rule == "first" else max(dates)


def _feature(
    col: str,
    feat: FhirFeature,
    patient: Any,
    records: list[_Record],
    index: dt.date | None,
    folder: Path,
) -> Any:
    kind = feat.kind
    if kind == "age":
        born = _as_date(patient.birthDate)
        if born is None or index is None:
            return None
        return index.year - born.year - ((index.month, index.day) < (born.month, born.day))
    if kind == "gender":
        return _mapped(feat, patient.gender, col, f"Patient/{patient.id}", folder)
    codes = set(feat.codes)
    hits = [
        r
        for r in records
        if r.rtype == feat.resource
        and r.codes & codes
        and not _void(r)
        and _in_window(feat, r, index)
    ]
    if kind == "present" and feat.values is None:
        return 1.0 if hits else 0.0
    values: list[tuple[dt.date | None, Any]] = []
    for r in hits:
        v = _value(col, feat, r, folder)
        if v is not None:
            values.append((r.date, v))
    if not values:
        return None
    return apply_rule(feat.rule, values)


def _in_window(feat: FhirFeature, rec: _Record, index: dt.date | None) -> bool:
    if feat.window_days is None or index is None:
        return True
    if rec.date is None:
        return False
    return index - dt.timedelta(days=feat.window_days) <= rec.date <= index


def _value(col: str, feat: FhirFeature, rec: _Record, folder: Path) -> Any:
    res = rec.resource
    where = f"{folder / rec.file}: {rec.rid}"
    kind = feat.kind
    if kind == "quantity":
        q = getattr(res, "valueQuantity", None)
        if q is None or q.value is None:
            return None
        unit = q.code or q.unit
        if feat.unit is not None and unit != feat.unit:
            raise DataError(
                f"{where}: column {col!r} expects {sorted(feat.codes)} in {feat.unit!r}, but "
                f"this Observation is in {unit!r} ({q.value} {unit}). Convert it at export, "
                "or map that unit in the site profile."
            )
        return float(q.value)
    if kind == "boolean":
        b = getattr(res, "valueBoolean", None)
        if b is None:
            return None
        return _mapped(feat, str(b).lower(), col, where, folder) if feat.values else float(b)
    if kind == "code":
        got = _codes(getattr(res, "valueCodeableConcept", None))
    elif kind == "interpretation":
        got = _codes(getattr(res, "interpretation", None))
    else:  # a Condition mapped to a category by its own code
        got = rec.codes & set(feat.codes)
    if not got:
        return None
    known = [c for c in sorted(got) if c in (feat.values or {})]
    if not known:
        raise DataError(
            f"{where}: column {col!r}: code(s) {sorted(got)} are not in the site profile's "
            f"values table (known: {sorted(feat.values or {})}). Add them to values."
        )
    assert feat.values is not None  # `known` is not empty
    return feat.values[known[0]]


def _mapped(feat: FhirFeature, raw: Any, col: str, where: str, folder: Path) -> Any:
    if raw is None:
        return None
    table = feat.values or {}
    if raw not in table:
        raise DataError(
            f"{folder}: {where}: column {col!r}: {raw!r} is not in the values table "
            f"(known: {sorted(table)}). Add it to values in the site profile."
        )
    return table[raw]
