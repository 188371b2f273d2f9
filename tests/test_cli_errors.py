"""Bad input to ``fedhealth run``: one clear message naming what and where, non-zero exit,
no traceback, and nothing trained (each case fails before the simulation starts)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from fedhealth.cli.main import app
from fedhealth.data.demo import write_demo_data

runner = CliRunner()


@pytest.fixture
def project(tmp_path, request, monkeypatch) -> Path:
    root = Path(request.config.rootpath)
    for folder in ("experiments", "sites", "strategies"):
        shutil.copytree(root / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    write_demo_data(
        tmp_path / "workspace" / "demo-data",
        ["st-olav", "karolinska", "charite"],
        images_per_site=24,
    )
    return tmp_path


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["run", *args], env={"COLUMNS": "300"})
    assert "Traceback" not in result.output
    return result.exit_code, " ".join(result.output.split())


def patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_unknown_key(project):
    exp = project / "experiments" / "quickstart.toml"
    patch(exp, "batch_size = 16", "batch_size = 16\nlocal_epoch = 3")
    code, out = run(str(exp))
    assert code == 2
    assert "quickstart.toml" in out and "`training.local_epoch`: unknown key" in out


def test_wrong_type(project):
    exp = project / "experiments" / "quickstart.toml"
    patch(exp, "rounds = 5", 'rounds = "five"')
    code, out = run(str(exp))
    assert code == 2 and "`experiment.rounds`" in out and "five" in out


def test_missing_data_path(project):
    shutil.rmtree(project / "workspace" / "demo-data" / "karolinska")
    code, out = run(str(project / "experiments" / "quickstart.toml"))
    assert code == 3
    assert "karolinska" in out and "breast-cancer.csv" in out


def test_csv_without_label_column(project):
    csv = project / "workspace" / "demo-data" / "charite" / "breast-cancer.csv"
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    i = header.index("diagnosis")
    csv.write_text(
        "\n".join(",".join(c for j, c in enumerate(r.split(",")) if j != i) for r in lines) + "\n"
    )
    code, out = run(str(project / "experiments" / "quickstart.toml"))
    assert code == 3 and "diagnosis" in out and str(csv) in out


def test_truncated_dicom(project):
    folder = project / "workspace" / "demo-data" / "st-olav" / "dicom"
    victim = sorted(folder.glob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:300])
    code, out = run(str(project / "experiments" / "quickstart-imaging.toml"))
    assert code == 3 and victim.name in out


def test_truncated_dicom_skipped_when_the_policy_says_so(project):
    folder = project / "workspace" / "demo-data" / "st-olav" / "dicom"
    victim = sorted(folder.glob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:300])
    patch(project / "sites" / "st-olav.toml", "skip_bad_files = false", "skip_bad_files = true")
    from fedhealth.cli.preflight import check_experiment
    from fedhealth.config.experiment import load_experiment_with_sites

    cfg, sites = load_experiment_with_sites(project / "experiments" / "quickstart-imaging.toml")
    sizes = check_experiment(cfg, sites).sizes  # (no consortium keys in this project)
    assert sizes["st-olav"] > 0
    assert pydicom.dcmread(sorted(folder.glob("*.dcm"))[0]).pixel_array.size > 0


def test_custom_strategy_path_that_does_not_exist(project):
    exp = project / "experiments" / "quickstart.toml"
    patch(exp, 'name = "fedavg"', 'name = "strategies/nowhere.py:Mine"')
    code, out = run(str(exp))
    assert code == 2 and "strategies/nowhere.py" in out and "not found" in out


def test_custom_strategy_option_that_does_not_exist(project):
    exp = project / "experiments" / "quickstart.toml"
    patch(
        exp,
        'name = "fedavg"',
        'name = "strategies/balanced_fedavg.py:BalancedFedAvg"\noptions = { beta = 1 }',
    )
    code, out = run(str(exp))
    assert code == 2 and "strategy.options.beta" in out and "alpha" in out
