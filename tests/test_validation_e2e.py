"""End to end: train on three Heart-Disease centres, validate at the fourth and at all four.

A real Flower simulation (Ray) for the training run and for each evaluation-only study, a
real MLflow SQLite store; ~1-2 min.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from fedhealth.cli.main import app

pytestmark = pytest.mark.slow


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def test_train_on_three_centres_validate_at_the_fourth(tmp_path, request):
    from tests.conftest import shared_data

    data = shared_data() / "uci-heart-disease"
    if not data.is_dir():
        pytest.skip(f"shared data not found at {data} (set FEDHEALTH_SHARED_DATA)")
    root = Path(request.config.rootpath)
    for folder in ("experiments", "sites", "strategies"):
        shutil.copytree(root / folder, tmp_path / folder)
    for site in (tmp_path / "sites").glob("*.toml"):
        site.write_text(site.read_text().replace("../../shared/data", str(shared_data())))
    exp = tmp_path / "experiments" / "heart-disease.toml"
    text = re.sub(r"(?m)^rounds = \d+", "rounds = 3", exp.read_text())
    text = text.replace(',\n         "../sites/va.toml"]', "]")
    assert "va.toml" not in text
    exp.write_text(text)
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        out = _cli("run", str(exp))
        assert "Run report:" in out and "report.html" in out
        uri = f"sqlite:///{tmp_path / 'workspace' / 'mlflow' / 'mlflow.db'}"
        first = _cli(
            "evaluate", "models:/heart-disease/1", "--sites", "sites/va.toml",
            "--split", "all", "--tracking-uri", uri,
        )  # fmt: skip
        assert "pooled" in first and "va" in first
        sites = ",".join(f"sites/{c}.toml" for c in ("cleveland", "hungarian", "switzerland"))
        _cli("evaluate", "models:/heart-disease/1", "--sites", sites, "--tracking-uri", uri)
        shown = _cli("models", "show", "heart-disease", "1", "--tracking-uri", uri)
    finally:
        os.chdir(old)
    assert "Validation 1: va" in shown and "Validation 2: cleveland, hungarian" in shown
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version("heart-disease", "1")
    assert mv.tags["validations"] == "2" and mv.tags["validation/1/sites"] == "va"
    page = Path(
        mlflow.artifacts.download_artifacts(
            run_id=mv.run_id,
            artifact_path="report.html",
            tracking_uri=uri,
            dst_path=str(tmp_path / "dl"),
        )
    ).read_text()
    assert page.count("data:image/png;base64,") >= 2 and "<script" not in page
