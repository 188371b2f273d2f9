"""The catalogues: adding a model, a reader or a strategy touches only its own module.

The fixture below registers one of each from this test module, exactly as a new file in
``fedhealth/models/``, ``fedhealth/data/`` or ``fedhealth/strategies/`` would; validation,
the site's data loading and the generated docs then accept and list them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, FedMedian
from pydantic import BaseModel, ConfigDict, Field

from fedhealth.catalogue import MODELS, PROXIMAL, READERS, STRATEGIES, WEIGHTED_MEAN
from fedhealth.config.experiment import load_experiment_with_sites
from fedhealth.config.reference import render_reference
from fedhealth.config.site import DataSourceBase, load_site
from fedhealth.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


class TinyOptions(BaseModel):
    """Options of ``tiny_linear``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bias: bool = Field(True, description="Whether the layer has a bias.")


def tiny_linear(n_features: int, num_classes: int, bias: bool) -> Any:
    """A single linear layer (a test model)."""
    from torch import nn

    return nn.Linear(n_features, num_classes, bias=bias)


class JsonLinesSource(DataSourceBase):
    """A JSON-lines file of records (a test reader)."""

    kind: Literal["jsonl"] = Field(description="One JSON object per line.")
    path: Path = Field(description="The .jsonl file.")
    label: str = Field("y", description="Key of the label.")


def read_jsonl(source: JsonLinesSource, task: dict[str, Any]) -> Any:
    """Read the numeric features the task's schema names, and the label."""
    rows = [json.loads(line) for line in source.path.read_text().splitlines() if line]
    cols = list(task["schema"]["numeric"])
    x = np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float32)
    return x, np.array([int(r[source.label]) for r in rows]), cols, []


class EveryOtherFedAvg(FedAvg):
    """FedAvg under another name (a test strategy)."""


@pytest.fixture
def added():
    """Register one model, reader and strategy for the test only."""
    with MODELS.temporarily(), READERS.temporarily(), STRATEGIES.temporarily():
        MODELS.register("tiny_linear", traits={"tabular"}, options=TinyOptions)(tiny_linear)
        READERS.register("jsonl", traits={"tabular"}, options=JsonLinesSource, imports=("json",))(
            read_jsonl
        )
        STRATEGIES.register("fedavg_again", traits={WEIGHTED_MEAN})(EveryOtherFedAvg)
        yield
    assert "tiny_linear" not in MODELS and "jsonl" not in READERS


def _write(tmp: Path, model: str, strategy: str, extra: str = "") -> Path:
    rows = [{"a": i, "b": i % 3, "y": i % 2} for i in range(16)]
    for name in ("h1", "h2"):
        (tmp / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (tmp / f"{name}.toml").write_text(
            f'[site]\nname = "{name}"\n[datasets.table]\nkind = "jsonl"\npath = "{name}.jsonl"\n'
        )
    path = tmp / "exp.toml"
    path.write_text(
        '[experiment]\nname = "exp"\nsites = ["h1.toml", "h2.toml"]\nrounds = 1\n'
        '[task]\ndataset = "table"\nkind = "tabular"\n'
        '[task.schema]\nnumeric = ["a", "b"]\nlabel = "y"\n'
        f'[model]\nname = "{model}"\nbias = false\n'
        f'[strategy]\nname = "{strategy}"\n{extra}'
    )
    return path


def test_a_registered_model_reader_and_strategy_are_validated_used_and_documented(added, tmp_path):
    from fedhealth.coordinator.strategies import build_strategy
    from fedhealth.models import build_model
    from fedhealth.protocol import RoundConfig
    from fedhealth.site.client_app import modules_for
    from fedhealth.site.dataset import load_site_data
    from fedhealth.site.request import SiteRequest

    cfg, sites = load_experiment_with_sites(_write(tmp_path, "tiny_linear", "fedavg_again"))
    assert cfg.model.options() == {"bias": False}
    assert isinstance(build_strategy(cfg), EveryOtherFedAvg)
    spec = cfg.task_spec()
    model = build_model(spec.model, 2, 2, seed=0)
    assert model.bias is None and model.in_features == 2

    data = load_site_data(sites[0], spec.task)  # the site reads through the catalogue
    assert data.n_train + data.n_test == 16 and data.feature_names == ["a", "b"]
    request = SiteRequest(RoundConfig(spec, server_round=1))
    assert modules_for(sites[0], request, training=False) == ["fedhealth.site.runtime", "json"]

    docs = render_reference()
    assert '`[model] name = "tiny_linear"` (tabular)' in docs
    assert "| `bias` | bool | `True` | Whether the layer has a bias. |" in docs
    assert '### `[datasets.<name>] kind = "jsonl" []`' in docs
    assert "| `fedavg_again` | yes | no |" in docs


def test_options_of_a_registered_model_are_checked(added, tmp_path):
    path = _write(tmp_path, "tiny_linear", "fedavg")
    path.write_text(path.read_text().replace("bias = false", 'bias = "maybe"\nhidden = [4]'))
    with pytest.raises(ConfigError, match=r"key `model`: model 'tiny_linear': `bias`") as err:
        load_experiment_with_sites(path)
    assert "`hidden`: unknown key" in str(err.value)


def test_unknown_names_list_what_the_catalogue_holds(tmp_path):
    site = tmp_path / "s.toml"
    site.write_text('[site]\nname = "s"\n[datasets.t]\nkind = "fhir7"\npath = "x"\n')
    with pytest.raises(ConfigError, match=r"datasets.t`: unknown dataset kind 'fhir7'; choose"):
        load_site(site)
    site.write_text('[site]\nname = "s"\n[datasets.t]\nkind = "dicom"\n')
    with pytest.raises(ConfigError, match=r"dataset kind 'dicom': `path`: required key"):
        load_site(site)


def test_the_shipped_docs_are_the_catalogues(tmp_path):
    text = (ROOT / "docs" / "config-reference.md").read_text()
    assert text == render_reference()
    for name in MODELS.names() + STRATEGIES.names():
        assert f"{name}" in text
    assert MODELS.names("tabular") == ["logistic_regression", "mlp"]
    assert set(READERS.names("image")) >= {"dicom", "images", "npz"}


def test_strategy_traits_decide_where_it_may_run(tmp_path):
    from fedhealth.coordinator.strategies import strategy_class, strategy_traits
    from fedhealth.strategies import refusal

    assert PROXIMAL in STRATEGIES.get("fedprox").traits
    assert refusal("fedprox", STRATEGIES.get("fedprox").traits, {}, he=False, dp_mode="record")
    assert refusal("krum", STRATEGIES.get("krum").traits, {}, he=True, dp_mode=None)
    assert refusal("fedavg", {WEIGHTED_MEAN}, {"proximal_mu": 0.1}, he=False, dp_mode="site")
    assert refusal("fedavg", {WEIGHTED_MEAN}, {}, he=True, dp_mode="site") is None

    balanced = f"{ROOT / 'strategies' / 'balanced_fedavg.py'}:BalancedFedAvg"
    assert strategy_traits(balanced, strategy_class(balanced)) == {WEIGHTED_MEAN}

    class MedianPretendingMean(FedMedian):
        weighted_mean_aggregation = True  # a class may declare its traits

    class ProxLike(FedAvg):
        proximal_term = True

    assert strategy_traits("x.py:M", MedianPretendingMean) == {WEIGHTED_MEAN}
    assert strategy_traits("x.py:P", ProxLike) == {WEIGHTED_MEAN, PROXIMAL}

    class OwnAggregate(FedAvg):
        def aggregate_train(self, *a: Any, **k: Any) -> Any:  # not a weighted mean any more
            return super().aggregate_train(*a, **k)

    assert strategy_traits("x.py:O", OwnAggregate) == frozenset()


def test_reading_the_catalogues_imports_no_engine():
    """Config validation knows every name and trait without torch, pandas or Flower."""
    code = (
        "import sys\n"
        "from fedhealth.catalogue import MODELS, READERS, STRATEGIES\n"
        "import fedhealth.config.reference\n"
        "names = MODELS.names() + READERS.names() + STRATEGIES.names()\n"
        "heavy = ['torch', 'pandas', 'flwr', 'pydicom', 'PIL', 'monai', 'opacus']\n"
        "print([m for m in heavy if m in sys.modules], len(names))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("[] "), out
