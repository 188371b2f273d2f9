"""FHIR R4 and OMOP CDM sources: the same table as the CSV, and clear errors.

The OMOP tests in PostgreSQL use the server at 127.0.0.1:5432 (db ``test``), each in
its own schema, dropped at the end. They skip only when ``CI`` is unset and the
server is unreachable.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import tempfile
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from fedhealth.config.ehr_sources import OmopSource
from fedhealth.config.site import load_site
from fedhealth.data.ehr_rules import apply_rule
from fedhealth.data.fhir import read_fhir
from fedhealth.data.heart_sources import CENTRES, write_fhir_centre, write_omop_centre
from fedhealth.data.omop import read_omop
from fedhealth.data.tabular import read_table, tabular_schema
from fedhealth.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TASK = tomllib.loads((ROOT / "experiments" / "heart-disease.toml").read_text())["task"]


def source(profile: str, **update):
    ds = load_site(ROOT / "sites" / profile).datasets["heart-disease"]
    return ds.model_copy(update=update)


def csv_table(heart_dir: Path, centre: str):
    return read_table(
        heart_dir / f"processed.{centre}.data", tabular_schema(TASK, source("cleveland.toml"))
    )


def assert_same(ref, got) -> None:
    assert got.feature_names == ref.feature_names
    assert got.n_dropped == ref.n_dropped
    np.testing.assert_array_equal(got.X, ref.X)
    np.testing.assert_array_equal(got.y, ref.y)


def postgres() -> str:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        if os.environ.get("CI"):
            raise
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432 (and CI is unset)")
    return PG


@pytest.fixture
def pg_schema():
    url = postgres()
    name = f"fedhealth_test_{uuid.uuid4().hex[:12]}"
    yield url, name
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    engine.dispose()


@pytest.mark.parametrize("centre", CENTRES)
def test_fhir_and_omop_tables_equal_the_csv_row_for_row(heart_dir, tmp_path, centre):
    ref = csv_table(heart_dir, centre)
    fhir = source("hungarian-fhir.toml", path=write_fhir_centre(heart_dir, centre, tmp_path / "f"))
    got = read_fhir(fhir, tabular_schema(TASK, fhir))
    assert_same(ref, got.data)
    assert got.patients[0] == f"{centre}-0001" and not got.skipped
    db = tmp_path / "cdm.sqlite"
    write_omop_centre(heart_dir, centre, f"sqlite:///{db}")
    omop = source("switzerland-omop.toml", path=db)
    assert_same(ref, read_omop(omop, tabular_schema(TASK, omop)).data)


def test_omop_in_postgresql_equals_the_csv_and_is_read_only(heart_dir, pg_schema):
    url, schema = pg_schema
    write_omop_centre(heart_dir, "va", url, schema)
    omop = source("va-omop.toml", url=url, cdm_schema=schema)
    assert_same(csv_table(heart_dir, "va"), read_omop(omop, tabular_schema(TASK, omop)).data)
    from fedhealth.data.omop import connect

    with connect(omop) as conn, pytest.raises(sa.exc.InternalError, match="read-only"):
        conn.execute(sa.text(f'DELETE FROM "{schema}".person'))


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("mean", 4.0), ("max", 7.0), ("min", 1.0), ("latest", 7), ("first", 5)],
)
def test_a_features_values_reduce_by_its_rule_undated_before_dated(rule, expected):
    values = [(dt.date(2020, 3, 1), 7), (None, 5), (dt.date(2019, 1, 1), 1), (None, 3)]
    got = apply_rule(rule, values)
    assert got == expected and type(got) is type(expected)


def test_sqlite_source_is_opened_read_only(heart_dir, tmp_path):
    from fedhealth.data.omop import connect

    db = tmp_path / "cdm.sqlite"
    write_omop_centre(heart_dir, "switzerland", f"sqlite:///{db}")
    with (
        connect(source("switzerland-omop.toml", path=db)) as conn,
        pytest.raises(sa.exc.OperationalError, match="readonly"),
    ):
        conn.execute(sa.text("DELETE FROM person"))


# --- errors ------------------------------------------------------------------


@pytest.fixture
def bundles(heart_dir, tmp_path) -> Path:
    return write_fhir_centre(heart_dir, "cleveland", tmp_path / "fhir")


def test_invalid_resource_is_named_by_file_and_id_and_skipped_on_request(bundles):
    for name, field, bad in (
        ("cleveland-0002.json", 2, {"status": 7}),
        ("cleveland-0005.json", 3, {"valueQuantity": {"value": "high"}}),
    ):
        doc = json.loads((bundles / name).read_text())
        doc["entry"][field]["resource"].update(bad)
        (bundles / name).write_text(json.dumps(doc))
    fhir = source("hungarian-fhir.toml", path=bundles)
    with pytest.raises(DataError) as err:
        read_fhir(fhir, tabular_schema(TASK, fhir))
    msg = str(err.value)
    assert "2 invalid FHIR" in msg
    assert "cleveland-0002.json: Observation/cleveland-0002-cp" in msg
    assert "cleveland-0005.json: Observation/cleveland-0005-trestbps" in msg
    skip = fhir.model_copy(update={"bad_files": "skip"})
    got = read_fhir(skip, tabular_schema(TASK, skip))
    assert [f for f, _ in got.skipped] == [
        "cleveland-0002.json: Observation/cleveland-0002-cp",
        "cleveland-0005.json: Observation/cleveland-0005-trestbps",
    ]
    # Their values are missing now: those two patients' rows are dropped (missing = drop).
    assert got.data.n_dropped == 2 and len(got.patients) == 303


def test_observation_in_an_unexpected_unit_names_file_resource_and_units(bundles):
    doc = json.loads((bundles / "cleveland-0007.json").read_text())
    chol = next(e["resource"] for e in doc["entry"] if e["resource"]["id"].endswith("-chol"))
    chol["valueQuantity"].update(unit="mmol/L", code="mmol/L", value=7.2)
    (bundles / "cleveland-0007.json").write_text(json.dumps(doc))
    fhir = source("hungarian-fhir.toml", path=bundles)
    with pytest.raises(
        DataError,
        match=r"cleveland-0007\.json: Observation/cleveland-0007-chol.*"
        r"'mg/dL'.*'mmol/L'",
    ):
        read_fhir(fhir, tabular_schema(TASK, fhir))


def test_omop_concept_that_matches_nothing_is_named(heart_dir, tmp_path):
    db = tmp_path / "cdm.sqlite"
    write_omop_centre(heart_dir, "va", f"sqlite:///{db}")
    omop = source("switzerland-omop.toml", path=db)
    feats = dict(omop.features)
    feats["chol"] = feats["chol"].model_copy(update={"concept_ids": [123456789]})
    bad = omop.model_copy(update={"features": feats})
    with pytest.raises(
        DataError,
        match=r"column 'chol': concept id\(s\) \[123456789\] match no "
        r"record in measurement\.measurement_concept_id",
    ):
        read_omop(bad, tabular_schema(TASK, bad))


def test_unreachable_database_names_the_url_without_password(monkeypatch):
    monkeypatch.setenv("FEDHEALTH_TEST_DB_PW", "s3cret-Pw")
    omop = source(
        "va-omop.toml",
        url="postgresql+psycopg://reader@127.0.0.1:1/cdm",
        password_env="FEDHEALTH_TEST_DB_PW",
    )
    with pytest.raises(DataError) as err:
        read_omop(omop, tabular_schema(TASK, omop))
    assert "cannot connect to the OMOP database postgresql+psycopg://reader@127.0.0.1:1/cdm" in str(
        err.value
    )
    assert "s3cret-Pw" not in str(err.value)


def test_profile_never_holds_a_password_and_password_file_must_be_private(tmp_path):
    base = source("va-omop.toml").model_dump()
    with pytest.raises(ValueError, match="never put credentials in a profile"):
        OmopSource.model_validate({**base, "url": "postgresql+psycopg://u:pw@h/db"})
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    pw.chmod(0o644)
    from fedhealth.config.ehr_sources import read_password

    with pytest.raises(ConfigError, match="chmod 600"):
        read_password(OmopSource.model_validate({**base, "password_file": pw}))
    pw.chmod(0o600)
    assert read_password(OmopSource.model_validate({**base, "password_file": pw})) == "x"


@pytest.fixture
def scram_server():
    """A private PostgreSQL that checks passwords (the shared one trusts everyone)."""
    postgres()
    # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
    tmp_path = Path(tempfile.mkdtemp(prefix="fedhealth-pg-"))
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        if os.environ.get("CI"):
            raise RuntimeError("initdb/pg_ctl not found")
        pytest.skip("initdb/pg_ctl not installed")
    data = tmp_path / "pg"
    data.mkdir()
    (tmp_path / "pwfile").write_text("right-password\n")
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if run_as:
        shutil.chown(tmp_path, "postgres")
        shutil.chown(data, "postgres")
        shutil.chown(tmp_path / "pwfile", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [
            *run_as,
            initdb,
            "-D",
            str(data),
            "-U",
            "reader",
            "--auth=scram-sha-256",
            f"--pwfile={tmp_path / 'pwfile'}",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run_as,
            pg_ctl,
            "-D",
            str(data),
            "-w",
            "-l",
            str(tmp_path / "log"),
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    yield port
    subprocess.run(
        [*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
    )
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_wrong_password_names_the_url_and_never_the_password(scram_server, monkeypatch):
    monkeypatch.setenv("FEDHEALTH_TEST_DB_PW", "wrong-Secret-42")
    omop = source(
        "va-omop.toml",
        url=f"postgresql+psycopg://reader@127.0.0.1:{scram_server}/postgres",
        password_env="FEDHEALTH_TEST_DB_PW",
    )
    with pytest.raises(DataError) as err:
        read_omop(omop, tabular_schema(TASK, omop))
    msg = str(err.value)
    assert f"postgresql+psycopg://reader@127.0.0.1:{scram_server}/postgres" in msg
    assert "password authentication failed" in msg
    assert "wrong-Secret-42" not in msg


@pytest.mark.parametrize("centre", ["cleveland", "va"])
def test_an_analysis_reads_fhir_and_omop_sites_as_it_reads_the_csv(heart_dir, tmp_path, centre):
    """Analytics runs on every data source training reads: the same counts, histograms,
    quantiles and missingness from a centre's CSV, its FHIR Bundles and its OMOP tables."""
    from fedhealth.analytics.site_queries import answer_analysis, exact_statistics, read_columns
    from fedhealth.config.analysis import load_analysis_with_sites

    cfg, _ = load_analysis_with_sites(
        ROOT / "experiments" / "heart-disease-feasibility.analysis.toml"
    )
    spec = cfg.spec()
    csv_profile = load_site(ROOT / "sites" / "cleveland.toml")
    csv = csv_profile.datasets["heart-disease"].model_copy(
        update={"path": heart_dir / f"processed.{centre}.data"}
    )
    db = tmp_path / "cdm.sqlite"
    write_omop_centre(heart_dir, centre, f"sqlite:///{db}")
    sources = {
        "csv": csv,
        "fhir": source("hungarian-fhir.toml", path=write_fhir_centre(heart_dir, centre, tmp_path)),
        "omop": source("switzerland-omop.toml", path=db),
    }
    profiles = {
        kind: csv_profile.model_copy(
            update={
                "datasets": {"heart-disease": src},
                "site": csv_profile.site.model_copy(update={"workspace": tmp_path / kind}),
            }
        )
        for kind, src in sources.items()
    }
    stats = {k: exact_statistics(spec, read_columns(p, spec)) for k, p in profiles.items()}
    for kind in ("fhir", "omop"):
        assert len(stats[kind]) == len(stats["csv"])
        for got, ref in zip(stats[kind], stats["csv"], strict=True):
            np.testing.assert_array_equal(got.values, ref.values, err_msg=kind)
    # And the whole site side answers (policy, charge, noise) from an EHR source.
    release = answer_analysis(profiles["fhir"], spec, rng=np.random.default_rng(0))
    assert release["epsilon"] > 0 and release["queries"]
