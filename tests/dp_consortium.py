"""A small synthetic consortium for the DP tests, and a driver of the site's train handler.

The sites' tables are written by numpy (a noisy linear rule over five features), so the
tests need no shared data. :func:`train_round` drives the site exactly as Flower does:
it builds the coordinator's training message and calls the ClientApp's ``train``
handler (``fedhealth.site.client_app.train``) in this process.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = ["a", "b", "c", "d", "e"]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _table(name: str, values: dict[str, Any]) -> str:
    body = "\n".join(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
    return f"[{name}]\n{body}\n"


#: The synthetic tables hold no patients: their sites release exact metrics and accept small
#: splits, so the DP tests account DP-SGD alone (``tests/test_site_splits.py`` tests both rules).
SYNTHETIC = {"release_metrics": "exact", "min_split_records": 1}


def write_site(
    root: Path,
    name: str,
    n: int,
    seed: int,
    policy: dict[str, Any] | None = None,
    synthetic: bool = True,
) -> Path:
    """Write ``root/<name>.toml`` and its table of ``n`` records; returns the profile path.

    ``synthetic`` adds :data:`SYNTHETIC` under ``policy``; without it the site keeps the
    defaults of a hospital (metrics under DP, at least 50 records per split)."""
    policy = ({**SYNTHETIC, **(policy or {})} if synthetic else policy) or None
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    y = (x @ np.array([1.5, -1.0, 0.5, 0.0, 0.8]) + rng.normal(scale=0.5, size=n) > 0).astype(int)
    lines = [",".join([*FEATURES, "y"])]
    lines += [
        ",".join([*(f"{v:.5f}" for v in row), str(label)]) for row, label in zip(x, y, strict=True)
    ]
    (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
    text = _table("site", {"name": name, "workspace": "workspace"})
    text += "\n" + _table("datasets.table", {"kind": "tabular", "path": f"{name}.csv"})
    if policy:
        text += "\n" + _table("privacy", policy)
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


def write_experiment(
    root: Path,
    sites: list[Path],
    *,
    name: str = "dp-study",
    rounds: int = 3,
    min_sites: int = 2,
    training: dict[str, Any] | None = None,
    dp: dict[str, Any] | None = None,
    strategy: str = "fedavg",
    filename: str | None = None,
) -> Path:
    """Write an experiment over ``sites`` (logistic regression, site normalisation)."""
    text = _table(
        "experiment",
        {
            "name": name,
            "sites": [str(p) for p in sites],
            "rounds": rounds,
            "min_sites": min_sites,
            "seed": 1,
        },
    )
    text += "\n" + _table(
        "task",
        {"dataset": "table", "kind": "tabular", "test_fraction": 0.25, "normalisation": "site"},
    )
    text += "\n" + _table("task.schema", {"numeric": FEATURES, "label": "y"})
    text += "\n" + _table("model", {"name": "logistic_regression"})
    text += "\n" + _table(
        "training",
        {"batch_size": 16, "local_epochs": 1, "optimizer": "sgd", "learning_rate": 0.2}
        | (training or {}),
    )
    text += "\n" + _table("strategy", {"name": strategy})
    if dp is not None:
        text += "\n" + _table("privacy.dp", {"enabled": True, "delta": 1e-3} | dp)
    path = root / (filename or f"{name}.toml")
    path.write_text(text)
    return path


def train_round(
    experiment: Path,
    site_index: int,
    round_: int,
    arrays: dict[str, np.ndarray] | None = None,
    config_extra: dict[str, Any] | None = None,
):
    """Call the site's ClientApp train handler for one round, as Flower would
    (``config_extra``: more keys of the training config, e.g. ``mlflow-run-id``).

    Returns
    -------
    (Message, dict)
        The reply and the global arrays that were sent.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedhealth.config.experiment import load_experiment
    from fedhealth.coordinator.federation import input_dim
    from fedhealth.models import build_model
    from fedhealth.protocol import RoundConfig
    from fedhealth.site.client_app import train

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cfg = load_experiment(experiment)
    if arrays is None:
        model = build_model(cfg.task_spec().model, input_dim(cfg), 2, cfg.experiment.seed)
        arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    config = ConfigRecord(
        RoundConfig(cfg.task_spec(), server_round=round_).to_record() | (config_extra or {})
    )
    msg = Message(
        RecordDict(
            {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "config": config}
        ),
        dst_node_id=site_index + 1,
        message_type=MessageType.TRAIN,
    )
    profile = str(cfg.experiment.sites[site_index])
    context = Context(
        run_id=1,
        node_id=site_index + 1,
        node_config={"profile": profile, "site-index": site_index},
        state=RecordDict(),
        run_config={},
    )
    return train(msg, context), arrays


def reply_metrics(reply) -> dict[str, float]:
    """The metrics of a successful train reply."""
    assert not reply.has_error(), reply.error.reason
    return dict(reply.content["metrics"])


def refusal(reply) -> dict[str, str]:
    """The ``{"site", "rule", "message"}`` of an error reply."""
    assert reply.has_error(), "expected a refusal"
    return json.loads(reply.error.reason)


class LocalGrid:
    """A Flower ``Grid`` that hands each message to the site's ClientApp in this process.

    Only for tests: it lets the coordinator's ``Federation`` drive real site code without
    Ray, one site after another. Node ``i + 1`` is the experiment's ``i``-th site.
    """

    def __init__(self, experiment: Path) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        from fedhealth.config.experiment import load_experiment

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.profiles = [str(p) for p in load_experiment(experiment).experiment.sites]

    def get_node_ids(self):
        return list(range(1, len(self.profiles) + 1))

    def push_messages(self, messages):
        """Run each message's ClientApp at once; its reply waits for :meth:`pull_messages`."""
        from flwr.app import Context, RecordDict

        from fedhealth.site.client_app import app

        self._replies = getattr(self, "_replies", {})
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex  # what a SuperLink assigns; the reply refers to it
            msg.metadata.__dict__["_message_id"] = mid
            i = msg.metadata.dst_node_id - 1
            context = Context(
                run_id=1,
                node_id=i + 1,
                node_config={"profile": self.profiles[i], "site-index": i},
                state=RecordDict(),
                run_config={},
            )
            self._replies[mid] = app(msg, context)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))
