"""``fedhealth validate`` runs every pre-flight check of ``fedhealth run`` and reports every
problem at once; ``run`` stops before any engine starts; error text keeps its ``[brackets]``;
skipped image files are named at the site and only counted to the coordinator."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedhealth.cli.main import app
from fedhealth.data.demo import write_demo_data
from fedhealth.engines import simulation
from fedhealth.privacy.he.demo import ensure_consortium

sys.path.insert(0, str(Path(__file__).parent))
from dp_consortium import reply_metrics, train_round

runner = CliRunner()
SITES = ["st-olav", "karolinska", "charite"]


@pytest.fixture
def project(tmp_path, request, monkeypatch) -> Path:
    """The quickstart: its experiments and sites, demo data and consortium keys, and an
    engine that fails the test if anything starts it."""
    root = Path(request.config.rootpath)
    for folder in ("experiments", "sites", "strategies"):
        shutil.copytree(root / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    write_demo_data(tmp_path / "workspace" / "demo-data", SITES, images_per_site=24)
    ensure_consortium(tmp_path / "workspace" / "consortium", SITES, key_holder=SITES[0])

    def no_engine(*args, **kwargs):
        raise AssertionError("the simulation engine was started")

    monkeypatch.setattr(simulation, "run_simulation", no_engine)
    return tmp_path


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "300"})
    assert "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, AssertionError), result.exception  # no engine
    return result.exit_code, " ".join(result.output.split())


def patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def drop_column(csv: Path, column: str) -> None:
    rows = [r.split(",") for r in csv.read_text().splitlines()]
    i = rows[0].index(column)
    csv.write_text("\n".join(",".join(c for j, c in enumerate(r) if j != i) for r in rows) + "\n")


def test_validate_passes_the_quickstart(project):
    code, out = cli("validate", "experiments/quickstart.toml", "sites/st-olav.toml")
    assert code == 0, out
    assert "ok experiments/quickstart.toml" in out and "ok sites/st-olav.toml" in out


def test_validate_and_run_report_every_problem_at_once(project):
    data = project / "workspace" / "demo-data"
    (data / "karolinska" / "breast-cancer.csv").unlink()  # a missing data file
    drop_column(data / "charite" / "breast-cancer.csv", "diagnosis")  # a missing label column
    exp = project / "experiments" / "quickstart.toml"
    patch(exp, "delta = 1e-3", "delta = 0.05")  # δ >= 1/n at st-olav
    site = project / "sites" / "st-olav.toml"
    patch(site, "[keys]", "[unused-keys]")  # encryption without [keys]
    patch(site, "[unused-keys]", "")
    patch(site, 'identity = "', '# identity = "')
    patch(site, 'he_secret = "', '# he_secret = "')
    patch(site, 'registry = "', '# registry = "')
    patch(site, "max_delta = 1e-3", "max_delta = 0.1")
    code, validated = cli("validate", str(exp))
    assert code == 2, validated  # the exit code of the first problem (st-olav's δ)
    assert "4 problems" in validated
    assert str(data / "karolinska" / "breast-cancer.csv") in validated
    assert "diagnosis" in validated and str(data / "charite" / "breast-cancer.csv") in validated
    assert "privacy.dp.delta" in validated and "st-olav" in validated
    assert "has no [keys] table" in validated  # the bracketed name survives Rich
    code, ran = cli("run", str(exp))
    assert code == 2
    problems = re.search(r"error: (4 problems: .*)", validated).group(1)
    assert problems in ran  # the same message from run as from validate


def test_unreachable_epsilon_is_reported_for_each_site(project):
    exp = project / "experiments" / "quickstart.toml"
    patch(exp, "target_epsilon = 1.0", "target_epsilon = 0.001")
    code, out = cli("validate", str(exp))
    assert code == 2 and "3 problems" in out
    assert out.count("`privacy.dp.target_epsilon` = 0.001 is unreachable") == 3


def test_too_few_sites_stops_run_before_any_engine_with_advice_that_fits(project):
    exp = project / "experiments" / "quickstart.toml"
    patch(exp, "local step.\nenabled = true", "local step.\nenabled = false")
    # karolinska and charite require DP; st-olav only a minimum noise
    patch(project / "sites" / "st-olav.toml", "require_dp = true", "require_dp = false")
    for command in ("validate", "run"):
        code, out = cli(command, str(exp))
        assert code == 6, out
        assert "only 0 of 3 site(s) would take part in round 1" in out
        assert "`experiment.min_sites` is 2" in out
        assert "require_dp" in out and "min_noise_multiplier" in out
        assert "more noise" not in out and "Raise the experiment's noise multiplier" not in out
        assert "Enable DP in the experiment's `[privacy.dp]` section" in out


def test_a_dataset_the_site_lacks_keeps_its_bracketed_fix(project):
    exp = project / "experiments" / "quickstart.toml"
    patch(exp, 'dataset = "breast-cancer"', 'dataset = "mammography"')
    for command in ("validate", "run"):
        code, out = cli(command, str(exp))
        assert code == 2 and "Add a [datasets.mammography] table." in out


def test_more_classes_than_num_classes_names_file_column_and_fix(project):
    exp = project / "experiments" / "quickstart.toml"
    patch(
        exp,
        "label_map = { benign = 0, malignant = 1 }",
        "label_map = { benign = 0, malignant = 2 }",
    )
    code, out = cli("validate", str(exp))
    assert code == 3
    csv = project / "workspace" / "demo-data" / "st-olav" / "breast-cancer.csv"
    assert str(csv) in out and "label column 'diagnosis'" in out
    assert "2 classes found (0, 2)" in out and "`task.num_classes = 3`" in out


def test_site_profile_with_a_missing_data_path(project):
    shutil.rmtree(project / "workspace" / "demo-data" / "charite" / "dicom")
    code, out = cli("validate", "sites/charite.toml", "sites/st-olav.toml")
    assert code == 3 and "ok sites/st-olav.toml" in out and "not ok sites/charite.toml" in out
    assert "[datasets.phantoms]" in out and "dicom not found" in out


def test_skipped_files_are_named_at_the_site_and_only_counted_to_the_coordinator(project, caplog):
    folder = project / "workspace" / "demo-data" / "st-olav" / "dicom"
    victims = sorted(folder.glob("*.dcm"))[2:4]
    for v in victims:
        v.write_bytes(v.read_bytes()[:300])
    exp = project / "experiments" / "quickstart-imaging.toml"
    code, out = cli("validate", str(exp))
    assert code == 3 and "2 files cannot be read as DICOM" in out  # all of them, not the first
    assert all(str(v) in out for v in victims)

    patch(project / "sites" / "st-olav.toml", "skip_bad_files = false", "skip_bad_files = true")
    patch(exp, "[privacy.he]\n", "[privacy.he]\nenabled = false\n")
    patch(exp, "enabled = false\n# Encrypted", "# Encrypted")
    patch(exp, "enabled = true\nkeys_dir", "keys_dir")
    with caplog.at_level(logging.WARNING, logger="fedhealth.site"):
        reply, _ = train_round(exp, 0, 1)
    metrics = reply_metrics(reply)
    assert metrics["skipped-files"] == 2  # the count reaches the coordinator ...
    sent = json.dumps({k: dict(v) for k, v in reply.content.items() if k != "arrays"})
    assert not any(v.name in sent for v in victims)  # ... never a name
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(v.name in logged for v in victims)  # the site's own log names them
    audit = project / "workspace" / "sites" / "st-olav" / "audit.log"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    skipped = [r for r in records if r["event"] == "skipped-files"]
    assert skipped and skipped[-1]["count"] == 2
    assert sorted(f["file"] for f in skipped[-1]["files"]) == sorted(v.name for v in victims)
    code, table = cli("site", "audit", "sites/st-olav.toml")
    assert code == 0 and "skipped-files" in table and victims[0].name in table
