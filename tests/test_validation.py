"""External validation: the site's release, the metrics derived from it, the write-back.

The site's ``query.validate`` handler is called as Flower would call it (real ClientApp,
real ledger); the registry write-back runs against a real MLflow SQLite store.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from dp_consortium import write_experiment, write_site
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from typer.testing import CliRunner

from fedhealth.evaluation.histograms import release
from fedhealth.evaluation.metrics import derive

RULE = np.array([1.5, -1.0, 0.5, 0.0, 0.8])


def _model_and_arrays(cfg):
    from fedhealth.coordinator.federation import input_dim
    from fedhealth.models import build_model

    model = build_model(cfg.task_spec().model, input_dim(cfg), 2, 0)
    state = model.state_dict()
    weight = next(k for k, v in state.items() if v.ndim == 2)
    w = torch.zeros_like(state[weight])
    w[1] = torch.as_tensor(RULE * 0.7, dtype=w.dtype)  # a decent, imperfect model
    state[weight] = w
    model.load_state_dict(state)
    return model, {k: v.numpy() for k, v in state.items()}


def _validate(experiment: Path, split: str = "test", site_index: int = 0):
    """Call the site's validate handler; returns (reply, reference scores, labels)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedhealth.config.experiment import load_experiment
    from fedhealth.config.site import load_site
    from fedhealth.protocol import MessageKind, NormStats, RoundConfig
    from fedhealth.site.client_app import validate
    from fedhealth.site.dataset import load_site_data

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cfg = load_experiment(experiment)
    model, arrays = _model_and_arrays(cfg)
    profile = load_site(cfg.experiment.sites[site_index])
    data = load_site_data(profile, cfg.task_spec().task)
    mean, std = data.x_train.mean(0), data.x_train.std(0) + 1e-6
    norm = NormStats(mean=mean.tolist(), std=std.tolist())
    config = ConfigRecord(RoundConfig(cfg.task_spec(), server_round=1, norm_stats=norm).to_record())
    content = {
        "config": config,
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "validation": ConfigRecord({"split": split}),
    }
    msg = Message(RecordDict(content), dst_node_id=1, message_type=MessageKind.VALIDATE)
    context = Context(
        run_id=1, node_id=1, state=RecordDict(), run_config={},
        node_config={"profile": str(cfg.experiment.sites[site_index]), "site-index": site_index},
    )  # fmt: skip
    reply = validate(msg, context)
    # The reference: the same model on the same rows, standardised the same way.
    x, y = (
        (data.x_test, data.y_test)
        if split == "test"
        else (
            np.concatenate([data.x_train, data.x_test]),
            np.concatenate([data.y_train, data.y_test]),
        )
    )
    with torch.no_grad():
        z = torch.as_tensor(((x - mean) / std).astype(np.float32))
        scores = torch.softmax(model.eval()(z), 1)[:, 1].numpy().astype(np.float64)
    return reply, scores, y


def _release(reply) -> dict:
    assert not reply.has_error(), reply.error.reason
    return json.loads(str(reply.content["validation"]["release"]))


def test_auroc_from_released_histograms_agrees_with_scikit_learn(tmp_path):
    sites = [write_site(tmp_path, f"h{i}", n=400, seed=i) for i in range(2)]
    exp = write_experiment(tmp_path, sites, name="val-study")
    releases, scores, labels = {}, [], []
    for i in range(2):
        reply, s, y = _validate(exp, split="all", site_index=i)
        releases[f"h{i}"] = _release(reply)
        scores.append(s)
        labels.append(y)
        assert releases[f"h{i}"]["n"] == len(y) == 400
    d = derive(releases)
    for i, site in enumerate(("h0", "h1")):
        assert abs(d[site]["auroc"]["value"] - roc_auc_score(labels[i], scores[i])) < 0.01
    s, y = np.concatenate(scores), np.concatenate(labels)
    pooled = d["pooled"]
    assert abs(pooled["auroc"]["value"] - roc_auc_score(y, s)) < 0.01
    assert pooled["auroc"]["low"] < roc_auc_score(y, s) < pooled["auroc"]["high"]
    assert abs(pooled["auprc"]["value"] - average_precision_score(y, s)) < 0.02
    assert abs(pooled["brier"]["value"] - brier_score_loss(y, s)) < 0.0025
    assert abs(pooled["accuracy"]["value"] - ((s >= 0.5) == y).mean()) < 1e-9
    assert abs(pooled["sensitivity"]["value"] - (s[y == 1] >= 0.5).mean()) < 1e-9


def test_the_reply_carries_no_per_patient_value(tmp_path):
    site = write_site(tmp_path, "h0", n=300, seed=3)
    exp = write_experiment(tmp_path, [site], name="val-study", min_sites=1)
    reply, scores, labels = _validate(exp)
    assert set(reply.content.keys()) == {"validation", "metrics", "site"}
    assert "arrays" not in reply.content  # no model, no array of any kind
    rel = _release(reply)
    assert set(rel) == {"bins", "n", "pos", "neg", "noise_std"}
    assert len(rel["pos"]) == len(rel["neg"]) == rel["bins"]
    # Only counts: every released number is a whole count, never a record's score.
    assert all(float(v).is_integer() for v in rel["pos"] + rel["neg"])
    assert sum(rel["pos"]) + sum(rel["neg"]) == rel["n"]
    assert not set(np.round(scores, 9)) & set(np.round(rel["pos"] + rel["neg"], 9))
    assert set(dict(reply.content["metrics"])) == {"num-examples"}
    assert rel["n"] == len(labels) < 300  # the test split, not every record


def test_a_dp_release_is_noised_and_charged_to_the_ledger(tmp_path):
    from fedhealth.config.site import load_site
    from fedhealth.privacy.dp.ledger import PrivacyLedger

    site = write_site(tmp_path, "h0", n=600, seed=4, policy={"release_metrics": "dp"})
    exp = write_experiment(tmp_path, [site], name="val-study", min_sites=1)
    reply, scores, labels = _validate(exp, split="all")
    rel = _release(reply)
    assert rel["noise_std"] > 0 and rel["bins"] == 20
    metrics = dict(reply.content["metrics"])
    assert metrics["epsilon"] > 0
    with PrivacyLedger(load_site(site).ledger_path) as ledger:
        entries = ledger.entries()
    assert len(entries) == 1 and entries[0].experiment == "val-study"
    d = derive({"h0": rel})["h0"]["auroc"]
    assert d["low"] - 0.05 < roc_auc_score(labels, scores) < d["high"] + 0.05


def test_a_site_that_withholds_metrics_refuses(tmp_path):
    site = write_site(tmp_path, "h0", n=300, seed=5, policy={"release_metrics": "withheld"})
    exp = write_experiment(tmp_path, [site], name="val-study", min_sites=1)
    reply, _, _ = _validate(exp)
    assert reply.has_error() and '"rule": "release_metrics"' in reply.error.reason


def test_histogram_metrics_match_scikit_learn_on_many_draws():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 300)
        s = 1 / (1 + np.exp(-(rng.normal(1.0, 0.5) * (2 * y - 1) + rng.normal(0, 1.5, 300))))
        d = derive({"a": release(s, y)}, replicates=50)["a"]
        assert abs(d["auroc"]["value"] - roc_auc_score(y, s)) < 0.01


@pytest.fixture
def registered(tmp_path):
    """A registered version with a model card, in a real MLflow SQLite store."""
    from fedhealth.registry.store import use_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = use_store(uri)
    client.create_registered_model("heart")
    with mlflow.start_run() as run:
        mlflow.log_text("x", "model/placeholder.txt")
    client.create_model_version(
        "heart", f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
        description="# heart — global model\n\n## Metrics\n\nas trained",
    )  # fmt: skip
    return uri


def _result(sites: list[str], seed: int):
    from fedhealth.evaluation.result import ValidationResult

    rng = np.random.default_rng(seed)
    releases = {}
    for site in sites:
        y = rng.integers(0, 2, 200)
        s = 1 / (1 + np.exp(-((2 * y - 1) + rng.normal(0, 1, 200))))
        releases[site] = release(s, y)
    return ValidationResult(
        model="heart", version="1", experiment="heart-v1-validation", split="all",
        threshold=0.5, metrics=derive(releases, replicates=100), releases=releases, epsilon={},
    )  # fmt: skip


def test_two_validations_are_both_listed_in_the_card_and_models_show(registered):
    from fedhealth.cli.main import app
    from fedhealth.registry.store import use_store
    from fedhealth.registry.validation_record import record_validation

    first = record_validation(registered, _result(["va"], 1))
    card_after_first = use_store(registered).get_model_version("heart", "1").description
    second = record_validation(registered, _result(["hungarian", "switzerland"], 2))
    mv = use_store(registered).get_model_version("heart", "1")
    card = mv.description
    assert card.startswith(card_after_first.rstrip("\n"))  # the history is never rewritten
    assert card.count("## External validation") == 1
    assert "### Validation 1: va" in card and "### Validation 2: hungarian, switzerland" in card
    assert mv.tags["validations"] == "2"
    assert mv.tags["validation/1/run_id"] == first and mv.tags["validation/2/run_id"] == second
    assert "validation/2/auroc/switzerland" in mv.tags
    run = mlflow.get_run(second)
    assert run.data.tags["fedhealth.validated_model"] == "heart"
    assert run.data.tags["fedhealth.validated_version"] == "1"
    assert "pooled/auroc" in run.data.metrics
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(second, "plots")}
    assert arts == {"plots/roc.png", "plots/calibration.png"}
    out = CliRunner().invoke(
        app, ["models", "show", "heart", "1", "--tracking-uri", registered],
        env={"COLUMNS": "250"},
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "external validations" in out.output
    assert first in out.output and second in out.output
    assert "Validation 1: va" in out.output and "Validation 2: hungarian" in out.output


def _binned(scores: np.ndarray, labels: np.ndarray, bins: int = 100):
    k = np.minimum((scores * bins).astype(int), bins - 1)
    pos = np.bincount(k[labels == 1], minlength=bins).astype(np.float64)
    neg = np.bincount(k[labels == 0], minlength=bins).astype(np.float64)
    return pos, neg


def _reference_calibration(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """scikit-learn's unpenalised logistic regression of the label on the bins' logits."""
    from sklearn.linear_model import LogisticRegression

    centre = (np.arange(pos.size) + 0.5) / pos.size
    x = np.log(centre / (1 - centre))
    keep = np.concatenate([pos, neg]) > 0
    fit = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(
        np.concatenate([x, x])[keep, None],
        np.concatenate([np.ones(pos.size), np.zeros(neg.size)])[keep],
        sample_weight=np.concatenate([pos, neg])[keep],
    )
    return float(fit.intercept_[0]), float(fit.coef_[0, 0])


def test_calibration_fit_matches_scikit_learn_on_extreme_scores():
    """Overconfident, shifted scores (a held-out centre's): plain Newton from the identity
    overshot and returned NaN on most of these draws; the step-halving fit agrees with
    scikit-learn on every one."""
    from fedhealth.evaluation.metrics import figures

    rng = np.random.default_rng(7)
    checked = 0
    while checked < 25:
        n, prevalence = int(rng.integers(30, 300)), rng.uniform(0.05, 0.95)
        y = (rng.random(n) < prevalence).astype(int)
        z = rng.normal(rng.uniform(0.3, 3), 1, n) * (2 * y - 1) * rng.uniform(0.5, 4)
        pos, neg = _binned(1 / (1 + np.exp(-(z + rng.normal(0, rng.uniform(0, 3))))), y)
        ip, ineg = np.flatnonzero(pos), np.flatnonzero(neg)
        if not ip.size or not ineg.size or ineg.max() <= ip.min() or ip.max() <= ineg.min():
            continue  # separated: no finite fit (the next test)
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            f = figures(pos, neg)
        a, b = _reference_calibration(pos, neg)
        assert f["calibration_intercept"] == pytest.approx(a, rel=1e-4, abs=1e-4)
        assert f["calibration_slope"] == pytest.approx(b, rel=1e-4, abs=1e-4)
        checked += 1


def test_calibration_is_undefined_when_the_classes_are_separated():
    from fedhealth.evaluation.metrics import figures

    pos, neg = np.zeros(100), np.zeros(100)
    pos[[60, 80, 95]], neg[[10, 60]] = [5, 20, 20], [30, 1]  # quasi-complete: bin 60 shared
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        f = figures(pos, neg)
    assert np.isnan(f["calibration_slope"]) and np.isnan(f["calibration_intercept"])
    assert f["auroc"] > 0.99  # the other figures stay defined
    neg[61] = 1  # one negative above a positive: the fit exists again
    a, b = _reference_calibration(pos, neg)
    f = figures(pos, neg)
    assert f["calibration_slope"] == pytest.approx(b, rel=1e-4)
    assert f["calibration_intercept"] == pytest.approx(a, rel=1e-4, abs=1e-4)


def test_several_studies_curves_share_a_figure_without_a_pooled_curve():
    """Leave-one-centre-out draws each fold's held-out centre in one ROC and one calibration
    figure: different models, so no pooled curve (and no ``pooled`` metrics needed)."""
    from PIL import Image

    from fedhealth.registry.report import roc_calibration_plots

    results = {c: _result([c], seed) for seed, c in enumerate(("cleveland", "va"), start=3)}
    releases = {c: r.releases[c] for c, r in results.items()}
    metrics = {c: r.metrics[c] for c, r in results.items()}
    pngs = roc_calibration_plots(
        releases, metrics, pooled=False, labels={"va": "va held out"}, titles={"roc": "LOCO"}
    )
    assert set(pngs) == {"roc", "calibration"}
    for png in pngs.values():
        assert Image.open(io.BytesIO(png)).format == "PNG"
