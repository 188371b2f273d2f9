"""Resource caps and sanity checks on what a coordinator asks a site to build and run.

A hostile or mistaken coordinator must not make a site allocate a huge model, train for
hours, or train on (and charge ε for) a global model full of NaN. The checks run in this
order, each before the work it protects:

1. :func:`check_spec` -- local epochs, batch size and image size against ``[limits]``,
   and the model's parameter count (built on PyTorch's ``meta`` device: shapes only, no
   memory), before any data is read or any model is built;
2. :func:`check_global_model` -- every array of the global model finite, and no more
   values than the cap, before training or evaluating;
3. :func:`check_local_steps` -- the optimiser steps the round would run at this site
   (needs its record count), before training and so before any ε is charged.

A refusal is a :class:`LimitExceeded` whose ``rule`` is ``limits.<key>`` (or
``non-finite-model``); its message names the request's value and the site's cap, never a
value of the site's data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedhealth.config.site import SiteProfile
from fedhealth.errors import PolicyError
from fedhealth.protocol import TaskSpec

__all__ = [
    "LimitExceeded",
    "check_global_model",
    "check_local_steps",
    "check_spec",
    "model_parameters",
    "spec_input_dim",
]


class LimitExceeded(PolicyError):
    """A request beyond a site's resource cap, or an unusable global model."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


def _over(profile: SiteProfile, key: str, what: str, value: int, cap: int) -> LimitExceeded:
    return LimitExceeded(
        f"site {profile.name!r} refuses {what} of {value:,}: its cap is {cap:,} "
        f"(`limits.{key}` in the site profile)",
        rule=f"limits.{key}",
    )


def spec_input_dim(spec: TaskSpec) -> int:
    """The model's input width the spec implies: encoded features, or 1 image channel."""
    schema = spec.task.schema_
    return len(schema.feature_names()) if schema is not None else 1


def model_parameters(spec: TaskSpec) -> int:
    """Parameters of the spec's model, counted on the ``meta`` device (no memory used)."""
    import torch

    from fedhealth.models import build_model

    with torch.device("meta"):
        model = build_model(spec.model, spec_input_dim(spec), spec.task.num_classes, spec.seed)
    return sum(p.numel() for p in model.parameters())


def check_spec(profile: SiteProfile, spec: TaskSpec, *, training: bool) -> None:
    """Refuse a request beyond the site's caps, before any data or model is touched.

    Parameters
    ----------
    profile : SiteProfile
    spec : TaskSpec
    training : bool
        Also check the training caps (epochs, batch size).

    Raises
    ------
    LimitExceeded
    """
    lim = profile.limits
    if training and spec.training.local_epochs > lim.max_local_epochs:
        raise _over(
            profile, "max_local_epochs", "local epochs", spec.training.local_epochs,
            lim.max_local_epochs,
        )  # fmt: skip
    if training and spec.training.batch_size > lim.max_batch_size:
        raise _over(
            profile, "max_batch_size", "a batch size", spec.training.batch_size,
            lim.max_batch_size,
        )  # fmt: skip
    if spec.task.kind == "image" and spec.task.image_size > lim.max_image_size:
        raise _over(
            profile, "max_image_size", "an image size", spec.task.image_size, lim.max_image_size
        )
    n = model_parameters(spec)
    if n > lim.max_model_parameters:
        raise _over(
            profile, "max_model_parameters", "a model with parameters", n,
            lim.max_model_parameters,
        )  # fmt: skip


def check_global_model(profile: SiteProfile, arrays: Mapping[str, Any], round_: int) -> None:
    """Refuse a global model with a non-finite value or more values than the cap.

    Raises
    ------
    LimitExceeded
        Rule ``non-finite-model`` (names the tensor, not its values) or
        ``limits.max_model_parameters``.
    """
    import numpy as np

    total = sum(int(np.asarray(a).size) for a in arrays.values())
    cap = profile.limits.max_model_parameters
    if total > cap:
        raise _over(profile, "max_model_parameters", "a global model with values", total, cap)
    for name, a in arrays.items():
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            raise LimitExceeded(
                f"site {profile.name!r}, round {round_}: the global model's tensor {name!r} "
                "holds NaN or infinite values; nothing was trained or charged",
                rule="non-finite-model",
            )


def check_local_steps(profile: SiteProfile, spec: TaskSpec, n_train: int) -> None:
    """Refuse a round that would run more optimiser steps than the site's cap.

    Steps are ``local_epochs x ceil(n_train / batch_size)``, capped by ``max_steps``, or
    ``local_steps`` when the experiment fixes them.

    Raises
    ------
    LimitExceeded
    """
    t = spec.training
    steps = t.steps_per_round(math.ceil(max(n_train, 1) / t.batch_size))
    cap = profile.limits.max_local_steps
    if steps > cap:
        raise _over(profile, "max_local_steps", "local steps per round", steps, cap)
