"""Hostile input from the coordinator gets an error reply, never a crash and never ε
(issue 10, item 6): non-finite global models, resource caps, malformed specs.

Each test sends the real ClientApp handler what a hostile coordinator could send
(``dp_consortium.train_round``) and checks the refusal's rule, the site's ledger (no
charge) and its audit log (refused before data was read or a model was built).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dp_consortium import refusal, reply_metrics, train_round, write_experiment, write_site

from fedhealth.config.experiment import load_experiment
from fedhealth.config.site import load_site
from fedhealth.models import build_model
from fedhealth.protocol import ConfigKey, TrainingSection
from fedhealth.site.audit import audit_path, read
from fedhealth.site.limits import model_parameters

DP = {"noise_multiplier": 1.1}


def charges(site: Path) -> int:
    from fedhealth.privacy.dp.ledger import PrivacyLedger

    path = load_site(site).ledger_path
    if not path.exists():
        return 0
    with PrivacyLedger(path) as ledger:
        return len(ledger.entries())


def last_refusal(site: Path) -> dict:
    return [r for r in read(audit_path(load_site(site).workspace)) if r["event"] == "refused"][-1]


def global_model(exp: Path) -> dict[str, np.ndarray]:
    cfg = load_experiment(exp)
    model = build_model(cfg.task_spec().model, 5, 2, cfg.experiment.seed)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_global_model_is_refused_before_training_and_any_charge(tmp_path, bad):
    site = write_site(tmp_path, "h1", n=80, seed=0)
    exp = write_experiment(tmp_path, [site], min_sites=1, dp=DP)
    arrays = global_model(exp)
    name = sorted(arrays)[0]
    arrays[name].flat[1] = bad
    ref = refusal(train_round(exp, 0, 1, arrays=arrays)[0])
    assert ref["rule"] == "non-finite-model" and name in ref["message"]
    assert charges(site) == 0
    assert last_refusal(site)["timing"]["train_s"] == 0
    # The same site trains (and charges) a finite model.
    reply_metrics(train_round(exp, 0, 1)[0])
    assert charges(site) == 1


@pytest.mark.parametrize(
    ("training", "model", "rule"),
    [
        ({"local_epochs": 200}, None, "limits.max_local_epochs"),
        ({"batch_size": 100_000}, None, "limits.max_batch_size"),
        ({}, {"name": "mlp", "hidden": [4096, 4096]}, "limits.max_model_parameters"),
    ],
)
def test_requests_beyond_the_default_caps_are_refused_before_any_work(
    tmp_path, training, model, rule
):
    site = write_site(tmp_path, "h1", n=80, seed=0)
    exp = write_experiment(tmp_path, [site], min_sites=1, dp=DP, training=training)
    if model is not None:
        text = exp.read_text().replace('name = "logistic_regression"', 'name = "mlp"\nhidden = '
                                       + json.dumps(model["hidden"]))  # fmt: skip
        exp.write_text(text)
    cfg = load_experiment(exp)
    if model is not None:
        assert model_parameters(cfg.task_spec()) > 16_000_000  # counted without memory
    small = {k: np.zeros((1,), np.float32) for k in ("w",)}  # what is sent does not matter
    ref = refusal(train_round(exp, 0, 1, arrays=small)[0])
    assert ref["rule"] == rule and "site profile" in ref["message"]
    assert charges(site) == 0
    timing = last_refusal(site)["timing"]
    assert timing["load_s"] == 0 and timing["train_s"] == 0  # no data read, no model built


def test_a_sites_own_caps_refuse_steps_and_image_size(tmp_path):
    from fedhealth.protocol import TaskSpec
    from fedhealth.site.limits import LimitExceeded, check_local_steps, check_spec

    site = write_site(tmp_path, "h1", n=80, seed=0)
    with open(site, "a") as fh:
        fh.write("\n[limits]\nmax_local_steps = 3\nmax_image_size = 64\n")
    exp = write_experiment(tmp_path, [site], min_sites=1, dp=DP)
    ref = refusal(train_round(exp, 0, 1)[0])  # 60 records / batch 16 = 4 steps > 3
    assert ref["rule"] == "limits.max_local_steps" and charges(site) == 0
    profile = load_site(site)
    image = TaskSpec(
        experiment="img", task={"dataset": "x", "kind": "image", "image_size": 128},
        model={"name": "small_cnn"}, training={}, seed=0, rounds=1,
    )  # fmt: skip
    with pytest.raises(LimitExceeded) as err:
        check_spec(profile, image, training=True)
    assert err.value.rule == "limits.max_image_size"
    spec = load_experiment(exp).task_spec()
    check_local_steps(profile, spec.model_copy(update={"training": spec.training.model_copy(
        update={"max_steps": 3})}), 60)  # fmt: skip
    # A fixed step count is checked as it is: 4 fixed steps exceed the cap, whatever n.
    fixed = spec.model_copy(update={"training": TrainingSection(local_steps=4, batch_size=64)})
    with pytest.raises(LimitExceeded) as err:
        check_local_steps(profile, fixed, 10)
    assert err.value.rule == "limits.max_local_steps"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["model"].update(bogus=1), "spec.model"),
        (lambda d: d["training"].update(learning_rate=float("nan")), "spec"),
        (lambda d: d["dp"].update(noise_multiplier=-1.0), "spec.dp.noise_multiplier"),
        (lambda d: d["training"].update(local_epochs=0), "spec.training.local_epochs"),
        (lambda d: d.update(strategy={"name": "x", "code_sha256": "zz"}), "spec.strategy"),
    ],
)
def test_malformed_specs_are_refusals_with_no_charge(tmp_path, mutate, field):
    site = write_site(tmp_path, "h1", n=80, seed=0)
    exp = write_experiment(tmp_path, [site], min_sites=1, dp=DP)
    spec = json.loads(load_experiment(exp).task_spec().canonical_bytes())
    mutate(spec)
    text = json.dumps(spec, allow_nan=True)
    ref = refusal(train_round(exp, 0, 1, config_extra={ConfigKey.SPEC: text})[0])
    assert ref["rule"] == "protocol" and field in ref["message"]
    assert charges(site) == 0
