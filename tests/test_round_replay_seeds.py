"""A round replayed under another run id or round nonce is not bit-identical: the site's
training seed and its DP noise and sampling seeds include both (issue 10, item 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dp_consortium import train_round, write_experiment, write_site

from fedhealth.privacy.dp.randomness import training_seed


def _update(exp: Path, **config) -> dict[str, np.ndarray]:
    reply = train_round(exp, 0, 1, config_extra=config)[0]
    assert not reply.has_error(), reply.error.reason
    return {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dp", [None, {"noise_multiplier": 1.0}], ids=["plain", "dp-sgd"])
def test_replay_under_a_new_run_id_or_nonce_is_not_bit_identical(tmp_path, dp):
    site = write_site(tmp_path, "h1", n=120, seed=5)
    exp = write_experiment(tmp_path, [site], rounds=2, min_sites=1, dp=dp)
    run_a = _update(exp, **{"mlflow-run-id": "run-a"})
    assert _same(run_a, _update(exp, **{"mlflow-run-id": "run-a"}))  # same run: reproducible
    run_b = _update(exp, **{"mlflow-run-id": "run-b"})
    assert not _same(run_a, run_b)  # the same round, replayed under another run id
    # The round nonce exists only in an encrypted round's announcement (a whole HERound);
    # its part in the seeds is checked on `training_seed` below.


def test_training_seed_keeps_the_historical_value_without_a_binding():
    assert training_seed(7, 3, 2) == 7 * 100_003 + 3 * 1_009 + 2
    seeds = {training_seed(7, 3, 2, r, n) for r in ("", "a", "b") for n in ("", "x")}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
