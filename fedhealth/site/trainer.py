"""Local training and evaluation at a site.

``train_local`` is written so that differential privacy slots in without
reshaping: it takes a ``wrap`` hook that replaces the model, optimiser, loader
and loss (Opacus's ``make_private`` does exactly that, see
:class:`fedhealth.privacy.dp.local.PrivateTraining`) and reports the number of
optimiser steps it actually ran, which is what a privacy accountant charges.
Every batch the loader yields is a step -- Poisson sampling may yield an empty
batch, and DP-SGD still adds its noise on it -- so none is skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedhealth.errors import ConfigError
from fedhealth.protocol import Metric, TrainingSection


class Wrapped(Protocol):
    """What a ``wrap`` hook returns (``PrivateTraining`` is one)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader
    criterion: Any

    def release(self) -> nn.Module:
        """Undo the wrapping (remove hooks) after training."""


Wrap = Callable[[nn.Module, torch.optim.Optimizer, DataLoader], Wrapped]


@dataclass
class TrainResult:
    """What one round of local training did."""

    loss: float
    steps: int
    examples: int


def make_optimizer(model: nn.Module, spec: TrainingSection) -> torch.optim.Optimizer:
    """The local optimiser named by the experiment's ``[training]`` section.

    ``torch.optim.Adam`` or ``torch.optim.SGD`` (momentum, L2 weight decay).
    """
    lr, wd = spec.learning_rate, spec.weight_decay
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=spec.momentum, weight_decay=wd)


def _batches(loader: DataLoader, spec: TrainingSection):
    """The batches of one round: ``spec.local_steps`` of them, cycling over ``loader`` as
    often as needed, else every batch of ``local_epochs`` passes, stopping after
    ``max_steps``."""
    epochs = spec.local_epochs if spec.local_steps is None else None
    max_steps = spec.local_steps if spec.local_steps is not None else spec.max_steps
    steps, epoch = 0, 0
    while epochs is None or epoch < epochs:
        epoch += 1
        empty = True
        for batch in loader:
            empty = False
            yield batch
            steps += 1
            if max_steps and steps >= max_steps:
                return
        if empty:  # a loader without batches: nothing to cycle over
            return


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    spec: TrainingSection,
    seed: int,
    proximal_mu: float = 0.0,
    wrap: Wrap | None = None,
) -> TrainResult:
    """Train ``model`` in place on the site's training split.

    Parameters
    ----------
    model : nn.Module
        The global model, already loaded with this round's weights.
    x, y : np.ndarray
        Training inputs (normalised) and integer labels.
    spec : TrainingSection
        The experiment's ``[training]`` section.
    seed : int
        Seed of batch order. A DP ``wrap`` hook brings its own secret generators
        for sampling and noise (a public seed must never drive them).
    proximal_mu : float
        FedProx proximal term weight; 0 disables it.
    wrap : callable, optional
        ``wrap(model, optimizer, loader) -> Wrapped`` (model, optimizer,
        data_loader, criterion, release()), e.g. to make training differentially
        private. The wrapped criterion computes every loss; the hook is released
        after training.

    Returns
    -------
    TrainResult
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))
    loader = DataLoader(ds, batch_size=spec.batch_size, shuffle=True, generator=gen)
    optimizer = make_optimizer(model, spec)
    net, loss_fn = model, nn.CrossEntropyLoss()
    wrapped = None
    if wrap is not None:
        if proximal_mu > 0:
            raise ConfigError(
                "FedProx's proximal term cannot be trained with DP-SGD (it bypasses Opacus's "
                "per-sample gradients); use another strategy with DP"
            )
        wrapped = wrap(model, optimizer, loader)
        net, optimizer, loader = wrapped.model, wrapped.optimizer, wrapped.data_loader
        loss_fn = wrapped.criterion
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    steps, total, seen = 0, 0.0, 0
    net.train()
    try:
        with warnings.catch_warnings():
            # Opacus's ghost clipping backpropagates to module outputs; PyTorch warns each time.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for xb, yb in _batches(loader, spec):
                optimizer.zero_grad()
                loss = loss_fn(net(xb), yb)
                if anchor is not None:
                    pairs = zip(model.parameters(), anchor, strict=True)
                    prox = sum(((p - a) ** 2).sum() for p, a in pairs)
                    loss = loss + proximal_mu / 2 * prox
                loss.backward()
                optimizer.step()
                steps += 1  # an empty Poisson batch is a (noise-only) step too
                if len(yb):
                    total += float(loss.detach()) * len(yb)
                    seen += len(yb)
    finally:
        if wrapped is not None:
            wrapped.release()
    return TrainResult(loss=total / max(seen, 1), steps=steps, examples=len(y))


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> dict:
    """Loss and accuracy of ``model`` on ``(x, y)``.

    Returns
    -------
    dict
        ``loss``, ``accuracy`` and ``num-examples``.
    """
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total, correct = 0.0, 0
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y)
    for i in range(0, len(yt), batch_size):
        out = model(xt[i : i + batch_size])
        total += float(loss_fn(out, yt[i : i + batch_size]))
        correct += int((out.argmax(1) == yt[i : i + batch_size]).sum())
    n = max(len(yt), 1)
    return {Metric.LOSS: total / n, Metric.ACCURACY: correct / n, Metric.NUM_EXAMPLES: len(yt)}
