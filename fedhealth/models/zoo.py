"""The model zoo: build a network by the name an experiment config gives.

Every model here is DP-safe (GroupNorm/LayerNorm, no BatchNorm) so that the
privacy layer can wrap it with Opacus unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedhealth.errors import ConfigError
from fedhealth.models import imaging, tabular

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "logistic_regression": lambda spec, n_in, k: tabular.logistic_regression(n_in, k),
    "mlp": lambda spec, n_in, k: tabular.mlp(n_in, k, spec["hidden"], spec.get("dropout", 0.0)),
    "small_cnn": lambda spec, n_in, k: imaging.small_cnn(
        n_in, k, spec["channels"], spec.get("groups", 8)
    ),
    "densenet121": lambda spec, n_in, k: imaging.densenet121(n_in, k, spec.get("groups", 8)),
    "resnet18": lambda spec, n_in, k: imaging.resnet18(n_in, k, spec.get("groups", 8)),
}


def model_names() -> list[str]:
    """Names a config may use in ``[model] name``."""
    return sorted(_BUILDERS)


def build_model(spec: Any, input_dim: int, num_classes: int, seed: int) -> nn.Module:
    """Build the named model with deterministic initial weights.

    Parameters
    ----------
    spec : ModelSection or dict
        The experiment's ``[model]`` section (``name`` plus options): the task spec's
        :class:`~fedhealth.protocol.ModelSection`, or its dict form.
    input_dim : int
        Number of features (tabular) or image channels (imaging).
    num_classes : int
        Number of output classes.
    seed : int
        Seed of the initial weights, so that every run with this seed starts alike.

    Returns
    -------
    torch.nn.Module
    """
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    name = spec["name"]
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _BUILDERS[name](spec, input_dim, num_classes)
    bad = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bad:  # a guard for models added later: BatchNorm breaks DP-SGD
        raise ConfigError(f"model {name!r} contains BatchNorm layers {bad}; use GroupNorm")
    return model


def state_to_numpy(model: nn.Module) -> dict[str, Any]:
    """The model's state dict as numpy arrays (float tensors only are trainable)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
