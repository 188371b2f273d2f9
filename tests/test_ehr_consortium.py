"""A consortium mixing a CSV, a FHIR and two OMOP sites (one in PostgreSQL) trains like
the all-CSV one: same per-centre accuracy within 1 point at the same seed."""

from __future__ import annotations

import os
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


def test_mixed_consortium_trains_like_the_all_csv_one(heart_dir, tmp_path, root):
    url = postgres()
    schema = f"fedhealth_test_{uuid.uuid4().hex[:12]}"
    for folder in ("experiments", "sites", "strategies"):
        shutil.copytree(root / folder, tmp_path / folder)
    for profile in (tmp_path / "sites").glob("*.toml"):
        text = profile.read_text().replace("../../shared/data/uci-heart-disease", str(heart_dir))
        # The pooled statistics are noisy sums drawn afresh for each study (they differ between
        # the two runs by design), and sites evaluate with them: without them each site
        # evaluates on its own z-scores, so the accuracies compare the training alone.
        assert "share_statistics = true" in text or "heart-disease" not in text, profile
        text = text.replace("share_statistics = true", "share_statistics = false")
        profile.write_text(text.replace('"fedhealth_va_cdm"', f'"{schema}"'))
    for name in ("heart-disease.toml", "heart-disease-mixed.toml"):
        exp = tmp_path / "experiments" / name
        exp.write_text(exp.read_text().replace("rounds = 20", f"rounds = {ROUNDS}"))
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
    finally:
        os.chdir(old)
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()
    uri = f"sqlite:///{tmp_path / 'workspace' / 'mlflow' / 'mlflow.db'}"
    csv = _accuracies(uri, "heart-disease")
    mixed = _accuracies(uri, "heart-disease-mixed")
    assert set(csv) == set(mixed) == {"cleveland", "hungarian", "switzerland", "va"}
    for site in csv:
        assert abs(csv[site] - mixed[site]) <= 0.01, (site, csv[site], mixed[site])
