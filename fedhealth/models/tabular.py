"""Networks for tabular (EHR) tasks. LayerNorm only: Opacus wraps them unchanged."""

from __future__ import annotations

from torch import nn


def logistic_regression(n_features: int, num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer producing class logits.

    Parameters
    ----------
    n_features : int
        Input width.
    num_classes : int
        Number of classes (2 for a binary task; logits for both classes).
    """
    return nn.Sequential(nn.Linear(n_features, num_classes))


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
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
