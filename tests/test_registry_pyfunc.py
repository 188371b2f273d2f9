"""A registered Heart-Disease model predicts on each centre's raw rows as the run reported.

Runs the repository's Heart-Disease experiment (fewer rounds) on the four UCI centres read
from ``../shared/data`` (skipped when absent), then loads ``models:/heart-disease/1`` as an
MLflow pyfunc and predicts on the rows of each centre's file exactly as ``pandas`` reads
them: no one-hot encoding, no z-scores, the missing-value tokens as NaN.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split
from typer.testing import CliRunner

from fedhealth.cli.main import app
from fedhealth.config.experiment import load_experiment_with_sites

pytestmark = pytest.mark.slow
CENTRES = ("cleveland", "hungarian", "switzerland", "va")


@pytest.fixture(scope="module")
def heart_run(tmp_path_factory, request):
    from tests.conftest import shared_data

    data = shared_data() / "uci-heart-disease"
    if not data.is_dir():
        pytest.skip(f"shared data not found at {data} (set FEDHEALTH_SHARED_DATA)")
    root = Path(request.config.rootpath)
    work = tmp_path_factory.mktemp("heart")
    for folder in ("experiments", "sites", "strategies"):
        shutil.copytree(root / folder, work / folder)
    for site in (work / "sites").glob("*.toml"):
        site.write_text(site.read_text().replace("../../shared/data", str(shared_data())))
    exp = work / "experiments" / "heart-disease.toml"
    exp.write_text(re.sub(r"(?m)^rounds = \d+", "rounds = 5", exp.read_text()))
    old = Path.cwd()
    os.chdir(work)
    try:
        result = CliRunner().invoke(app, ["run", str(exp)], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(old)
    uri = f"sqlite:///{work / 'workspace' / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return exp, uri


def test_pyfunc_on_raw_rows_reproduces_each_centres_reported_accuracy(heart_run) -> None:
    exp, uri = heart_run
    cfg, sites = load_experiment_with_sites(exp)
    task = cfg.task_spec().task.model_dump(mode="json", by_alias=True)
    model = mlflow.pyfunc.load_model("models:/heart-disease/1")
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version("heart-disease", "1")
    assert "pooled mean/std" in mv.description and "random_state=43" in mv.description
    for site in sites:
        source = site.datasets["heart-disease"]
        # The centre's file as pandas reads it: raw categories (cp 1.0-4.0), NaN for "?".
        frame = pd.read_csv(source.path, header=None, names=source.columns, na_values="?")
        probs = model.predict(frame)
        used = cfg.task.schema_.numeric + list(cfg.task.schema_.categorical)
        dropped = frame[used].isna().any(axis=1).to_numpy()
        # missing = "drop": such rows get no answer (NaN), never a made-up one.
        assert probs[dropped].isna().all().all() and not probs[~dropped].isna().any().any()
        kept = frame[~dropped]
        y = (kept["num"] > 0).astype(int)
        _, test = train_test_split(
            kept, test_size=task["test_fraction"], random_state=task["split_seed"],
            # As the model card says: stratified unless a class has fewer than 3 rows.
            shuffle=True, stratify=y if y.value_counts().min() >= 3 else None,
        )  # fmt: skip
        pred = model.predict(test).to_numpy().argmax(1)
        got = float((pred == (test["num"] > 0).astype(int).to_numpy()).mean())
        reported = client.get_metric_history(mv.run_id, f"site/{site.name}/accuracy")[-1].value
        assert abs(got - reported) <= 0.02, (site.name, got, reported)


def test_registered_model_holds_no_pickle(heart_run) -> None:
    """Weights as safetensors, the spec as JSON, the model class as code: loading the pyfunc
    unpickles nothing (MLflow refuses pickled pyfuncs unless told otherwise)."""
    path = Path(mlflow.artifacts.download_artifacts("models:/heart-disease/1"))
    files = {p.name for p in path.rglob("*") if p.is_file()}
    assert {"weights.safetensors", "preprocessing.json", "model_code.py"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pth", ".pt", ".pickle"))], files
    assert "model_code_path" in (path / "MLmodel").read_text()
    spec = (path / "artifacts" / "preprocessing.json").read_text()
    assert '"normalisation": "consortium"' in spec and '"statistics": {' in spec


def test_bad_raw_input_names_the_column(heart_run) -> None:
    model = mlflow.pyfunc.load_model("models:/heart-disease/1")
    row = {"age": 50, "sex": 1, "cp": 7, "trestbps": 130, "chol": 240, "fbs": 0,
           "restecg": 0, "thalach": 150, "exang": 0, "oldpeak": 1.0}  # fmt: skip
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"column 'cp'.*categories"):
        model.predict(pd.DataFrame([row]))
    row["cp"] = 4
    probs = model.predict(pd.DataFrame([row]))
    assert probs.shape == (1, 2) and np.isclose(probs.to_numpy().sum(), 1.0)
