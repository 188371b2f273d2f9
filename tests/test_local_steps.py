"""`training.local_steps`: a fixed number of optimiser steps per round at every site.

FLamby's recipe for its federated clients: each centre runs the same number of SGD steps
whatever its size, cycling through its training split as often as needed. Under DP-SGD
every step is a Poisson batch and the plan, the site's limits and the ledger count each.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedhealth.privacy.dp.local import make_private, sample_rate, steps_per_epoch
from fedhealth.privacy.dp.plan import local_steps_per_round, plan_for_site
from fedhealth.protocol import TrainingSection
from fedhealth.site.trainer import train_local

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 2))


@pytest.mark.parametrize(("n", "batch", "steps"), [(10, 4, 7), (10, 4, 2), (30, 64, 5)])
def test_a_site_runs_exactly_local_steps_whatever_its_size(n, batch, steps):
    x, y = _data(n)
    spec = TrainingSection(local_steps=steps, batch_size=batch, learning_rate=0.1)
    result = train_local(_model(), x, y, spec, seed=0)
    assert result.steps == steps == spec.steps_per_round(math.ceil(n / batch))


def test_local_steps_cycle_the_split_like_epochs():
    """Steps beyond one pass continue with the next shuffled pass: 2 epochs of 3 batches are
    the same 6 updates as 6 fixed steps."""
    x, y = _data(10)
    by_epochs, by_steps = _model(), _model()
    train_local(by_epochs, x, y, TrainingSection(local_epochs=2, batch_size=4), seed=3)
    train_local(by_steps, x, y, TrainingSection(local_steps=6, batch_size=4), seed=3)
    for a, b in zip(by_epochs.parameters(), by_steps.parameters(), strict=True):
        assert torch.equal(a, b)


def test_local_steps_exclude_epochs_and_a_cap():
    with pytest.raises(ValidationError, match="local_steps"):
        TrainingSection(local_steps=5, local_epochs=2)
    with pytest.raises(ValidationError, match="local_steps"):
        TrainingSection(local_steps=5, max_steps=3)
    with pytest.raises(ValidationError):
        TrainingSection(local_steps=0)
    assert TrainingSection(local_epochs=3, max_steps=4).steps_per_round(2) == 4
    assert TrainingSection(local_epochs=3).steps_per_round(2) == 6


def test_dp_sgd_runs_and_plans_every_fixed_step():
    """The DP plan charges ``local_steps`` per round, and DP-SGD runs exactly that many
    Poisson batches -- more than the loader's one pass -- so the accountant counts each."""
    n, batch, steps = 40, 16, 11
    x, y = _data(n)
    spec = TrainingSection(local_steps=steps, batch_size=batch, learning_rate=0.1)
    assert local_steps_per_round(spec.model_dump(), n) == steps > steps_per_epoch(n, batch)
    dp = {"mode": "record", "target_epsilon": 1.0, "delta": 1e-3, "accountant": "rdp"}
    plan = plan_for_site(dp, spec, rounds=3, n_records=n, site="h1")
    assert plan.steps_per_round == steps
    assert plan.sample_rate == pytest.approx(sample_rate(n, batch))
    assert plan.planned_steps == 3 * steps and plan.planned_epsilon() <= 1.0

    def wrap(model, optimizer, loader):
        return make_private(
            model, optimizer, loader, noise_multiplier=plan.noise_multiplier, max_grad_norm=1.0
        )

    result = train_local(_model(), x, y, spec, seed=0, wrap=wrap)
    assert result.steps == steps
