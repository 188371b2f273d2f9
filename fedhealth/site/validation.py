"""A site's score histograms: an evaluation-only study's answer, and a run's final evaluation.

The registered model's weights arrive with the study's task spec. The site reads the data
the model's schema declares (its pinned test split, or every record when asked for
``"all"`` — a site that never trained the model), computes the predicted probability of
the positive class per record, and releases only the per-bin class counts and score sums of
:mod:`fedhealth.evaluation.histograms`, under its policy's ``release_metrics``: exact,
with Gaussian noise charged to its ledger before the reply is built (``"dp"``), or not at
all (``"withheld"``: the site refuses, rule ``release_metrics``).

The final evaluation of a training run (request flag ``score-histograms``, sent only in the
last round) releases the same histograms of the site's test split through
:func:`final_histograms`, under the same policy (a site that withholds its metrics releases
none), so that the run report draws ROC and calibration per site.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedhealth.data.normalisation import Standardizer
from fedhealth.errors import FedHealthError
from fedhealth.evaluation.histograms import BINS, DP_BINS, release
from fedhealth.protocol import Metric
from fedhealth.site.privacy_guard import _with_rule
from fedhealth.site.runtime import SiteRuntime
from fedhealth.site.timing import phase

SPLITS = ("test", "all")


def validation_release(
    runtime: SiteRuntime, arrays: dict[str, np.ndarray], split: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """The site's validation release of ``arrays`` on ``split``, and its reply metrics.

    Parameters
    ----------
    runtime : SiteRuntime
        The site's data and privacy guard for the study.
    arrays : dict
        The registered model's weights, by name.
    split : str
        ``"test"`` or ``"all"``.

    Returns
    -------
    tuple of dict
        The release (histograms) and the metrics (``num-examples``; ``epsilon`` and
        ``epsilon-round`` when charged).

    Raises
    ------
    FedHealthError
        The split is unknown, the task is not binary, the policy withholds metrics
        (rule ``release_metrics``), the split is too small, or the release would pass an
        ε cap (the guard's rules).
    """
    guard, data, name = runtime.guard, runtime.data, runtime.profile.name
    if split not in SPLITS:
        raise _with_rule(
            FedHealthError(f"site {name!r}: unknown validation split {split!r}; use test or all"),
            "validation-split",
        )
    if runtime.task.num_classes != 2:
        raise _with_rule(
            FedHealthError(f"site {name!r}: validation releases are defined for 2 classes"),
            "validation-classes",
        )
    mode = guard.metrics_release
    if mode == "withheld":
        raise _with_rule(
            FedHealthError(
                f"site {name!r} withholds the metrics of dataset {runtime.task.dataset!r} "
                '(`privacy.release_metrics = "withheld"`): it releases no validation statistics'
            ),
            "release_metrics",
        )
    if split == "all":
        x, y = (
            np.concatenate([data.x_train, data.x_test]),
            np.concatenate([data.y_train, data.y_test]),
        )
    else:
        x, y = data.x_test, data.y_test
    guard.check_split_size(split, len(y))
    # The registered model standardises with the statistics built into it (sent as the
    # request's norm-stats); without them, the site's own statistics (normalisation "site").
    pooled = runtime.request.norm_stats
    with phase("load"):
        if pooled:
            x = Standardizer.from_dict(pooled).transform(x).astype(np.float32)
        else:
            x = runtime._x(x)
    released, charged = score_release(
        runtime, arrays, x, y, "validation-noise", "its validation statistics"
    )
    return released, {Metric.NUM_EXAMPLES: float(len(y)), **charged}


def score_release(
    runtime: SiteRuntime,
    arrays: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    purpose: str,
    what: str,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Score histograms of the model ``arrays`` on ``(x, y)``, released under the policy.

    Parameters
    ----------
    runtime : SiteRuntime
        The site's data and privacy guard (its ``release_metrics`` is ``"exact"`` or
        ``"dp"``; the callers handle ``"withheld"``).
    arrays : dict
        The model's weights, by name.
    x, y : numpy.ndarray
        The standardised inputs and the 0/1 labels.
    purpose : str
        Names the noise generator (a release of another kind draws other noise).
    what : str
        What is released, for a refusal's message.

    Returns
    -------
    tuple of dict
        The release (:func:`fedhealth.evaluation.histograms.release`: counts only) and what
        the ledger was charged (``epsilon``, ``epsilon-round``; empty when exact).

    Raises
    ------
    FedHealthError
        The charge would pass an ε cap of the site's policy.
    """
    guard = runtime.guard
    with phase("evaluate"):
        model = runtime.build_model(arrays).eval()
        with torch.no_grad():
            out = model(torch.as_tensor(np.asarray(x), dtype=torch.float32))
            scores = torch.softmax(out, dim=1)[:, 1].numpy().astype(np.float64)
    with phase("privacy"):
        if guard.metrics_release == "exact":
            return release(scores, y, bins=BINS), {}
        sigma = guard.policy.metrics_noise_multiplier
        rng = guard.noise_rng(purpose, runtime._release_context(arrays))
        out_release = release(scores, y, sigma, rng, bins=DP_BINS)
        # Charged (committed to the ledger) before the caller builds its reply.
        return out_release, guard.charge_release(sigma, what)


def final_histograms(
    runtime: SiteRuntime, arrays: dict[str, np.ndarray], metrics: dict[str, Any]
) -> dict[str, Any] | None:
    """Score histograms of a training run's final evaluation on the site's test split.

    Parameters
    ----------
    runtime : SiteRuntime
        The site, for the evaluation request that asked (``score-histograms``).
    arrays : dict
        The final global model's weights.
    metrics : dict
        The evaluation's reply metrics; a DP release's charge is added to them (``epsilon``
        becomes the total after it, ``epsilon-round`` adds what it cost).

    Returns
    -------
    dict or None
        The release, or ``None`` when the policy withholds metrics.

    Raises
    ------
    FedHealthError
        The request is not the final round's (rule ``score-histograms``), the task is not
        binary (rule ``validation-classes``) or the release would pass an ε cap.
    """
    request, name = runtime.request, runtime.profile.name
    if request.round != request.spec.rounds:
        raise _with_rule(
            FedHealthError(
                f"site {name!r}: score histograms are released only in the final evaluation of "
                f"a run (round {request.spec.rounds}), not in round {request.round}"
            ),
            "score-histograms",
        )
    if runtime.task.num_classes != 2:
        raise _with_rule(
            FedHealthError(f"site {name!r}: score histograms are defined for 2 classes"),
            "validation-classes",
        )
    if runtime.guard.metrics_release == "withheld":
        return None
    runtime.guard.check_split_size("test", runtime.data.n_test)
    released, charged = score_release(
        runtime,
        arrays,
        runtime.test_inputs(),
        runtime.data.y_test,
        "score-histogram-noise",
        "its final score histograms",
    )
    if charged:
        metrics[Metric.EPSILON] = charged[Metric.EPSILON]
        metrics[Metric.EPSILON_ROUND] = (
            float(metrics.get(Metric.EPSILON_ROUND, 0.0)) + charged[Metric.EPSILON_ROUND]
        )
    return released
