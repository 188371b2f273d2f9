"""The coordinator takes the sites' plaintext training replies as they are allowed to differ,
and refuses the ones it cannot use: a faulty or hostile site cannot stop a round.

Real site ClientApps in this process (``dp_consortium.LocalGrid``), a real MLflow SQLite store.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, MetricRecord, RecordDict

sys.path.insert(0, str(Path(__file__).parent))
from dp_consortium import LocalGrid, write_experiment, write_site

from fedhealth.config.experiment import load_experiment
from fedhealth.coordinator.federation import Federation
from fedhealth.envelope import open_envelope


def _run(root: Path, policies: dict[str, dict], rounds: int = 2):
    sites = [
        write_site(root, name, 240, i, policy=p) for i, (name, p) in enumerate(policies.items())
    ]
    exp = write_experiment(root, sites, rounds=rounds, min_sites=len(sites))
    return Federation(load_experiment(exp), f"sqlite:///{root / 'mlflow.db'}").run(LocalGrid(exp))


def test_sites_with_different_metric_policies_train_together(tmp_path):
    """Exact, DP-noised and withheld metrics give replies with different metric keys; the
    round aggregates all three (Flower's strategies refuse replies whose keys differ)."""
    policies = {
        "h1": {"release_metrics": "exact"},
        "h2": {"release_metrics": "dp"},
        "h3": {"release_metrics": "withheld"},
    }
    summary = _run(tmp_path, policies, rounds=2)
    assert summary.version is not None and not summary.refusals
    assert set(summary.site_metrics) == {"h1", "h2", "h3"}
    assert "loss-noise-std" in summary.site_metrics["h2"]
    assert "accuracy" not in summary.site_metrics["h3"]


class _TamperingGrid(LocalGrid):
    """Site h2 replies to training with a broken update (what a faulty or hostile site can
    send): the coordinator must refuse that reply and go on with the others."""

    def __init__(self, experiment: Path, tamper) -> None:
        super().__init__(experiment)
        self.tamper = tamper

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        for reply in replies:
            train = reply.metadata.message_type == "train" and not reply.has_error()
            if train and reply.metadata.src_node_id == 2:
                reply.content = open_envelope(reply.content)  # a site tampers before sealing
                self.tamper(reply.content)
        return replies


def _nan_update(content: RecordDict) -> None:
    arrays = content["arrays"]
    key = next(iter(arrays))
    bad = arrays[key].numpy().copy()
    bad.flat[0] = np.nan
    arrays[key] = Array(bad)


def _no_weight(content: RecordDict) -> None:
    content["metrics"] = MetricRecord(
        {k: v for k, v in content["metrics"].items() if k != "num-examples"}
    )


def _wrong_shape(content: RecordDict) -> None:
    arrays = content["arrays"]
    key = next(iter(arrays))
    arrays[key] = Array(np.zeros(3, dtype=np.float32))


@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        (_nan_update, "NaN or infinity"),
        (_no_weight, "`num-examples`"),
        (_wrong_shape, "differ from the global model's"),
    ],
)
def test_a_malformed_update_is_refused_and_the_round_goes_on(tmp_path, tamper, says):
    exact = {"release_metrics": "exact"}
    sites = [
        write_site(tmp_path, n, 240, i, policy=exact) for i, n in enumerate(("h1", "h2", "h3"))
    ]
    exp = write_experiment(tmp_path, sites, rounds=1, min_sites=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = Federation(load_experiment(exp), uri).run(_TamperingGrid(exp, tamper))
    assert summary.version is not None
    (refusal,) = summary.refusals
    assert (refusal.site, refusal.rule, refusal.round) == ("h2", "malformed-reply", 1)
    assert says in refusal.message
