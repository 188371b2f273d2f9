"""End to end: a simulated consortium trains, registers a model that loads and predicts.

These run real Flower simulations (Ray) and a real MLflow SQLite store, ~15-25 s each.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedhealth.cli.main import app
from fedhealth.config.experiment import load_experiment_with_sites
from fedhealth.models import build_model
from fedhealth.site.dataset import load_site_data

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory, request) -> Path:
    """A copy of the reference configs with the quickstart demo data written beside them."""
    root = Path(request.config.rootpath)
    work = tmp_path_factory.mktemp("consortium")
    for folder in ("experiments", "sites", "strategies"):
        shutil.copytree(root / folder, work / folder)
    old = Path.cwd()
    os.chdir(work)
    result = runner.invoke(app, ["demo-data"])
    assert result.exit_code == 0, result.output
    yield work
    os.chdir(old)


def edit(path: Path, **replace: str) -> Path:
    text = path.read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    out = path.with_name(f"test-{path.name}")
    out.write_text(text)
    return out


def run_cli(*args: str) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy()
    return float((pred == y).mean())


def test_tabular_federation_registers_a_model_that_loads_and_predicts(project):
    exp = edit(project / "experiments" / "quickstart.toml", **{"rounds = 5": "rounds = 2"})
    out = run_cli("run", str(exp))
    uri = f"sqlite:///{project / 'workspace' / 'mlflow' / 'mlflow.db'}"
    assert "Registered model: quickstart-breast-cancer version 1" in " ".join(out.split())
    assert str(project / "workspace" / "mlflow") in out.replace("\n", "")

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model("models:/quickstart-breast-cancer/1")
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version("quickstart-breast-cancer", "1")
    assert set(mv.tags["sites"].split(",")) == {"st-olav", "karolinska", "charite"}
    assert mv.tags["rounds"] == "2" and mv.tags["strategy"] == "fedavg"
    assert re.fullmatch(r"[0-9a-f]{16}", mv.tags["config_hash"])
    assert "Input layout" in mv.description
    run = client.get_run(mv.run_id)
    assert run.data.params["training.batch_size"] == "16"

    cfg, sites = load_experiment_with_sites(exp)
    task = cfg.task_spec().task
    initial = build_model(cfg.task_spec().model, 30, 2, cfg.experiment.seed)
    for site in sites:
        data = load_site_data(site, task)
        reported = client.get_metric_history(mv.run_id, f"site/{site.name}/accuracy")[-1].value
        # The sites release their accuracy with DP noise (release_metrics = "dp"), of this std.
        noise = client.get_metric_history(mv.run_id, f"site/{site.name}/accuracy-noise-std")
        assert noise and noise[-1].value > 0
        # The registered model takes raw features: consortium statistics are built in.
        got = accuracy(model, data.x_test, data.y_test)
        assert abs(got - reported) <= 0.02 + 4 * noise[-1].value, (site.name, got, reported)
    # The federation improved on the initial model (weighted over the sites' test splits).
    xs = [load_site_data(s, task) for s in sites]
    x = np.concatenate([d.x_test for d in xs])
    y = np.concatenate([d.y_test for d in xs])
    stats = model[0]
    before = accuracy(torch.nn.Sequential(stats, initial), x, y)
    assert accuracy(model, x, y) > max(before, 0.85)


def test_models_cli_lists_and_shows_provenance(project):
    out = " ".join(run_cli("models", "list").split())
    assert "quickstart-breast-cancer" in out
    out = " ".join(run_cli("models", "show", "quickstart-breast-cancer", "1").split())
    for word in ("config_hash", "sites", "fedhealth_version", "models:/quickstart-breast-cancer/1"):
        assert word in out
    result = runner.invoke(app, ["models", "show", "quickstart-breast-cancer", "99"])
    assert result.exit_code != 0 and "has no version 99" in result.output


def test_imaging_federation_with_custom_strategy_on_dicom(project):
    exp = edit(
        project / "experiments" / "quickstart-imaging.toml",
        **{
            "rounds = 6": "rounds = 2",
            'name = "fedavg"': 'name = "strategies/balanced_fedavg.py:BalancedFedAvg"\n'
            "options = { alpha = 0.5 }",
        },
    )
    out = " ".join(run_cli("run", str(exp)).split())
    assert "Registered model: quickstart-phantoms version 1" in out
    uri = f"sqlite:///{project / 'workspace' / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model("models:/quickstart-phantoms/1")
    assert model(torch.zeros(3, 1, 32, 32)).shape == (3, 2)
    mv = mlflow.MlflowClient(uri, registry_uri=uri).get_model_version("quickstart-phantoms", "1")
    assert mv.tags["strategy"] == "balanced_fedavg.py:BalancedFedAvg"


def test_same_seed_gives_the_same_model(project):
    exp = edit(project / "experiments" / "quickstart.toml", **{"rounds = 5": "rounds = 1"})
    run_cli("run", str(exp))
    run_cli("run", str(exp))
    uri = f"sqlite:///{project / 'workspace' / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    versions = sorted(
        int(v.version)
        for v in mlflow.MlflowClient(uri, registry_uri=uri).search_model_versions(
            "name='quickstart-breast-cancer'"
        )
    )
    a = mlflow.pytorch.load_model(f"models:/quickstart-breast-cancer/{versions[-2]}").state_dict()
    b = mlflow.pytorch.load_model(f"models:/quickstart-breast-cancer/{versions[-1]}").state_dict()
    # Equal up to CKKS precision: with encrypted aggregation on (the quickstart's default) each
    # round's fresh nonce gives the released aggregate different 2^-20 flooding noise.
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)
