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
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from sklearn.model_selection import train_test_split
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


def split_rows(frame: pd.DataFrame, y: np.ndarray, task: dict) -> pd.DataFrame:
    """The test rows, by the rule the model card states (scikit-learn's split)."""
    _, test = train_test_split(
        frame, test_size=task["test_fraction"], random_state=task["split_seed"],
        shuffle=True, stratify=y,
    )  # fmt: skip
    return test.sort_index()


def pyfunc_accuracy(model, frame: pd.DataFrame, y: pd.Series) -> float:
    """Accuracy of a registered pyfunc on raw rows; labels named as its output columns."""
    probs = model.predict(frame)
    assert np.allclose(probs.sum(axis=1), 1.0)
    pred = probs.columns.to_numpy()[probs.to_numpy().argmax(1)]
    return float((pred == y.astype(str).to_numpy()).mean())


def test_tabular_federation_registers_a_model_that_loads_and_predicts(project):
    exp = edit(project / "experiments" / "quickstart.toml", **{"rounds = 5": "rounds = 2"})
    out = run_cli("run", str(exp))
    uri = f"sqlite:///{project / 'workspace' / 'mlflow' / 'mlflow.db'}"
    assert "Registered model: quickstart-breast-cancer version 1" in " ".join(out.split())
    assert str(project / "workspace" / "mlflow") in out.replace("\n", "")

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/quickstart-breast-cancer/1")
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version("quickstart-breast-cancer", "1")
    assert set(mv.tags["sites"].split(",")) == {"st-olav", "karolinska", "charite"}
    assert mv.tags["rounds"] == "2" and mv.tags["strategy"] == "fedavg"
    assert re.fullmatch(r"[0-9a-f]{16}", mv.tags["config_hash"])
    assert "Input layout" in mv.description and "Train/test split" in mv.description
    run = client.get_run(mv.run_id)
    assert run.data.params["training.batch_size"] == "16"
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs[:2] == ["mean_radius", "mean_texture"] and len(inputs) == 30

    cfg, sites = load_experiment_with_sites(exp)
    task = cfg.task_spec().task.model_dump(mode="json", by_alias=True)
    for site in sites:
        # The raw rows of the site's file, as the hospital holds them: no encoding, no scaling.
        frame = pd.read_csv(site.datasets["breast-cancer"].path)
        test = split_rows(frame, frame["diagnosis"], task)
        reported = client.get_metric_history(mv.run_id, f"site/{site.name}/accuracy")[-1].value
        got = pyfunc_accuracy(model, test, test["diagnosis"])
        assert abs(got - reported) <= 0.02, (site.name, got, reported)
    # The PyTorch module, rebuilt from safetensors (nothing unpickled), is there for those who
    # want it; the federation improved on the initial model.
    network = model.unwrap_python_model().network
    xs = [load_site_data(s, task) for s in sites]
    x = np.concatenate([d.x_test for d in xs])
    y = np.concatenate([d.y_test for d in xs])
    initial = build_model(cfg.task_spec().model, 30, 2, cfg.experiment.seed)
    before = accuracy(torch.nn.Sequential(network[0], initial), x, y)
    assert accuracy(network, x, y) > max(before, 0.85)
    # Bad raw input gets one clear error naming the column.
    with pytest.raises(MlflowException, match="mean_radius"):
        model.predict(frame.drop(columns=["mean_radius"]))


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
    model = mlflow.pyfunc.load_model("models:/quickstart-phantoms/1")
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version("quickstart-phantoms", "1")
    assert mv.tags["strategy"] == "balanced_fedavg.py:BalancedFedAvg"
    cfg, sites = load_experiment_with_sites(exp)
    task = cfg.task_spec().task.model_dump(mode="json", by_alias=True)
    for site in sites:
        # The DICOM files as the hospital holds them, split by the model card's rule.
        source = site.datasets["phantoms"]
        labels = pd.read_csv(source.path / source.labels).sort_values("file")
        labels = labels.reset_index(drop=True)
        test = split_rows(labels, labels["label"], task)
        frame = pd.DataFrame({"path": [str(source.path / f) for f in test["file"]]})
        reported = client.get_metric_history(mv.run_id, f"site/{site.name}/accuracy")[-1].value
        got = pyfunc_accuracy(model, frame, test["label"])
        assert abs(got - reported) <= 0.02, (site.name, got, reported)


def test_a_second_run_with_the_same_seed_is_not_a_replay(project):
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
    a, b = (
        mlflow.pyfunc.load_model(f"models:/quickstart-breast-cancer/{v}")
        .unwrap_python_model()
        .network.state_dict()
        for v in versions[-2:]
    )
    # Sites seed training and DP noise with the run id and the round nonce too (issue 10): a
    # second run of the same config is a new draw, never a bit-identical replay that would let
    # a coordinator difference two releases of the same round.
    assert not all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)


def test_default_policies_keep_statistics_and_say_what_the_run_releases(project):
    """Sites with the default policy (no shared sums, DP-noised metrics): a site-normalised
    run is not a refusal of the study. The run says why its registered model holds no
    statistics, and that the sites' ε grows with each metric release though DP-SGD is off."""
    sites = project / "sites"
    for name in ("st-olav", "karolinska", "charite"):
        text = (sites / f"{name}.toml").read_text()
        for line in ("share_statistics = true", 'release_metrics = "exact"'):
            assert line in text, (name, line)
            text = text.replace(line, "")
        (sites / f"default-{name}.toml").write_text(text)
    exp = edit(
        project / "experiments" / "quickstart.toml",
        **{
            "rounds = 5": "rounds = 1",
            'normalisation = "consortium"': 'normalisation = "site"',
            "../sites/st-olav.toml": "../sites/default-st-olav.toml",
            "../sites/karolinska.toml": "../sites/default-karolinska.toml",
            "../sites/charite.toml": "../sites/default-charite.toml",
        },
    )
    out = " ".join(run_cli("run", str(exp)).split())
    assert "refused (share_statistics)" not in out
    assert "charite, karolinska, st-olav do not share per-feature sums" in out
    assert "release loss and accuracy with Gaussian noise charged to their ledgers" in out


def test_the_registered_model_is_the_strategys_published_one(project):
    """BalancedFedAdam with ``average_last = 2``: the coordinator evaluates and registers the
    mean of the last two rounds' global models (the round checkpoints keep each round's own
    global model, which the next round trains from)."""
    from fedhealth.coordinator.checkpoint import _unpack

    exp = edit(
        project / "experiments" / "quickstart.toml",
        **{
            "rounds = 5": "rounds = 3",
            'name = "fedavg"': 'name = "strategies/balanced_fedadam.py:BalancedFedAdam"\n'
            "options = { alpha = 1.0, eta = 0.05, average_last = 2 }",
        },
    )
    out = " ".join(run_cli("run", str(exp)).split())
    version = re.search(r"Registered model: quickstart-breast-cancer version (\d+)", out)
    assert version, out
    uri = f"sqlite:///{project / 'workspace' / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version("quickstart-breast-cancer", version.group(1))
    rounds = []
    for r in (2, 3):
        path = client.download_artifacts(mv.run_id, f"checkpoints/round-{r:04d}.npz")
        rounds.append(_unpack(Path(path).read_bytes()).arrays)
    network = mlflow.pyfunc.load_model(f"models:/quickstart-breast-cancer/{mv.version}")
    weights = network.unwrap_python_model().network[1].state_dict()
    for name, value in weights.items():
        expected = (rounds[0][name] + rounds[1][name]) / 2
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-7)
        assert not np.allclose(value.numpy(), rounds[1][name])  # not the last round's model
