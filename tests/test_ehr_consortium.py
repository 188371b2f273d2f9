"""A consortium mixing a CSV, a FHIR and two OMOP sites (one in PostgreSQL) trains, and it
sees the same patients as the all-CSV one: one registered model validated at both gives the
same metrics at every centre.

Two training runs are not compared with each other: every run draws its own initial model
and local-training seeds from its run id (docs/security.md), so two runs of the same
config differ by design. An evaluation-only study of one fixed model is deterministic under
the centres' ``release_metrics = "exact"`` policy, so equal tables and equal pinned test
splits give equal metrics.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import mlflow
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from fedhealth.cli.main import app
from tests.test_data_ehr import postgres

pytestmark = pytest.mark.slow
runner = CliRunner()
ROUNDS = 5


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def _accuracies(uri: str, experiment: str) -> dict[str, float]:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return {
        key.split("/")[1]: value
        for key, value in run.data.metrics.items()
        if key.startswith("site/") and key.endswith("/accuracy")
    }


def _validation_metrics(uri: str, run_id: str) -> dict[str, float]:
    return dict(mlflow.MlflowClient(uri).get_run(run_id).data.metrics)


def test_mixed_consortium_trains_and_validates_like_the_all_csv_one(heart_dir, tmp_path, root):
    url = postgres()
    schema = f"fedhealth_test_{uuid.uuid4().hex[:12]}"
    for folder in ("experiments", "sites", "strategies"):
        shutil.copytree(root / folder, tmp_path / folder)
    for profile in (tmp_path / "sites").glob("*.toml"):
        text = profile.read_text().replace("../../shared/data/uci-heart-disease", str(heart_dir))
        # Without the pooled statistics (noisy sums drawn afresh for each study) each site
        # standardises with its own z-scores: the same model then scores the same rows alike.
        assert "share_statistics = true" in text or "heart-disease" not in text, profile
        text = text.replace("share_statistics = true", "share_statistics = false")
        profile.write_text(text.replace('"fedhealth_va_cdm"', f'"{schema}"'))
    for name in ("heart-disease.toml", "heart-disease-mixed.toml"):
        exp = tmp_path / "experiments" / name
        text = re.sub(r"(?m)^rounds = \d+", f"rounds = {ROUNDS}", exp.read_text())
        # No statistics are shared here, so the consortium-normalised reference trains on
        # each centre's own z-scores (the model under test is evaluated, not benchmarked).
        text = text.replace('normalisation = "consortium"', 'normalisation = "site"')
        assert f"rounds = {ROUNDS}" in text and 'normalisation = "site"' in text, name
        exp.write_text(text)
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        out = _cli(
            "demo-data",
            "--heart-disease-sources",
            "--heart-data",
            str(heart_dir),
            "--omop-url",
            url,
            "--omop-schema",
            schema,
        )
        assert f"(schema {schema})" in out
        out = _cli("validate", "experiments/heart-disease-mixed.toml")
        assert "cohort of 200 persons" in " ".join(out.split())
        _cli("run", "experiments/heart-disease.toml")
        _cli("run", "experiments/heart-disease-mixed.toml")
        uri = f"sqlite:///{tmp_path / 'workspace' / 'mlflow' / 'mlflow.db'}"
        centres = ("cleveland", "hungarian", "switzerland", "va")
        csv_sites = ",".join(f"sites/{c}.toml" for c in centres)
        mixed_sites = ",".join(
            f"sites/{p}.toml"
            for p in ("cleveland", "hungarian-fhir", "switzerland-omop", "va-omop")
        )
        for sites in (csv_sites, mixed_sites):
            _cli(
                "evaluate", "models:/heart-disease/1", "--sites", sites,
                "--split", "test", "--tracking-uri", uri,
            )  # fmt: skip
    finally:
        os.chdir(old)
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()
    mixed = _accuracies(uri, "heart-disease-mixed")
    assert set(mixed) == set(centres), mixed
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    tags = client.get_model_version("heart-disease", "1").tags
    assert tags["validations"] == "2"
    on_csv = _validation_metrics(uri, tags["validation/1/run_id"])
    on_mixed = _validation_metrics(uri, tags["validation/2/run_id"])
    assert {k.split("/")[0] for k in on_mixed} == {*centres, "pooled"}
    assert on_mixed["va/n"] > 0 and on_mixed["hungarian/n"] > 0
    assert on_mixed == pytest.approx(on_csv, abs=1e-12)
