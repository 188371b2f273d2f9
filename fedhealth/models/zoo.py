"""The model zoo: build a network by the name an experiment config gives.

Networks register themselves in the model catalogue (:data:`fedhealth.catalogue.MODELS`)
next to their builder, with their options schema and the task kind they serve. Every
model must be DP-safe (GroupNorm/LayerNorm, no BatchNorm) so that the privacy layer can
wrap it with Opacus unchanged; :func:`build_model` checks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fedhealth.catalogue import MODELS, UnknownName
from fedhealth.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


def model_names() -> list[str]:
    """Names a config may use in ``[model] name``."""
    return MODELS.names()


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
    import torch
    from torch import nn

    if hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    name = spec["name"]
    try:
        entry = MODELS.get(name)
    except UnknownName as exc:
        raise ConfigError(str(exc)) from None
    options: dict[str, Any] = {}
    if entry.options is not None:
        # Keys of other models (older specs carried every model's keys) are ignored here;
        # config validation has already refused unknown keys in the experiment file.
        mine = {k: v for k, v in spec.items() if k in entry.options.model_fields}
        try:
            options = entry.options.model_validate(mine).model_dump()
        except ValidationError as exc:
            raise ConfigError(f"model {name!r}: bad options: {exc}") from None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = entry.load()(input_dim, num_classes, **options)
    bad = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bad:  # a guard for models added later: BatchNorm breaks DP-SGD
        raise ConfigError(f"model {name!r} contains BatchNorm layers {bad}; use GroupNorm")
    return model


def state_to_numpy(model: nn.Module) -> dict[str, Any]:
    """The model's state dict as numpy arrays (float tensors only are trainable)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
