"""One entry point for the EHR sources (FHIR, OMOP): the table and what was skipped."""

from __future__ import annotations

from typing import Any

from fedhealth.catalogue import READERS
from fedhealth.config.ehr_sources import FhirSource, OmopSource
from fedhealth.data.tabular import TabularData, TabularSchema, tabular_schema


def read_ehr(
    source: FhirSource | OmopSource, schema: TabularSchema
) -> tuple[TabularData, list[tuple[str, str]]]:
    """Read a FHIR export or an OMOP database into the experiment's table.

    Returns
    -------
    tuple
        The encoded table and the skipped (file/resource, reason) pairs.
    """
    if isinstance(source, FhirSource):
        from fedhealth.data.fhir import read_fhir

        table = read_fhir(source, schema)
        return table.data, table.skipped
    from fedhealth.data.omop import read_omop

    return read_omop(source, schema).data, []


def read_ehr_frame(source: FhirSource | OmopSource, columns: list[str]) -> Any:
    """The raw values of ``columns`` from a FHIR export or an OMOP cohort, before encoding.

    Parameters
    ----------
    source : FhirSource or OmopSource
        The site's dataset.
    columns : list of str
        Columns to read; each must be mapped in the source's ``features``.

    Returns
    -------
    pandas.DataFrame
        One row per patient of the cohort; ``None`` where a value is missing.
    """
    if isinstance(source, FhirSource):
        from fedhealth.data.fhir import fhir_frame

        return fhir_frame(source, columns)[0]
    from fedhealth.data.omop import omop_frame

    return omop_frame(source, columns)[0]


def check_ehr(source: FhirSource | OmopSource) -> str:
    """Pre-flight of a source without an experiment: folder readable / database and concepts.

    Returns
    -------
    str
        A one-line summary.
    """
    if isinstance(source, FhirSource):
        from fedhealth.data.fhir import load_export

        export = load_export(source.path)
        bad = f", {len(export.invalid)} invalid resource(s)" if export.invalid else ""
        if export.invalid and source.bad_files == "fail":
            from fedhealth.errors import DataError

            listed = "; ".join(f"{f}: {why}" for f, why in export.invalid[:10])
            raise DataError(
                f"{source.path}: {len(export.invalid)} invalid FHIR file(s) or resource(s): "
                f"{listed}. Fix them, or set bad_files = 'skip'."
            )
        return f"FHIR {source.path}: {len(export.patients)} patients{bad}"
    from fedhealth.data.omop import check_source

    return check_source(source)


@READERS.register("fhir", traits={"tabular"}, options=FhirSource)
def read_fhir_source(source: FhirSource, task: dict[str, Any]) -> Any:
    """Read a FHIR R4 export into the experiment's table (``task["schema"]``)."""
    data, skipped = read_ehr(source, tabular_schema(task, source))
    return data.X, data.y, list(data.feature_names), skipped


@READERS.register("omop", traits={"tabular"}, options=OmopSource)
def read_omop_source(source: OmopSource, task: dict[str, Any]) -> Any:
    """Read an OMOP CDM cohort into the experiment's table (``task["schema"]``)."""
    data, skipped = read_ehr(source, tabular_schema(task, source))
    return data.X, data.y, list(data.feature_names), skipped
