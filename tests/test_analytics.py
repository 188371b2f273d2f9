"""Federated analytics: accuracy against the exact pooled answers, the ε each site is
charged (recomputed with Google's dp-accounting), refusals that charge and release nothing,
and the results' artifacts."""

from __future__ import annotations

import glob
import importlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedhealth.analytics.local import run_analysis_local
from fedhealth.analytics.site_queries import AnalysisRefused, answer_analysis
from fedhealth.config.analysis import load_analysis, load_analysis_with_sites
from fedhealth.errors import ConfigError
from fedhealth.privacy.dp.ledger import PrivacyLedger
from tests.conftest import ROOT, analysis_project, shared_data

HEART = "heart-disease-feasibility.analysis.toml"
TCGA = "tcga-brca-survival.analysis.toml"
COLS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
        "oldpeak", "slope", "ca", "thal", "num"]  # fmt: skip


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The reference analyses and site profiles in a fresh folder, reading the shared data."""
    return analysis_project(tmp_path)


def heart_frame() -> pd.DataFrame:
    d = shared_data() / "uci-heart-disease"
    return pd.concat(
        pd.read_csv(d / f"processed.{c}.data", header=None, names=COLS, na_values="?")
        for c in ("cleveland", "hungarian", "switzerland", "va")
    )


def write_analysis(project: Path, text: str, name: str = "t.analysis.toml") -> Path:
    path = project / "experiments" / name
    path.write_text(text)
    return path


HEART_HEAD = """
[analysis]
name = "heart-disease-{name}"
sites = ["../sites/cleveland.toml", "../sites/hungarian.toml", "../sites/switzerland.toml",
         "../sites/va.toml"]
dataset = "heart-disease"
min_sites = 2

[columns]
age = {{ type = "numeric", lower = 20, upper = 90 }}
sex = {{ type = "categorical", categories = {{ "0" = "female", "1" = "male" }} }}
num = {{ type = "categorical", categories = {{ "0" = "no", "1" = "yes", "2" = "yes", \
"3" = "yes", "4" = "yes" }} }}

[privacy]
epsilon = {eps}
delta = 1e-5
"""


# -- accuracy -------------------------------------------------------------------------


def test_counts_cover_the_exact_pooled_count_95_percent_of_the_time(project, tmp_path):
    """At ε = 1 per site, the stated 95 % intervals cover the exact pooled counts at their
    nominal rate (80 runs x 5 cells), and the reference study covers them on one run."""
    exact = heart_frame()
    truth = np.array([len(exact), (exact.sex == 0).sum(), (exact.sex == 1).sum(),
                      (exact.num == 0).sum(), (exact.num > 0).sum()], dtype=float)  # fmt: skip
    path = write_analysis(
        project,
        HEART_HEAD.format(name="counts", eps=1.0)
        + '[[queries]]\nkind = "count"\n[[queries]]\nkind = "count"\nby = ["sex"]\n'
        + '[[queries]]\nkind = "count"\nby = ["num"]\n',
    )
    hits = []
    for seed in range(80):
        r = run_analysis_local(path, noise_seed=seed, workspace=tmp_path / "ws")
        q = r["queries"]
        lo = np.concatenate([q[n]["lower"] for n in ("count", "count-by-sex", "count-by-num")])
        hi = np.concatenate([q[n]["upper"] for n in ("count", "count-by-sex", "count-by-num")])
        hits.append((lo <= truth) & (truth <= hi))
        assert set(r["epsilon_per_site"]) == {"cleveland", "hungarian", "switzerland", "va"}
        assert all(abs(e - 1.0) < 0.011 for e in r["epsilon_per_site"].values())
    coverage = float(np.mean(hits))
    # 400 Bernoulli(0.95) trials: sd 0.011; a wrong noise scale would miss by far more.
    assert 0.915 <= coverage <= 0.985, coverage

    ref = run_analysis_local(project / "experiments" / HEART, noise_seed=7)
    q = ref["queries"]["count-by-sex"]
    assert q["lower"][0] <= truth[1] <= q["upper"][0] and q["lower"][1] <= truth[2] <= q["upper"][1]


def test_pooled_kaplan_meier_within_005_of_lifelines_on_tcga_brca(project, tmp_path):
    # The survival reference; in CI it is installed (tests/requirements-nodeps.txt) and must run.
    lifelines = (
        importlib.import_module("lifelines")
        if os.environ.get("CI")
        else pytest.importorskip("lifelines")
    )
    frames = [pd.read_csv(f) for f in glob.glob(str(project / "workspace/demo-data/tcga-brca/*"))]
    pooled = pd.concat(frames)
    assert len(frames) == 6 and len(pooled) == 1088
    cfg = load_analysis(project / "experiments" / TCGA)
    grid = cfg.queries[0].grid
    exact = lifelines.KaplanMeierFitter().fit(pooled["T"], pooled["E"])
    want = exact.survival_function_at_times(grid).to_numpy()
    covered = 0
    for seed in range(5):
        r = run_analysis_local(
            project / "experiments" / TCGA, noise_seed=seed, workspace=tmp_path / f"w{seed}"
        )
        km = r["queries"]["overall-survival"]
        got = np.asarray(km["estimate"][0])
        assert np.max(np.abs(got - want)) < 0.05, (seed, got, want)
        covered += np.sum((np.asarray(km["lower"][0]) <= want) & (want <= km["upper"][0]))
        assert all(abs(e - 1.0) < 0.011 for e in r["epsilon_per_site"].values())
    assert covered >= 13  # of 15 band checks


# -- ε recomputed independently ---------------------------------------------------------


def test_epsilon_per_site_recomputed_with_dp_accounting_agrees_within_1_percent(project):
    dpa = pytest.importorskip("dp_accounting")
    r = run_analysis_local(project / "experiments" / HEART, noise_seed=3)
    cfg, sites = load_analysis_with_sites(project / "experiments" / HEART)
    spec = cfg.spec()
    for site in sites:
        with PrivacyLedger(site.ledger_path) as ledger:
            entry = [e for e in ledger.entries("heart-disease")
                     if e.experiment == f"analysis:{spec.name}"][-1]  # fmt: skip
        # Rebuild the released queries' noise multipliers from what was released: each
        # query's noise std over its L2 sensitivity, recomputed from the schema here.
        released = r["queries"]
        sigmas = []
        for name in spec.query_names():
            res = released[name]
            if site.name not in res.get("per_site", {}):
                continue  # withheld by this site: not released, not charged
            sens = {"mean": 3**0.5, "missingness": (1 + len(spec.columns)) ** 0.5}.get(
                res["kind"], 1.0
            )
            std = (res["noise_std"] ** 2 / len(res["per_site"])) ** 0.5  # same σ at each site
            sigmas.append(std / sens)
        event = dpa.ComposedDpEvent([dpa.GaussianDpEvent(s) for s in sigmas])
        acc = dpa.rdp.RdpAccountant()
        acc.compose(event)
        independent = acc.get_epsilon(spec.privacy.delta)
        charged = r["epsilon_per_site"][site.name]
        assert abs(charged - independent) / independent < 0.01, (site.name, charged, independent)
        assert entry.epsilon_increment == pytest.approx(charged)
        assert entry.delta == spec.privacy.delta and entry.sample_rate == 1.0


# -- refusals: nothing charged, nothing released, no data value in the message -----------


def _entries(profile) -> int:
    if not profile.ledger_path.exists():
        return 0
    with PrivacyLedger(profile.ledger_path) as ledger:
        return len(ledger.entries())


def test_overspend_is_refused_before_anything_is_charged(project):
    path = write_analysis(project, HEART_HEAD.format(name="big", eps=6.0)
                          + '[[queries]]\nkind = "count"\n')  # fmt: skip
    cfg, sites = load_analysis_with_sites(path)
    site = sites[0].model_copy(
        update={"privacy": sites[0].privacy.model_copy(update={"max_epsilon_per_experiment": 5})}
    )
    with pytest.raises(AnalysisRefused) as err:
        answer_analysis(site, cfg.spec().model_dump(mode="json"))
    assert err.value.rule == "max_epsilon_per_experiment"
    assert _entries(site) == 0

    # Composed with training on the same dataset: a lifetime budget already mostly spent.
    site = sites[1].model_copy(
        update={"privacy": sites[1].privacy.model_copy(update={"lifetime_epsilon_budget": 8})}
    )
    with PrivacyLedger(site.ledger_path) as ledger:
        ledger.charge("heart-disease", "heart-disease-dp", 1, 3.0, 3.0, 1e-5, 1.1, 0.1, 30, "rdp")
    with pytest.raises(AnalysisRefused) as err:
        answer_analysis(site, cfg.spec().model_dump(mode="json"))
    assert err.value.rule == "lifetime_epsilon_budget" and "3" in str(err.value)
    assert _entries(site) == 1


def test_a_cell_below_the_minimum_is_refused_and_nothing_charged(project, caplog):
    path = write_analysis(project, HEART_HEAD.format(name="cross", eps=1.0)
                          + '[[queries]]\nkind = "count"\nby = ["sex", "num"]\n')  # fmt: skip
    cfg, sites = load_analysis_with_sites(path)
    va = next(s for s in sites if s.name == "va")  # 3 women without disease
    with caplog.at_level(logging.WARNING), pytest.raises(AnalysisRefused) as err:
        answer_analysis(va, cfg.spec().model_dump(mode="json"))
    assert err.value.rule == "min_cell_count"
    assert not re.search(r"\b3\b", str(err.value)), str(err.value)  # no count leaves
    assert _entries(va) == 0
    # A larger site answers the same crosstab, and is charged.
    release = answer_analysis(sites[0], cfg.spec().model_dump(mode="json"))
    assert release["queries"]["count-by-sex-num"]["shape"] == [2, 2]
    assert _entries(sites[0]) == 1


def test_an_undeclared_column_is_refused_and_never_read(project):
    cfg, sites = load_analysis_with_sites(project / "experiments" / HEART)
    spec = cfg.spec().model_dump(mode="json")
    spec["queries"].append({"kind": "mean", "column": "thal"})  # a hostile coordinator
    with pytest.raises(AnalysisRefused) as err:
        answer_analysis(sites[0], spec)
    assert err.value.rule == "undeclared_column" and "thal" in str(err.value)
    assert _entries(sites[0]) == 0
    # The config names file and key for the same mistake.
    text = (project / "experiments" / HEART).read_text() + (
        '\n[[queries]]\nkind = "mean"\ncolumn = "thal"\n'
    )
    with pytest.raises(ConfigError, match=r"bad\.analysis\.toml: .*column 'thal' is not declared"):
        load_analysis(write_analysis(project, text, "bad.analysis.toml"))


def test_config_errors_name_the_file_and_the_key(project):
    head = HEART_HEAD.format(name="x", eps=1.0)
    cases = {
        '[[queries]]\nkind = "histogram"\ncolumn = "age"\nbins = [30, 40]\n': "must cover",
        '[[queries]]\nkind = "count"\nby = ["age"]\n': "needs a categorical",
        '[[queries]]\nkind = "kaplan_meier"\ntime = "age"\nevent = "sex"\ngrid = [1]\n': (
            "needs a binary"
        ),
        '[[queries]]\nkind = "count"\nepsilon = 2.0\n[[queries]]\nkind = "count"\nby = ["sex"]\n': (
            "use up"
        ),
        '[[queries]]\nkind = "count"\nbogus = 1\n': "unknown key",
    }
    for body, message in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            load_analysis(write_analysis(project, head + body, "e.analysis.toml"))
        assert "e.analysis.toml: key `" in str(err.value)


def test_site_list_errors_name_the_profile_like_an_experiment(project):
    head = HEART_HEAD.format(name="x", eps=1.0) + '[[queries]]\nkind = "count"\n'
    twice = head.replace('"../sites/va.toml"', '"../sites/cleveland.toml"')
    with pytest.raises(ConfigError, match=r"`analysis.sites`: site profile \S*cleveland\.toml is"):
        load_analysis(write_analysis(project, twice, "e.analysis.toml"))
    quorum = head.replace("min_sites = 2", "min_sites = 5")
    with pytest.raises(ConfigError, match="min_sites is 5 but only 4 sites are listed; lower"):
        load_analysis(write_analysis(project, quorum, "e.analysis.toml"))


def test_analysis_reference_doc_is_current():
    from fedhealth.config.reference import render_analysis_reference

    doc = (ROOT / "docs" / "analysis-reference.md").read_text()
    assert doc == render_analysis_reference(), (
        "docs/analysis-reference.md is stale: run "
        "`python -m fedhealth.config.reference --analysis > docs/analysis-reference.md`"
    )


# -- results ----------------------------------------------------------------------------


def test_results_go_to_mlflow_with_plots_and_per_site_epsilon(project, tmp_path):
    import mlflow

    from fedhealth.analytics.report import log_to_mlflow, render

    r = run_analysis_local(project / "experiments" / TCGA, noise_seed=1)
    render(r)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_to_mlflow(r, uri)
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.metrics["epsilon.tcga-canada"] == pytest.approx(
        r["epsilon_per_site"]["tcga-canada"]
    )
    files = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id)}
    assert {"result.json", "overall-survival.csv", "overall-survival.png"} <= files
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="result.json",
                                                     tracking_uri=uri))  # fmt: skip
    assert json.loads(local.read_text())["spec_hash"] == r["spec_hash"]


def test_a_noisy_count_far_below_zero_keeps_its_estimate_inside_its_interval():
    """Noise can push a pooled count of a near-empty cell far below 0: its estimate is 0 and
    its interval must still hold it (a plot's error bar from it failed on a negative length
    about one run in ten of `fedhealth analyze`)."""
    from fedhealth.analytics.pooling import _counts

    pooled = np.array([-80.0, -3.0, 0.0, 12.0, 500.0])
    res = _counts(pooled, 10.0, None, np.random.default_rng(0), 10)
    est, lo, hi = (np.asarray(res[k]) for k in ("estimate", "lower", "upper"))
    assert np.all(lo <= est) and np.all(est <= hi), res
    assert list(est) == [0.0, 0.0, 0.0, 12.0, 500.0] and res["raw"] == pooled.tolist()
