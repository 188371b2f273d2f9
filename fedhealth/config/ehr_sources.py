"""Site-profile tables for EHR sources: a FHIR R4 export and an OMOP CDM database.

A site maps every column of the experiment's consortium-wide schema (``age``,
``chol``, the label, ...) to where that value lives in its own records: a
LOINC-coded Observation, a SNOMED-coded Condition, a Patient field, or an OMOP
concept id in one of the CDM tables. The readers (:mod:`fedhealth.data.fhir`,
:mod:`fedhealth.data.omop`) turn those declarations into exactly the table a
CSV site would give.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fedhealth.config.site import DataSourceBase
from fedhealth.errors import ConfigError

Rule = Literal["latest", "first", "mean", "max", "min"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    value = Path(value).expanduser()
    return (Path(base) / value).resolve() if base and not value.is_absolute() else value


class FhirIndex(_Strict):
    """The index event of each patient (its date is "now" for ages and windows)."""

    resource: Literal["Procedure", "Encounter", "Observation", "Condition"] = Field(
        description="Resource type of the index event."
    )
    codes: list[str] = Field(
        default_factory=list,
        description="Codes as 'system|code'; none = any resource of that type.",
    )
    rule: Literal["first", "latest"] = Field("first", description="Which event, if several.")


class FhirFeature(_Strict):
    """Where one column of the schema comes from in the FHIR export."""

    resource: Literal["Observation", "Condition", "Patient"] = Field(
        description="Observation (value), Condition (indicator or category) or Patient field."
    )
    codes: list[str] = Field(
        default_factory=list, description="Codes as 'system|code' (Observation, Condition)."
    )
    field: Literal["age", "gender"] | None = Field(
        None, description="Patient field: age (whole years at the index date) or gender."
    )
    value: Literal["quantity", "code", "boolean", "interpretation", "present"] | None = Field(
        None,
        description="What is read: valueQuantity, valueCodeableConcept, valueBoolean, "
        "Observation.interpretation, or presence (Condition; 1 present, 0 absent). "
        "Default: quantity for Observation, present for Condition.",
    )
    unit: str | None = Field(
        None, description="Expected UCUM unit of valueQuantity; another unit is an error."
    )
    rule: Rule = Field("latest", description="Several values in the window: which one.")
    window_days: int | None = Field(
        None, ge=0, description="Only values at most this many days before the index date."
    )
    values: dict[str, str | float] | None = Field(
        None,
        description="Code ('system|code'), gender or boolean -> the table's value; "
        "anything not listed is an error.",
    )

    @model_validator(mode="after")
    def _fits(self) -> FhirFeature:
        if self.resource == "Patient":
            if self.field is None:
                raise ValueError("a Patient feature needs field = 'age' or 'gender'")
        elif not self.codes:
            raise ValueError(f"a {self.resource} feature needs codes ('system|code')")
        bad = [c for c in self.codes if "|" not in c]
        if bad:
            raise ValueError(f"codes must be 'system|code' (e.g. 'http://loinc.org|2093-3'): {bad}")
        if self.rule == "mean" and self.kind not in ("quantity", "boolean"):
            raise ValueError("rule 'mean' needs numeric values (value = 'quantity')")
        if self.kind in ("code", "interpretation") and not self.values:
            raise ValueError(f"value = {self.kind!r} needs a values table (code -> value)")
        return self

    @property
    def kind(self) -> str:
        """What is read, with the default for the resource filled in."""
        if self.resource == "Patient":
            return str(self.field)
        return self.value or ("present" if self.resource == "Condition" else "quantity")


class FhirSource(DataSourceBase):
    """A folder of FHIR R4 resources: Bundles or single resources, as JSON or NDJSON."""

    kind: Literal["fhir"] = Field(description="A FHIR R4 export (folder of .json/.ndjson).")
    path: Path = Field(description="The folder (read recursively).")
    bad_files: Literal["fail", "skip"] = Field(
        "fail",
        description="Invalid files or resources: fail listing them all, or skip them "
        "(each reported by file and resource id).",
    )
    index: FhirIndex | None = Field(
        None, description="The index event; needed for age and window_days."
    )
    features: dict[str, FhirFeature] = Field(
        min_length=1, description="Schema column -> where its value comes from (label too)."
    )

    # Replaces the base's path validator by name (this module's _resolve also takes None).
    _abs = field_validator("path")(_resolve)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _index(self) -> FhirSource:
        needs = [
            c for c, f in self.features.items() if f.field == "age" or f.window_days is not None
        ]
        if needs and self.index is None:
            raise ValueError(f"column(s) {needs} need an index event: add an [index] table")
        return self


OMOP_TABLES = ("person", "measurement", "observation", "condition_occurrence", "drug_exposure")
COHORT_TABLES = (
    "condition_occurrence",
    "procedure_occurrence",
    "visit_occurrence",
    "measurement",
    "observation",
    "drug_exposure",
)


class OmopCohort(_Strict):
    """Who is in the table: persons with an event of these concepts; its date is the index."""

    table: Literal[
        "condition_occurrence",
        "procedure_occurrence",
        "visit_occurrence",
        "measurement",
        "observation",
        "drug_exposure",
    ] = Field(description="CDM table of the inclusion event.")
    concept_ids: list[int] = Field(min_length=1, description="Inclusion concept ids.")
    index: Literal["first", "latest"] = Field(
        "first", description="Index date: the person's first or latest inclusion event."
    )


class OmopFeature(_Strict):
    """Where one column of the schema comes from in the OMOP CDM."""

    table: Literal["person", "measurement", "observation", "condition_occurrence", "drug_exposure"]
    concept_ids: list[int] = Field(default_factory=list, description="Concept ids (not person).")
    field: Literal["age", "gender"] | None = Field(
        None, description="person: age (whole years at the index date) or gender."
    )
    value: Literal["number", "concept", "present"] | None = Field(
        None,
        description="value_as_number, value_as_concept_id (via values), or presence "
        "(1/0). Default: number for measurement/observation, present otherwise.",
    )
    unit_concept_id: int | None = Field(
        None, description="Expected unit_concept_id; another unit is an error."
    )
    rule: Rule = Field("latest", description="Several values in the window: which one.")
    window_days: int | None = Field(
        None, ge=0, description="Only records at most this many days before the index date."
    )
    values: dict[str, str | float] | None = Field(
        None, description="Concept id (as text) -> the table's value, for concepts and gender."
    )

    @model_validator(mode="after")
    def _fits(self) -> OmopFeature:
        if self.table == "person":
            if self.field is None:
                raise ValueError("a person feature needs field = 'age' or 'gender'")
        elif not self.concept_ids:
            raise ValueError(f"a {self.table} feature needs concept_ids")
        if self.kind in ("concept", "gender") and not self.values:
            raise ValueError(f"{self.kind} values need a values table (concept id -> value)")
        if self.rule == "mean" and self.kind != "number":
            raise ValueError("rule 'mean' needs numeric values (value = 'number')")
        return self

    @property
    def kind(self) -> str:
        """What is read, with the default for the table filled in."""
        if self.table == "person":
            return str(self.field)
        if self.value:
            return self.value
        return "number" if self.table in ("measurement", "observation") else "present"


class OmopSource(DataSourceBase):
    """An OMOP CDM database, read-only, by SQLAlchemy URL (or a SQLite file)."""

    kind: Literal["omop"] = Field(description="An OMOP CDM database.")
    url: str | None = Field(
        None,
        description="SQLAlchemy URL without a password, e.g. "
        "postgresql+psycopg://reader@db.hospital:5432/cdm.",
    )
    # An OMOP source may be a database URL instead of a file: its path is optional.
    path: Path | None = Field(None, description="Or a SQLite file (the embedded default).")  # type: ignore[assignment]
    cdm_schema: str | None = Field(None, description="Schema holding the CDM tables.")
    password_env: str | None = Field(
        None, description="Environment variable holding the database password."
    )
    password_file: Path | None = Field(
        None, description="File holding the database password (mode 0600 or stricter)."
    )
    cohort: OmopCohort
    features: dict[str, OmopFeature] = Field(
        min_length=1, description="Schema column -> where its value comes from (label too)."
    )

    _abs = field_validator("path", "password_file")(_resolve)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _where(self) -> OmopSource:
        if (self.url is None) == (self.path is None):
            raise ValueError("give exactly one of url (a database) or path (a SQLite file)")
        if self.url is not None:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                parsed = make_url(self.url)
            except ArgumentError as exc:
                raise ValueError(f"url is not a SQLAlchemy URL: {exc}") from None
            if parsed.password is not None:
                raise ValueError(
                    "url holds a password; never put credentials in a profile: use "
                    "password_env or password_file (mode 0600)"
                )
        if self.password_env and self.password_file:
            raise ValueError("give at most one of password_env and password_file")
        return self


def read_password(source: OmopSource) -> str | None:
    """The database password from the environment or a 0600 file, or None.

    Raises
    ------
    ConfigError
        If the variable is unset, or the file is missing or readable by others.
    """
    if source.password_env:
        value = os.environ.get(source.password_env)
        if value is None:
            raise ConfigError(
                f"OMOP source: environment variable {source.password_env} (password_env) "
                "is not set; export the database password there"
            )
        return value
    if source.password_file:
        f = source.password_file
        if not f.is_file():
            raise ConfigError(f"OMOP source: password_file {f} does not exist")
        mode = stat.S_IMODE(f.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"OMOP source: password_file {f} has mode {mode:04o}; it must be readable "
                f"by its owner only: chmod 600 {f}"
            )
        return f.read_text().rstrip("\r\n")
    return None
