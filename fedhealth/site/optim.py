"""SGD and Adam for local training, without importing ``torch._dynamo``.

Every ``torch.optim`` optimiser imports ``torch._dynamo`` (and with it sympy) the first
time it is built or stepped: ``Optimizer.add_param_group`` and ``zero_grad`` are wrapped in
``torch._disable_dynamo``, and ``step`` in ``_use_grad_for_differentiable``, which import
it lazily. That costs about a second in every process that trains, and a deployed site
starts a process per message. The two optimisers here are ``torch.optim.Optimizer``
subclasses (so Opacus's ``DPOptimizer`` wraps them as usual) whose ``add_param_group`` and
``zero_grad`` are torch's own functions without that wrapper, and whose ``step`` is the
arithmetic of torch's single-tensor CPU path (``_single_tensor_sgd``,
``_single_tensor_adam`` in torch 2.13: the one torch takes for CPU tensors), operation by
operation, so the weights are bit-identical to ``torch.optim.SGD`` / ``Adam`` with the
same arguments (``tests/test_deploy_units.py`` checks it). They do not support
``torch.compile``, closures that need grad, sparse gradients, ``maximize``, ``nesterov``,
``amsgrad`` or complex parameters; local training uses none of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["SGD", "Adam"]


def _scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for step counts (``torch.optim.optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _EagerOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` without the lazy ``torch._dynamo`` import."""

    # torch's own implementations; inspect.unwrap only removes the dynamo-disabling wrapper.
    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)

    def _closure(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _gradients(self) -> Iterator[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]:
        """``(group, parameter, gradient + L2 weight decay)`` for every parameter with a
        gradient, in torch's order."""
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                yield group, p, (p.grad.add(p, alpha=wd) if wd != 0 else p.grad)


class SGD(_EagerOptimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay.

    Parameters
    ----------
    params : iterable
        Parameters (or parameter groups) to optimise.
    lr : float
        Learning rate.
    momentum : float
        Momentum factor (no dampening, not Nesterov).
    weight_decay : float
        L2 penalty added to the gradient.
    """

    def __init__(
        self, params: Iterable[Any], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD settings lr={lr}, momentum={momentum}, {weight_decay=}")
        defaults = {
            "lr": lr, "momentum": momentum, "dampening": 0.0, "weight_decay": weight_decay,
            "nesterov": False, "maximize": False, "foreach": False, "differentiable": False,
            "fused": False,
        }  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient."""
        loss = self._closure(closure)
        for group, p, grad in self._gradients():
            momentum = group["momentum"]
            if momentum != 0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = grad.detach().clone()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                grad = buf
            p.add_(grad, alpha=-group["lr"])
        return loss


class Adam(_EagerOptimizer):
    """Adam with L2 weight decay added to the gradient (``torch.optim.Adam``'s default).

    Parameters
    ----------
    params : iterable
        Parameters (or parameter groups) to optimise.
    lr : float
        Learning rate.
    betas : tuple of float
        Decay rates of the first and second moment estimates.
    eps : float
        Added to the denominator.
    weight_decay : float
        L2 penalty added to the gradient.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid Adam settings lr={lr}, betas={betas}, eps={eps}")
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
            "amsgrad": False, "maximize": False, "foreach": False, "capturable": False,
            "differentiable": False, "fused": False, "decoupled_weight_decay": False,
        }  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient."""
        loss = self._closure(closure)
        for group, p, grad in self._gradients():
            (beta1, beta2), eps = group["betas"], group["eps"]
            state = self.state[p]
            if not state:
                # torch keeps the step count in a tensor of its scalar dtype.
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            step_t += 1
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = step_t.item()
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = group["lr"] / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
        return loss
