"""The model zoo: every model builds by name, predicts, and is DP-safe (no BatchNorm)."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from fedhealth.errors import ConfigError
from fedhealth.models import build_model, model_names
from fedhealth.models.standardize import Standardize

SPEC = {"hidden": [16, 8], "channels": [8, 16], "groups": 4, "dropout": 0.1}
CASES = [
    ("logistic_regression", 13, (5, 13)),
    ("mlp", 13, (5, 13)),
    ("small_cnn", 1, (5, 1, 32, 32)),
    ("densenet121", 1, (2, 1, 32, 32)),
    ("resnet18", 1, (2, 1, 32, 32)),
]


def test_every_name_is_covered():
    assert sorted(n for n, _, _ in CASES) == model_names()


@pytest.mark.parametrize(("name", "dim", "shape"), CASES)
def test_model_builds_predicts_and_has_no_batchnorm(name, dim, shape):
    model = build_model({"name": name, **SPEC}, dim, 3, seed=0)
    model.eval()
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], 3)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model.train()
    assert ModuleValidator.validate(model, strict=False) == []


def test_same_seed_same_weights_other_seed_other_weights():
    a = build_model({"name": "mlp", **SPEC}, 10, 2, seed=1).state_dict()
    b = build_model({"name": "mlp", **SPEC}, 10, 2, seed=1).state_dict()
    c = build_model({"name": "mlp", **SPEC}, 10, 2, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="choose one of"):
        build_model({"name": "transformer"}, 3, 2, seed=0)


def test_standardize_layer_matches_manual_zscore():
    layer = Standardize({"mean": [1.0, -2.0], "std": [2.0, 0.5]})
    x = torch.tensor([[3.0, -1.0]])
    assert torch.allclose(layer(x), torch.tensor([[1.0, 2.0]]))
    img = torch.ones(1, 2, 4, 4)
    assert torch.allclose(layer(img)[0, 1], torch.full((4, 4), 6.0))
