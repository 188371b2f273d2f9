"""A site's answer to an evaluation-only study (``query.validate``): histograms, never scores.

The registered model's weights arrive with the study's task spec. The site reads the data
the model's schema declares (its pinned test split, or every record when asked for
``"all"`` — a site that never trained the model), computes the predicted probability of
the positive class per record, and releases only the per-bin class counts and score sums of
:mod:`fedhealth.evaluation.histograms`, under its policy's ``release_metrics``: exact,
with Gaussian noise charged to its ledger before the reply is built (``"dp"``), or not at
all (``"withheld"``: the site refuses, rule ``release_metrics``).
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
    with phase("evaluate"):
        model = runtime.build_model(arrays).eval()
        with torch.no_grad():
            out = model(torch.as_tensor(x, dtype=torch.float32))
            scores = torch.softmax(out, dim=1)[:, 1].numpy().astype(np.float64)
    metrics: dict[str, float] = {Metric.NUM_EXAMPLES: float(len(y))}
    with phase("privacy"):
        if mode == "exact":
            return release(scores, y, bins=BINS), metrics
        sigma = guard.policy.metrics_noise_multiplier
        rng = guard.noise_rng("validation-noise", runtime._release_context(arrays))
        out_release = release(scores, y, sigma, rng, bins=DP_BINS)
        metrics.update(guard.charge_release(sigma, "its validation statistics"))
    return out_release, metrics
