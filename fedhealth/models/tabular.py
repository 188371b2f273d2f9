"""Networks for tabular (EHR) tasks. LayerNorm only: Opacus wraps them unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from fedhealth.catalogue import MODELS

if TYPE_CHECKING:  # torch is imported when a model is built, not to validate a config
    from torch import nn


class NoOptions(BaseModel):
    """A model without options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MLPOptions(NoOptions):
    """Options of ``mlp``."""

    hidden: list[int] = Field(default_factory=lambda: [64, 32], description="Hidden layer widths.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")


@MODELS.register("logistic_regression", traits={"tabular"}, options=NoOptions)
def logistic_regression(n_features: int, num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer producing class logits.

    Parameters
    ----------
    n_features : int
        Input width.
    num_classes : int
        Number of classes (2 for a binary task; logits for both classes).
    """
    from torch import nn

    return nn.Sequential(nn.Linear(n_features, num_classes))


@MODELS.register("mlp", traits={"tabular"}, options=MLPOptions)
def mlp(n_features: int, num_classes: int, hidden: list[int], dropout: float = 0.0) -> nn.Module:
    """A multi-layer perceptron with LayerNorm after each hidden layer.

    Parameters
    ----------
    n_features : int
        Input width.
    num_classes : int
        Number of classes.
    hidden : list of int
        Width of each hidden layer.
    dropout : float
        Dropout after each hidden layer.
    """
    from torch import nn

    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
