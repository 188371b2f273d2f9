"""strategies/balanced_fedadam.py: site weights and the published (tail-averaged) model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedhealth.catalogue import WEIGHTED_MEAN
from fedhealth.coordinator.strategies import (
    load_strategy_state,
    strategy_class,
    strategy_state,
    strategy_traits,
)
from fedhealth.protocol import Metric

ROOT = Path(__file__).resolve().parents[1]
REF = f"{ROOT / 'strategies' / 'balanced_fedadam.py'}:BalancedFedAdam"


def _reply(arrays: dict[str, np.ndarray], weight: float) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # as test_protocol
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({Metric.SITE_WEIGHT: weight}),
        }
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


Model = dict[str, np.ndarray]


def _run(strategy, rounds: int, seed: int = 0) -> tuple[list[Model], list[Model]]:
    """Drive ``rounds`` rounds of aggregation with random site updates: every round's global
    model as the strategy returned it, and the model it published after that round."""
    rng = np.random.default_rng(seed)
    arrays = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(2))})
    models, published = [], []
    for r in range(1, rounds + 1):
        strategy.current_arrays = {k: a.numpy() for k, a in arrays.items()}  # configure_train's
        replies = [
            _reply({k: a.numpy() + rng.normal(size=a.numpy().shape) for k, a in arrays.items()}, w)
            for w in (1.0, 3.0)
        ]
        new, _ = strategy.aggregate_train(r, replies)
        assert new is not None
        arrays = new
        models.append({k: a.numpy().copy() for k, a in new.items()})
        shown = strategy.published_arrays(r, new)
        published.append({k: a.numpy().copy() for k, a in shown.items()})
    return models, published


def _strategy(**options):
    return strategy_class(REF)(**options)


def test_average_last_publishes_the_mean_of_the_last_global_models() -> None:
    strategy = _strategy(alpha=1.0, eta=0.1, average_last=3)
    models, published = _run(strategy, 6)
    for r in range(1, 7):  # after round r: the mean of rounds max(1, r-2)..r
        tail = models[max(0, r - 3) : r]
        for name in ("w", "b"):
            expected = np.mean([m[name] for m in tail], axis=0)
            np.testing.assert_allclose(published[r - 1][name], expected, rtol=1e-6)
            assert published[r - 1][name].dtype == models[r - 1][name].dtype
    assert not np.allclose(published[-1]["w"], models[-1]["w"])  # not just the last model
    # Training goes on from FedAdam's own iterate, not from the published mean.
    assert sorted({k.split("/")[0] for k in strategy.recent_arrays}) == ["4", "5", "6"]


def test_average_last_one_is_fedadam_unchanged() -> None:
    plain, averaged = _strategy(alpha=0.5), _strategy(alpha=0.5, average_last=4)
    (a, shown), (b, _) = _run(plain, 5), _run(averaged, 5)
    for x, y in zip(a, b, strict=True):  # the same global models: averaging never feeds back
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])
    for m, p in zip(a, shown, strict=True):
        np.testing.assert_array_equal(m["w"], p["w"])
    assert plain.recent_arrays == {}


def test_the_tail_survives_a_checkpoint() -> None:
    """The kept models are strategy state (a dict of arrays), so a resumed run publishes
    the same mean."""
    strategy = _strategy(average_last=2)
    models, _ = _run(strategy, 3)
    state = strategy_state(strategy)
    assert "recent_arrays" in state
    fresh = _strategy(average_last=2)
    load_strategy_state(fresh, state)
    last = ArrayRecord({k: Array(v) for k, v in models[-1].items()})
    got = fresh.published_arrays(3, last)
    np.testing.assert_allclose(got["w"].numpy(), (models[-2]["w"] + models[-1]["w"]) / 2, rtol=1e-6)


def test_it_stays_a_weighted_mean_strategy() -> None:
    """Keeping a copy of the aggregate does not make it need individual updates: encrypted
    aggregation and site-level DP accept it."""
    assert WEIGHTED_MEAN in strategy_traits(REF, strategy_class(REF))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_average_last_must_be_a_positive_integer(bad) -> None:
    with pytest.raises(ValueError, match="average_last"):
        strategy_class(REF)(average_last=bad)


def test_the_coordinator_evaluates_and_registers_the_published_model() -> None:
    """Federation.published asks the strategy; a strategy without the hook publishes the
    round's global model."""
    from fedhealth.coordinator.federation import Federation

    class Fake:
        pass

    fed = Federation.__new__(Federation)
    arrays = ArrayRecord({"w": Array(np.ones(2))})
    fed.strategy = Fake()  # type: ignore[assignment]
    assert fed.published(3, arrays) is arrays
    strategy = _strategy(average_last=2)
    models, _ = _run(strategy, 2)
    fed.strategy = strategy
    last = ArrayRecord({k: Array(v) for k, v in models[-1].items()})
    got = fed.published(2, last)
    np.testing.assert_allclose(got["b"].numpy(), (models[0]["b"] + models[1]["b"]) / 2)
