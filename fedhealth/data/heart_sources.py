"""The UCI Heart-Disease centres written as a FHIR R4 export and as an OMOP CDM.

The same patients, the same values: a FHIR or OMOP site built from a centre's
file reads back exactly the table the CSV reader gives (``missing = "drop"``
rows, categories, label). The concept mapping is documented in
``docs/data-sources.md``; the site profiles ``sites/hungarian-fhir.toml``,
``sites/switzerland-omop.toml`` and ``sites/va-omop.toml`` declare it.

Each row becomes one patient (``<centre>-0001`` ... in file order) with a
coronary angiography on an index date; every measurement is dated that day,
and the patient's birth date makes the age on that day the file's age. A ``?``
in the file is simply not recorded. Serum cholesterol 0 (the files' hidden
missing value) is written as recorded, so every kind of site sees the same data.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pandas as pd

from fedhealth.errors import ConfigError

COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
           "oldpeak", "slope", "ca", "thal", "num"]  # fmt: skip
CENTRES = ("cleveland", "hungarian", "switzerland", "va")
FIRST_INDEX_DATE = dt.date(1987, 1, 5)

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
# No standard code names these two exercise-test findings: a local code system.
LOCAL = "https://fedhealth.example/fhir/CodeSystem/uci-heart-disease"

# --- FHIR codes ---------------------------------------------------------------
ANGIOGRAPHY = (SNOMED, "33367005", "Coronary angiography")
CHEST_PAIN = (SNOMED, "29857009", "Chest pain")
# Chest pain type, DICOM CID 3202 "Chest Pain" (SNOMED CT).
CP_CODES = {
    "1": (SNOMED, "429559004", "Typical angina"),
    "2": (SNOMED, "371807002", "Atypical angina"),
    "3": (SNOMED, "274668005", "Non-cardiac chest pain"),
    "4": (SNOMED, "161971004", "Chest pain not present"),
}
SYSTOLIC = (LOINC, "8480-6", "Systolic blood pressure")
CHOLESTEROL = (LOINC, "2093-3", "Cholesterol [Mass/volume] in Serum or Plasma")
FASTING_GLUCOSE = (LOINC, "1558-6", "Fasting glucose [Mass/volume] in Serum or Plasma")
FBS_CODES = {"1": (INTERPRETATION, "H", "High"), "0": (INTERPRETATION, "N", "Normal")}
ECG = (LOINC, "8601-7", "EKG impression")
RESTECG_CODES = {
    "0": (SNOMED, "164854000", "Electrocardiogram normal"),
    "1": (SNOMED, "428750005", "Nonspecific ST-T abnormality on electrocardiogram"),
    "2": (SNOMED, "164873001", "Electrocardiogram: left ventricular hypertrophy"),
}
HEART_RATE = (LOINC, "8867-4", "Heart rate")
EXANG = (LOCAL, "exang", "Exercise-induced angina")
YES_NO = {"1": (SNOMED, "373066001", "Yes"), "0": (SNOMED, "373067005", "No")}
ST_DEPRESSION = (LOCAL, "oldpeak", "ST depression induced by exercise relative to rest")
CORONARY_DISEASE = (SNOMED, "53741008", "Coronary arteriosclerosis")

# --- OMOP concept ids ---------------------------------------------------------
# Standard OMOP (Athena) concepts where they exist; 2 000 000 000+ are local
# concepts (the range OMOP leaves to sites), written to the concept table with
# the source code they stand for.
OMOP_MALE, OMOP_FEMALE = 8507, 8532
OMOP_EHR = 32817  # type concept "EHR"
OMOP = {
    "systolic": 3004249,
    "cholesterol": 3027114,
    "fasting_glucose": 3037110,
    "heart_rate": 3027018,
    "high": 4328749,
    "normal": 4069590,
    "yes": 4188539,
    "no": 4188540,
    "mm_hg": 8876,
    "mg_dl": 8840,
    "per_min": 8541,
    "mm": 8588,
}
LOCAL_CONCEPTS = {  # concept id -> (vocabulary, code, name, domain)
    2000000001: ("SNOMED", "33367005", "Coronary angiography", "Procedure"),
    2000000002: ("SNOMED", "29857009", "Chest pain", "Observation"),
    2000000003: ("LOINC", "8601-7", "EKG impression", "Observation"),
    2000000004: ("fedhealth", "exang", "Exercise-induced angina", "Observation"),
    2000000005: ("fedhealth", "oldpeak", "ST depression induced by exercise", "Measurement"),
    2000000006: ("SNOMED", "53741008", "Coronary arteriosclerosis", "Condition"),
    2000000011: ("SNOMED", "429559004", "Typical angina", "Observation"),
    2000000012: ("SNOMED", "371807002", "Atypical angina", "Observation"),
    2000000013: ("SNOMED", "274668005", "Non-cardiac chest pain", "Observation"),
    2000000014: ("SNOMED", "161971004", "Chest pain not present", "Observation"),
    2000000020: ("SNOMED", "164854000", "Electrocardiogram normal", "Observation"),
    2000000021: ("SNOMED", "428750005", "Nonspecific ST-T abnormality on ECG", "Observation"),
    2000000022: ("SNOMED", "164873001", "ECG: left ventricular hypertrophy", "Observation"),
}
OMOP_CP = {"1": 2000000011, "2": 2000000012, "3": 2000000013, "4": 2000000014}
OMOP_RESTECG = {"0": 2000000020, "1": 2000000021, "2": 2000000022}


def read_centre(data_dir: Path, centre: str) -> pd.DataFrame:
    """One centre's processed UCI file as text cells (``None`` where ``?``)."""
    if centre not in CENTRES:
        raise ConfigError(f"unknown Heart-Disease centre {centre!r}; use one of {CENTRES}")
    path = Path(data_dir) / f"processed.{centre}.data"
    if not path.is_file():
        raise ConfigError(
            f"Heart-Disease file not found: {path}. Point --heart-data at the folder with "
            "the UCI processed.<centre>.data files."
        )
    frame = pd.read_csv(path, header=None, names=COLUMNS, dtype=str, keep_default_na=False)
    frame = frame.apply(lambda s: s.str.strip()).astype(object)
    return frame.where(frame != "?", None)


def _number(text: str) -> int | float:
    x = float(text)
    return int(x) if x == int(x) else x


def _code(value: str) -> str:
    return str(_number(value))


def _index_date(i: int) -> dt.date:
    return FIRST_INDEX_DATE + dt.timedelta(days=i)


def _birth(index: dt.date, age: int) -> dt.date:
    day = 28 if (index.month, index.day) == (2, 29) else index.day
    return dt.date(index.year - age, index.month, day)


# --- FHIR ---------------------------------------------------------------------


def write_fhir_centre(data_dir: Path, centre: str, out_dir: Path) -> Path:
    """Write one transaction-free collection Bundle per patient of ``centre``.

    Returns
    -------
    Path
        The folder of ``<patient>.json`` Bundles.
    """
    frame = read_centre(data_dir, centre)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{centre}-*.json"):
        old.unlink()
    for i, row in enumerate(frame.itertuples(index=False), start=1):
        pid = f"{centre}-{i:04d}"
        bundle = _patient_bundle(pid, row._asdict(), _index_date(i))
        (out_dir / f"{pid}.json").write_text(json.dumps(bundle, indent=1) + "\n")
    return out_dir


def _coding(code: tuple[str, str, str]) -> dict[str, Any]:
    return {"coding": [{"system": code[0], "code": code[1], "display": code[2]}]}


def _patient_bundle(pid: str, row: dict[str, str | None], day: dt.date) -> dict[str, Any]:
    ref = {"reference": f"Patient/{pid}"}
    when = day.isoformat()
    patient: dict[str, Any] = {"resourceType": "Patient", "id": pid}
    if row["sex"] is not None:
        patient["gender"] = "male" if _code(row["sex"]) == "1" else "female"
    if row["age"] is not None:
        patient["birthDate"] = _birth(day, int(_number(row["age"]))).isoformat()
    resources: list[dict[str, Any]] = [
        patient,
        {
            "resourceType": "Procedure",
            "id": f"{pid}-angiography",
            "status": "completed",
            "code": _coding(ANGIOGRAPHY),
            "subject": ref,
            "performedDateTime": when,
        },
    ]

    def observation(name: str, code: tuple, **value: Any) -> None:
        resources.append(
            {
                "resourceType": "Observation",
                "id": f"{pid}-{name}",
                "status": "final",
                "code": _coding(code),
                "subject": ref,
                "effectiveDateTime": when,
                **value,
            }
        )

    def quantity(text: str, unit: str) -> dict[str, Any]:
        return {"value": _number(text), "unit": unit, "system": UCUM, "code": unit}

    if row["cp"] is not None:
        observation("cp", CHEST_PAIN, valueCodeableConcept=_coding(CP_CODES[_code(row["cp"])]))
    if row["trestbps"] is not None:
        observation("trestbps", SYSTOLIC, valueQuantity=quantity(row["trestbps"], "mm[Hg]"))
    if row["chol"] is not None:
        observation("chol", CHOLESTEROL, valueQuantity=quantity(row["chol"], "mg/dL"))
    if row["fbs"] is not None:
        observation(
            "fbs",
            FASTING_GLUCOSE,
            interpretation=[_coding(FBS_CODES[_code(row["fbs"])])],
            referenceRange=[{"high": quantity("120", "mg/dL")}],
        )
    if row["restecg"] is not None:
        code = RESTECG_CODES[_code(row["restecg"])]
        observation("restecg", ECG, valueCodeableConcept=_coding(code))
    if row["thalach"] is not None:
        observation("thalach", HEART_RATE, valueQuantity=quantity(row["thalach"], "/min"))
    if row["exang"] is not None:
        observation("exang", EXANG, valueCodeableConcept=_coding(YES_NO[_code(row["exang"])]))
    if row["oldpeak"] is not None:
        observation("oldpeak", ST_DEPRESSION, valueQuantity=quantity(row["oldpeak"], "mm"))
    if row["num"] is not None and float(row["num"]) > 0:
        resources.append(
            {
                "resourceType": "Condition",
                "id": f"{pid}-cad",
                "clinicalStatus": _coding(
                    ("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active")
                ),
                "verificationStatus": _coding(
                    (
                        "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "confirmed",
                        "Confirmed",
                    )
                ),
                "code": _coding(CORONARY_DISEASE),
                "subject": ref,
                "onsetDateTime": when,
            }
        )
    return {
        "resourceType": "Bundle",
        "id": pid,
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:fedhealth:{r['resourceType']}/{r['id']}", "resource": r}
            for r in resources
        ],
    }


# --- OMOP ---------------------------------------------------------------------


def omop_metadata(schema: str | None):
    """The CDM v5.4 tables (the columns fedhealth reads and their required ones)."""
    from sqlalchemy import BigInteger, Column, Date, Integer, MetaData, Numeric, String, Table

    md = MetaData(schema=schema)

    def event(name: str, short: str, date_col: str, extra: list) -> None:
        Table(
            name,
            md,
            Column(f"{name}_id", BigInteger, primary_key=True),
            Column("person_id", BigInteger, nullable=False, index=True),
            Column(f"{short}_concept_id", Integer, nullable=False, index=True),
            Column(date_col, Date, nullable=False),
            Column(f"{short}_type_concept_id", Integer, nullable=False),
            *extra,
        )

    Table(
        "person",
        md,
        Column("person_id", BigInteger, primary_key=True),
        Column("gender_concept_id", Integer, nullable=False),
        Column("year_of_birth", Integer, nullable=False),
        Column("month_of_birth", Integer),
        Column("day_of_birth", Integer),
        Column("race_concept_id", Integer, nullable=False),
        Column("ethnicity_concept_id", Integer, nullable=False),
        Column("person_source_value", String(50)),
    )

    def valued() -> list:
        return [
            Column("value_as_number", Numeric),
            Column("value_as_concept_id", Integer),
            Column("unit_concept_id", Integer),
        ]

    event(
        "measurement", "measurement", "measurement_date", [*valued(), Column("range_high", Numeric)]
    )
    event("observation", "observation", "observation_date", valued())
    event("condition_occurrence", "condition", "condition_start_date", [])
    event("drug_exposure", "drug", "drug_exposure_start_date", [])
    event("procedure_occurrence", "procedure", "procedure_date", [])
    Table(
        "concept",
        md,
        Column("concept_id", Integer, primary_key=True),
        Column("concept_name", String(255), nullable=False),
        Column("domain_id", String(20), nullable=False),
        Column("vocabulary_id", String(20), nullable=False),
        Column("concept_code", String(50), nullable=False),
    )
    return md


def write_omop_centre(data_dir: Path, centre: str, url: str, schema: str | None = None) -> int:
    """Write one centre into a fresh OMOP CDM at ``url`` (tables replaced).

    Parameters
    ----------
    data_dir : Path
        The UCI folder.
    centre : str
        One of :data:`CENTRES`.
    url : str
        SQLAlchemy URL (``sqlite:///file`` or ``postgresql+psycopg://...``).
    schema : str, optional
        Schema to write into (created on PostgreSQL if missing).

    Returns
    -------
    int
        Number of persons written.
    """
    from sqlalchemy import create_engine, insert
    from sqlalchemy.schema import CreateSchema

    frame = read_centre(data_dir, centre)
    rows = _omop_rows(frame)
    md = omop_metadata(schema)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if schema is not None and engine.dialect.name != "sqlite":
                conn.execute(CreateSchema(schema, if_not_exists=True))
            md.drop_all(conn)
            md.create_all(conn)
            for name, records in rows.items():
                if records:
                    conn.execute(insert(_t(md, schema, name)), records)
    finally:
        engine.dispose()
    return len(frame)


def _t(md, schema: str | None, name: str):
    return md.tables[f"{schema}.{name}" if schema else name]


def _omop_rows(frame: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("person", "measurement", "observation", "condition_occurrence",
                        "procedure_occurrence", "concept")
    }  # fmt: skip
    for cid, (vocab, code, name, domain) in LOCAL_CONCEPTS.items():
        out["concept"].append(
            {"concept_id": cid, "concept_name": name, "domain_id": domain,
             "vocabulary_id": vocab, "concept_code": code}
        )  # fmt: skip
    ids = {"measurement": 0, "observation": 0}

    def valued(table: str, person: int, day: dt.date, concept: int, **value: Any) -> None:
        ids[table] += 1
        out[table].append(
            {
                f"{table}_id": ids[table],
                "person_id": person,
                f"{table}_concept_id": concept,
                f"{table}_date": day,
                f"{table}_type_concept_id": OMOP_EHR,
                "value_as_number": None,
                "value_as_concept_id": None,
                "unit_concept_id": None,
                **({"range_high": None} if table == "measurement" else {}),
                **value,
            }
        )

    for i, row in enumerate(frame.to_dict("records"), start=1):
        day = _index_date(i)
        born = _birth(day, int(_number(row["age"])))
        out["person"].append(
            {
                "person_id": i,
                "gender_concept_id": OMOP_MALE if _code(row["sex"]) == "1" else OMOP_FEMALE,
                "year_of_birth": born.year,
                "month_of_birth": born.month,
                "day_of_birth": born.day,
                "race_concept_id": 0,
                "ethnicity_concept_id": 0,
                "person_source_value": f"row {i}",
            }
        )
        out["procedure_occurrence"].append(
            {
                "procedure_occurrence_id": i,
                "person_id": i,
                "procedure_concept_id": 2000000001,
                "procedure_date": day,
                "procedure_type_concept_id": OMOP_EHR,
            }
        )
        if row["cp"] is not None:
            valued("observation", i, day, 2000000002, value_as_concept_id=OMOP_CP[_code(row["cp"])])
        for col, concept, unit in (
            ("trestbps", OMOP["systolic"], OMOP["mm_hg"]),
            ("chol", OMOP["cholesterol"], OMOP["mg_dl"]),
            ("thalach", OMOP["heart_rate"], OMOP["per_min"]),
            ("oldpeak", 2000000005, OMOP["mm"]),
        ):
            if row[col] is not None:
                valued("measurement", i, day, concept, value_as_number=_number(row[col]),
                       unit_concept_id=unit)  # fmt: skip
        if row["fbs"] is not None:
            high = _code(row["fbs"]) == "1"
            valued("measurement", i, day, OMOP["fasting_glucose"],
                   value_as_concept_id=OMOP["high" if high else "normal"],
                   unit_concept_id=OMOP["mg_dl"], range_high=120)  # fmt: skip
        if row["restecg"] is not None:
            valued("observation", i, day, 2000000003,
                   value_as_concept_id=OMOP_RESTECG[_code(row["restecg"])])  # fmt: skip
        if row["exang"] is not None:
            yes = _code(row["exang"]) == "1"
            valued("observation", i, day, 2000000004,
                   value_as_concept_id=OMOP["yes" if yes else "no"])  # fmt: skip
        if row["num"] is not None and float(row["num"]) > 0:
            out["condition_occurrence"].append(
                {
                    "condition_occurrence_id": i,
                    "person_id": i,
                    "condition_concept_id": 2000000006,
                    "condition_start_date": day,
                    "condition_type_concept_id": OMOP_EHR,
                }
            )
    return out


def write_heart_disease_sources(
    root: Path, data_dir: Path, omop_url: str | None = None, omop_schema: str | None = None
) -> dict[str, str]:
    """Write the demo EHR sources of ``experiments/heart-disease-mixed.toml``.

    Hungary as FHIR Bundles (``root/heart-disease/hungarian-fhir/``), Switzerland as
    an OMOP CDM in SQLite (``root/heart-disease/switzerland-omop.sqlite``) and VA as
    an OMOP CDM at ``omop_url`` (schema ``omop_schema``), or in SQLite beside it.

    Returns
    -------
    dict of str to str
        Centre -> where it was written (database URLs without a password).
    """
    from sqlalchemy.engine import make_url

    out = Path(root) / "heart-disease"
    out.mkdir(parents=True, exist_ok=True)
    written = {"hungarian": str(write_fhir_centre(data_dir, "hungarian", out / "hungarian-fhir"))}
    swiss = out / "switzerland-omop.sqlite"
    write_omop_centre(data_dir, "switzerland", f"sqlite:///{swiss}")
    written["switzerland"] = str(swiss)
    if omop_url is None:
        va = out / "va-omop.sqlite"
        write_omop_centre(data_dir, "va", f"sqlite:///{va}")
        written["va"] = str(va)
    else:
        write_omop_centre(data_dir, "va", omop_url, omop_schema)
        shown = make_url(omop_url).render_as_string(hide_password=True)
        written["va"] = f"{shown} (schema {omop_schema})" if omop_schema else shown
    return written
