"""A training run's final ROC and calibration, from the score histograms its sites released.

The coordinator's real round loop (``Federation``) drives the sites' real ClientApp handlers
in this process (``dp_consortium.LocalGrid``: no Ray) and records to a real MLflow SQLite
store; a run takes a few seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dp_accounting
import mlflow
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

sys.path.insert(0, str(Path(__file__).parent))
from dp_consortium import LocalGrid, refusal, write_experiment, write_site

from fedhealth.config.experiment import load_experiment
from fedhealth.config.site import load_site
from fedhealth.coordinator.federation import Federation, input_dim
from fedhealth.evaluation.histograms import release
from fedhealth.evaluation.metrics import derive
from fedhealth.evaluation.result import FINAL_ARTIFACT, FinalEvaluation
from fedhealth.models import build_model
from fedhealth.privacy.dp.ledger import PrivacyLedger
from fedhealth.protocol import ConfigKey, ProtocolError, RoundConfig
from fedhealth.registry.report import CALIBRATION_TITLE, REPORT_FILE, ROC_TITLE

RELEASE_KEYS = {"bins", "n", "pos", "neg", "noise_std"}  # counts only, never a score


def _run(root: Path, policies: dict[str, dict], rounds: int = 2):
    """Train ``rounds`` rounds on one synthetic site per policy; the summary and store."""
    sites = [
        write_site(root, name, 240, i, policy=p) for i, (name, p) in enumerate(policies.items())
    ]
    exp = write_experiment(root, sites, rounds=rounds, min_sites=len(sites))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    summary = Federation(load_experiment(exp), uri).run(LocalGrid(exp))
    return summary, mlflow.MlflowClient(uri), exp


def _artifact(client: mlflow.MlflowClient, run_id: str, path: str, tmp: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp))).read_text(encoding="utf-8")


def _final_scores(exp: Path, site: Path, summary) -> tuple[np.ndarray, np.ndarray]:
    """The registered model's scores on the site's test split, computed here from its weights
    and the site's own standardisation (``site`` normalisation without shared statistics)."""
    from fedhealth.coordinator.validation import RegisteredModel
    from fedhealth.site.dataset import load_site_data, standardizer_for

    cfg = load_experiment(exp)
    model = RegisteredModel.load(summary.tracking_uri, f"models:/{cfg.registered_model}/1")
    assert model.spec["statistics"] is None  # the sites share no sums: each uses its own
    data = load_site_data(load_site(site), cfg.task_spec().task)
    norm = standardizer_for(data, cfg.task.normalisation, None)
    net = build_model(cfg.task_spec().model, input_dim(cfg), 2, cfg.experiment.seed)
    net.load_state_dict({k: torch.as_tensor(v) for k, v in model.weights.items()})
    with torch.no_grad():
        out = net.eval()(torch.as_tensor(norm.transform(data.x_test), dtype=torch.float32))
    return torch.softmax(out, 1)[:, 1].numpy().astype(np.float64), data.y_test


# -- the run logs the figures, the histograms and the plots ----------------------------------


def test_a_run_logs_final_roc_and_calibration_from_exact_histograms(tmp_path):
    from sklearn.metrics import roc_auc_score

    summary, client, exp = _run(tmp_path, {"h1": {}, "h2": {}, "h3": {}})
    run = client.get_run(summary.run_id)
    final = FinalEvaluation.from_json(_artifact(client, summary.run_id, FINAL_ARTIFACT, tmp_path))
    assert final.round == 2 and sorted(final.releases) == ["h1", "h2", "h3"]
    for name in ("h1", "h2", "h3"):
        r = final.releases[name]
        assert set(r) == RELEASE_KEYS and r["noise_std"] == 0
        # The exact release is the histogram of the final model's scores on the test split...
        scores, y = _final_scores(exp, tmp_path / f"{name}.toml", summary)
        assert r["pos"] == release(scores, y)["pos"] and r["neg"] == release(scores, y)["neg"]
        # ... and the AUROC derived from it is scikit-learn's on the scores.
        auroc = run.data.metrics[f"final/{name}/auroc"]
        assert auroc == pytest.approx(roc_auc_score(y, scores), abs=0.01)
        assert run.data.metrics[f"final/{name}/auroc_low"] <= auroc
    assert "final/pooled/auroc" in run.data.metrics and "final/pooled/brier" in run.data.metrics
    plots = {a.path for a in client.list_artifacts(summary.run_id, "plots")}
    drawn = {f"plots/{kind}-per-site-final-round-from-released-score-histograms.png"
             for kind in ("roc", "calibration")}  # fmt: skip
    assert drawn <= plots
    page = _artifact(client, summary.run_id, REPORT_FILE, tmp_path)
    assert ROC_TITLE in page and CALIBRATION_TITLE in page and "<script" not in page
    assert page.count("data:image/png;base64,") == len(plots)
    assert f"{run.data.metrics['final/h1/auroc']:.3f} [" in page  # the table, with intervals


def test_a_dp_site_charges_its_ledger_for_the_histograms(tmp_path):
    summary, client, _ = _run(tmp_path, {"h1": {"release_metrics": "dp"},
                                         "h2": {"release_metrics": "dp"}}, rounds=1)  # fmt: skip
    final = FinalEvaluation.from_json(_artifact(client, summary.run_id, FINAL_ARTIFACT, tmp_path))
    profile = load_site(tmp_path / "h1.toml")
    sigma = 5.0  # the policy's default metrics_noise_multiplier
    with PrivacyLedger(profile.ledger_path) as ledger:
        entries = ledger.entries()
    # One round: the training loss, the evaluation and the histograms, each one release.
    assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries] == [(sigma, 1.0, 1)] * 3
    assert final.releases["h1"]["noise_std"] == pytest.approx(sigma)  # L2 sensitivity 1
    acc = RdpAccountant()
    for e in entries:
        acc.compose(dp_accounting.GaussianDpEvent(e.noise_multiplier), int(e.steps))
    # ε the site reported after the histograms = an independent accountant over its ledger.
    assert final.epsilon["h1"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)
    # The run's summary (closing table, model card, tags) counts every release too: DP-SGD is
    # off, yet the noisy metrics and histograms were charged.
    assert summary.privacy["sites"]["h1"]["epsilon"] == pytest.approx(final.epsilon["h1"])
    assert "noisy releases" in summary.privacy["description"]
    page = _artifact(client, summary.run_id, REPORT_FILE, tmp_path)
    assert ROC_TITLE in page and f"DP (noise std 5 per bin, ε={final.epsilon['h1']:.3g})" in page


def test_sites_that_withhold_their_metrics_release_no_histograms(tmp_path):
    withheld = {"release_metrics": "withheld"}
    summary, client, _ = _run(tmp_path, {"h1": withheld, "h2": withheld}, rounds=1)
    names = {a.path for a in client.list_artifacts(summary.run_id)}
    assert "evaluation" not in names and REPORT_FILE in names
    page = _artifact(client, summary.run_id, REPORT_FILE, tmp_path)
    assert ROC_TITLE not in page


# -- the site: only in the final round, never a score ----------------------------------------


def _evaluate(exp: Path, round_: int, flag: object = True) -> Message:
    """The site's evaluate handler, asked for histograms in ``round_``."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedhealth.site.client_app import evaluate

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cfg = load_experiment(exp)
    model = build_model(cfg.task_spec().model, input_dim(cfg), 2, cfg.experiment.seed)
    record = RoundConfig(cfg.task_spec(), server_round=round_).to_record()
    record[ConfigKey.SCORE_HISTOGRAMS] = flag
    msg = Message(
        RecordDict({
            "config": ConfigRecord(record),
            "arrays": ArrayRecord({k: Array(v.numpy()) for k, v in model.state_dict().items()}),
        }),
        dst_node_id=1, message_type="evaluate",
    )  # fmt: skip
    context = Context(
        run_id=1, node_id=1, node_config={"profile": str(cfg.experiment.sites[0])},
        state=RecordDict(), run_config={},
    )  # fmt: skip
    return evaluate(msg, context)


def test_the_site_releases_histograms_only_in_the_final_round(tmp_path):
    site = write_site(tmp_path, "h1", 240, 0)
    exp = write_experiment(tmp_path, [site], rounds=3, min_sites=1)
    ref = refusal(_evaluate(exp, 2))
    assert ref["rule"] == "score-histograms" and "round 3" in ref["message"]
    reply = _evaluate(exp, 3)
    assert not reply.has_error(), reply.error.reason
    released = json.loads(str(reply.content["validation"]["release"]))
    assert set(released) == RELEASE_KEYS and released["n"] == 60
    assert sum(released["pos"]) + sum(released["neg"]) == 60  # counts of records, no scores
    assert "validation" not in _evaluate(exp, 3, flag=False).content


def test_the_flag_is_a_typed_boolean():
    parse = RoundConfig.from_record  # a site's first step
    with pytest.raises(ProtocolError, match=r"score-histograms.*not a boolean") as err:
        parse({ConfigKey.SPEC: _spec_text(), ConfigKey.SCORE_HISTOGRAMS: "yes"})
    assert err.value.field == ConfigKey.SCORE_HISTOGRAMS
    parsed = parse({ConfigKey.SPEC: _spec_text(), ConfigKey.SCORE_HISTOGRAMS: True})
    assert parsed.score_histograms and RoundConfig.from_record(parsed.to_record()) == parsed
    plain = parse({ConfigKey.SPEC: _spec_text()})
    assert not plain.score_histograms and ConfigKey.SCORE_HISTOGRAMS not in plain.to_record()


def _spec_text() -> str:
    root = Path(__file__).resolve().parents[1]
    spec = load_experiment(root / "experiments" / "quickstart.toml").task_spec()
    return spec.canonical_bytes().decode("ascii")


# -- pooling exact and DP releases --------------------------------------------------------------


def test_exact_and_dp_grids_pool_on_the_coarser_one():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=400)
    y = (rng.uniform(size=400) < scores).astype(int)
    fine, coarse = release(scores[:200], y[:200]), release(scores[200:], y[200:], bins=20)
    pooled = derive({"a": fine, "b": coarse}, replicates=50)["pooled"]
    alone = derive({"all": release(scores, y, bins=20)}, replicates=50)["all"]
    for metric in ("auroc", "auprc", "brier", "calibration_slope"):
        assert pooled[metric]["value"] == pytest.approx(alone[metric]["value"], abs=1e-12)
