"""Experiment configs and site profiles: every bad input fails before training, clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedhealth.cli.main import app
from fedhealth.config.experiment import load_experiment, load_experiment_with_sites
from fedhealth.config.site import load_site
from fedhealth.errors import ConfigError

SITE = """
[site]
name = "{name}"
[datasets.table]
kind = "tabular"
path = "{name}.csv"
"""

EXPERIMENT = """
[experiment]
name = "exp"
sites = [{sites}]
rounds = {rounds}
min_sites = {min_sites}
fraction_train = {fraction}

[task]
dataset = "table"
kind = "tabular"
[task.schema]
numeric = ["a", "b"]
label = "y"

[model]
name = "logistic_regression"
{extra}
"""


def write(
    tmp: Path, rounds=2, fraction=1.0, sites=("h1", "h2"), listed=None, min_sites=2, extra=""
) -> Path:
    for s in set(sites):
        (tmp / f"{s}.toml").write_text(SITE.format(name=s))
        # eight rows: validate reads the data as run does (at least 4 usable records)
        (tmp / f"{s}.csv").write_text("a,b,y\n" + "1,2,0\n3,4,1\n" * 4)
    listed = listed or [f'"{s}.toml"' for s in sites]
    path = tmp / "exp.toml"
    path.write_text(
        EXPERIMENT.format(
            sites=", ".join(listed),
            rounds=rounds,
            fraction=fraction,
            min_sites=min_sites,
            extra=extra,
        )
    )
    return path


def test_valid_experiment_resolves_sites(tmp_path):
    cfg, sites = load_experiment_with_sites(write(tmp_path))
    assert [s.name for s in sites] == ["h1", "h2"]
    assert sites[0].datasets["table"].path == (tmp_path / "h1.csv").resolve()
    assert cfg.registered_model == "exp"
    assert len(cfg.config_hash()) == 16


@pytest.mark.parametrize(
    ("kwargs", "key", "words"),
    [
        ({"rounds": 0}, "experiment.rounds", "greater than 0"),
        ({"fraction": 1.5}, "experiment.fraction_train", "less than or equal to 1"),
        ({"listed": ['"h1.toml"', '"h1.toml"']}, "experiment.sites", "listed twice"),
        ({"min_sites": 3}, "experiment", "min_sites is 3"),
        ({"extra": "[training]\nbatch_size = 'big'"}, "training.batch_size", "valid integer"),
        ({"extra": "[training]\nlearnig_rate = 0.1"}, "training.learnig_rate", "unknown key"),
        ({"extra": "[strategy]\nname = 'strategies/nope.py:X'"}, "strategy.name", "not found"),
        ({"extra": "[strategy]\nname = 'fedbest'"}, "strategy.name", "unknown strategy"),
    ],
)
def test_bad_experiment_names_file_key_and_problem(tmp_path, kwargs, key, words):
    path = write(tmp_path, **kwargs)
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    msg = str(err.value)
    assert str(path) in msg and f"`{key}`" in msg and words in msg


def test_missing_experiment_file_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_experiment(tmp_path / "nope.toml")


def test_site_without_the_dataset_is_named(tmp_path):
    path = write(tmp_path)
    (tmp_path / "h2.toml").write_text(SITE.format(name="h2").replace("table", "other"))
    with pytest.raises(ConfigError, match=r"site 'h2' has no dataset named 'table'"):
        load_experiment_with_sites(path)


def test_two_profiles_with_one_site_name_are_refused(tmp_path):
    path = write(tmp_path)
    (tmp_path / "h2.toml").write_text(SITE.format(name="h1"))
    with pytest.raises(ConfigError, match="site name 'h1' is used by both"):
        load_experiment_with_sites(path)


def test_site_profile_rejects_bad_policy_values(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SITE.format(name="h1") + "\n[privacy]\nmax_delta = 2\n")
    with pytest.raises(ConfigError, match=r"privacy\.max_delta"):
        load_site(p)


def test_reference_configs_are_valid(root):
    for exp in ("quickstart.toml", "quickstart-imaging.toml", "heart-disease.toml"):
        cfg = load_experiment(root / "experiments" / exp)
        assert cfg.experiment.rounds > 0
    for site in (root / "sites").glob("*.toml"):
        # A centre may have one profile per data source (e.g. `hungarian-fhir.toml`).
        name = load_site(site).name
        assert site.stem == name or site.stem.startswith(f"{name}-")


def test_cli_validate_reports_without_traceback(tmp_path):
    path = write(tmp_path, rounds=0)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "experiment.rounds" in result.output
    assert "Traceback" not in result.output


def test_cli_validate_ok(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(write(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "experiment 'exp': 2 sites" in result.output


def test_config_reference_doc_is_current(root):
    from fedhealth.config.reference import render_reference

    doc = (root / "docs" / "config-reference.md").read_text()
    assert doc == render_reference(), (
        "docs/config-reference.md is stale: run "
        "`python -m fedhealth.config.reference > docs/config-reference.md`"
    )
