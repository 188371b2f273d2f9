"""``fedhealth analyze`` in simulation: the spec travels as a ``query.analysis`` message to
every simulated site's real ClientApp, the study gate and the site's policy apply, and the
pooled result lands in an MLflow run with its artifacts.

These run real Flower simulations (Ray) and a real MLflow SQLite store.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from typer.testing import CliRunner

from fedhealth.cli.main import app
from fedhealth.cli.studies_view import study_lines
from fedhealth.config.analysis import load_analysis
from fedhealth.config.site import load_site
from fedhealth.privacy.dp.ledger import PrivacyLedger
from fedhealth.protocol import AnalysisKey, MessageKind, ProtocolError, Record
from fedhealth.site.approvals import admit_analysis, decide, list_studies
from fedhealth.site.request import AnalysisRequest
from fedhealth.study import analysis_study_hash
from tests.conftest import analysis_project

pytestmark = pytest.mark.slow
runner = CliRunner()
HEART = "heart-disease-feasibility.analysis.toml"
TCGA = "tcga-brca-survival.analysis.toml"
HEART_SITES = ("cleveland", "hungarian", "switzerland", "va")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The reference analyses and site profiles in a fresh folder, reading the shared data."""
    return analysis_project(tmp_path)


def analyze(project: Path, name: str, *extra: str) -> tuple[int, str, str]:
    uri = f"sqlite:///{project / 'mlflow.db'}"
    path = str(project / "experiments" / name)
    result = runner.invoke(
        app, ["analyze", path, "--tracking-uri", uri, *extra], env={"COLUMNS": "200"}
    )
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        output += "".join(traceback.format_exception(result.exception))  # what a test shows
    return result.exit_code, output, uri


def the_run(uri: str, analysis: str):
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(analysis)
    assert exp is not None, f"no MLflow experiment {analysis!r}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    return client, run, files


def ledger_entries(project: Path, site: str, dataset: str) -> list:
    profile = load_site(project / "sites" / f"{site}.toml")
    if not profile.ledger_path.is_file():
        return []
    with PrivacyLedger(profile.ledger_path) as ledger:
        return [e for e in ledger.entries(dataset) if e.experiment.startswith("analysis:")]


def test_heart_disease_feasibility_through_fedhealth_analyze(project):
    code, out, uri = analyze(project, HEART)
    assert code == 0, out
    cfg = load_analysis(project / "experiments" / HEART)
    for q in cfg.spec().query_names():
        assert q in out
    assert "privacy per site" in out and "MLflow store" in out
    client, run, files = the_run(uri, cfg.name)
    assert run.info.run_id in out
    assert {"result.json", "count-by-sex-diagnosis.csv", "histogram-age.png"} <= files
    assert run.data.tags["fedhealth.kind"] == "analysis"
    assert run.data.tags["fedhealth.spec_hash"] == cfg.spec().spec_hash()
    local = client.download_artifacts(run.info.run_id, "result.json", str(project))
    result = json.loads(Path(local).read_text())
    assert sorted(result["sites"]) == sorted(HEART_SITES)
    for site in HEART_SITES:
        # The ε the site charged to its ledger is the ε in the run: at most the analysis's
        # ε = 1 (less where a site withheld a query with a cell below its minimum).
        entries = ledger_entries(project, site, "heart-disease")
        assert len(entries) == 1, site
        eps = run.data.metrics[f"epsilon.{site}"]
        assert eps == pytest.approx(entries[0].epsilon_increment) and 0 < eps < 1.011
    total = result["queries"]["count"]["estimate"][0]
    assert abs(total - 920) < 4 * result["queries"]["count"]["noise_std"]  # 920 UCI records


def test_tcga_brca_survival_through_fedhealth_analyze(project):
    code, out, uri = analyze(project, TCGA)
    assert code == 0, out
    cfg = load_analysis(project / "experiments" / TCGA)
    assert "S(t=" in out
    _, run, files = the_run(uri, cfg.name)
    km = cfg.spec().query_names()[0]
    assert {"result.json", f"{km}.csv", f"{km}.png"} <= files
    sites = [load_site(p).name for p in cfg.analysis.sites]
    assert len(sites) == 6
    for site in sites:
        assert f"epsilon.{site}" in run.data.metrics
        assert len(ledger_entries(project, site, "tcga-brca")) == 1


def test_a_manual_site_answers_pending_and_an_overspend_is_refused_uncharged(project):
    sites = project / "sites"
    va = sites / "va.toml"
    va.write_text(va.read_text().replace("[privacy]", '[privacy]\napproval = "manual"', 1))
    swiss = sites / "switzerland.toml"
    text = swiss.read_text()
    assert "max_epsilon_per_experiment" not in text
    swiss.write_text(text.replace("[privacy]", "[privacy]\nmax_epsilon_per_experiment = 0.5", 1))

    code, out, uri = analyze(project, HEART)
    assert code == 0, out  # two sites answered: min_sites = 2
    assert "study-pending" in out and "max_epsilon_per_experiment" in out
    _, run, _ = the_run(uri, "heart-disease-feasibility")
    assert run.data.params["refused"] == "switzerland,va"
    assert "epsilon.va" not in run.data.metrics and "epsilon.switzerland" not in run.data.metrics
    # Nothing was charged at either refusing site.
    assert ledger_entries(project, "va", "heart-disease") == []
    assert ledger_entries(project, "switzerland", "heart-disease") == []
    # The manual site holds the analysis as a study for its operator, described in words.
    profile = load_site(va)
    spec = load_analysis(project / "experiments" / HEART).spec()
    pending = [s for s in list_studies(profile) if s["status"] == "pending"]
    assert [s["study"] for s in pending] == [analysis_study_hash(spec)]
    lines = "\n".join(study_lines(pending[0]))
    assert "analysis:heart-disease-feasibility" in lines and "count-by-sex" in lines
    decide(profile, pending[0]["study"], "approved", by="test")
    assert admit_analysis(profile, spec) == analysis_study_hash(spec)


def test_fewer_than_min_sites_stops_with_every_refusal_named(project):
    path = project / "experiments" / HEART
    path.write_text(path.read_text().replace("min_sites = 2", "min_sites = 4"))
    va = project / "sites" / "va.toml"
    va.write_text(va.read_text().replace("[privacy]", '[privacy]\napproval = "manual"', 1))
    code, out, _ = analyze(project, HEART)
    assert code != 0
    assert "min_sites = 4" in out and "va (study-pending)" in out
    assert ledger_entries(project, "va", "heart-disease") == []


def test_config_errors_name_the_file_and_the_key(project):
    missing = project / "experiments" / "nope.analysis.toml"
    result = runner.invoke(app, ["analyze", str(missing)], env={"COLUMNS": "200"})
    assert result.exit_code != 0 and "nope.analysis.toml" in result.output
    path = project / "experiments" / HEART
    path.write_text(path.read_text().replace("min_sites = 2", "min_sites = 9"))
    result = runner.invoke(app, ["analyze", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code != 0
    assert HEART in result.output and "min_sites" in result.output


def test_a_malformed_analysis_request_is_a_protocol_error():
    """No record, another protocol version, a spec that is not JSON: each names the key."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    with pytest.raises(ProtocolError, match="no `analysis` record"):
        AnalysisRequest.from_message(Message(RecordDict(), dst_node_id=1, message_type="query"))

    def msg(**record) -> Message:
        content = RecordDict({Record.ANALYSIS: ConfigRecord(record)})
        return Message(content, dst_node_id=1, message_type=MessageKind.ANALYSIS)

    with pytest.raises(ProtocolError, match="protocol version"):
        AnalysisRequest.from_message(msg(**{AnalysisKey.PROTOCOL_VERSION: 99}))
    with pytest.raises(ProtocolError) as exc:
        AnalysisRequest.from_message(
            msg(**{AnalysisKey.PROTOCOL_VERSION: 1, AnalysisKey.SPEC: "{not json"})
        )
    assert exc.value.field == AnalysisKey.SPEC


def test_a_hostile_spec_on_an_undeclared_column_is_refused_by_the_handler(project):
    """A coordinator sends a query on a column the analysis does not declare: the site's
    ClientApp refuses it (rule undeclared_column), audits it, charges nothing."""
    from flwr.app import Context
    from flwr.supercore.task_identity import TaskIdentity

    from fedhealth.coordinator.analysis_run import analysis_message
    from fedhealth.protocol import Refusal
    from fedhealth.site.audit import audit_path, read
    from fedhealth.site.client_app import analysis

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cfg = load_analysis(project / "experiments" / HEART)
    msg = analysis_message(cfg, 1)
    spec = json.loads(str(msg.content[Record.ANALYSIS][AnalysisKey.SPEC]))
    spec["queries"].append({"kind": "mean", "column": "thalach"})  # not in [columns]
    msg.content[Record.ANALYSIS][AnalysisKey.SPEC] = json.dumps(spec)
    profile_path = project / "sites" / "cleveland.toml"
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"profile": str(profile_path), "site-index": 0},
        state=RecordDict(),
        run_config={},
    )
    reply = analysis(msg, context)
    assert reply.has_error()
    why = Refusal.decode(reply.error.reason)
    assert (why.site, why.rule) == ("cleveland", "undeclared_column") and "thalach" in why.message
    assert ledger_entries(project, "cleveland", "heart-disease") == []
    lines = list(read(audit_path(load_site(profile_path).workspace)))
    assert lines[-1]["event"] == "refused" and lines[-1]["rule"] == "undeclared_column"
    assert lines[-1]["experiment"] == "analysis:heart-disease-feasibility"
