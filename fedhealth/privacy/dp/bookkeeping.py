"""DP-SGD by book-keeping: per-sample clipping from one backward pass, without Opacus's wrappers.

Book-keeping (BK; Bu et al., "Differentially private optimization on large model at small
cost", ICML 2023) keeps, for every layer with trainable parameters, its input ``a`` (from a
forward hook) and the gradient ``g`` of the loss with respect to its output (from a tensor
hook). One backward pass computes only those output gradients -- no parameter gradients --
and each layer then turns ``(a, g)`` into

* the per-sample gradient norms, either from *ghost norms* (``|g_i|^2 |a_i|^2`` for a Linear
  layer on 2-D input; ``<a_i a_i^T, g_i g_i^T>`` for a convolution, when its output has few
  positions) or from materialised per-sample gradients (whichever costs fewer operations);
* the sum of the clipped per-sample gradients ``sum_i c_i grad_i``, directly: for Linear one
  matrix product ``(c * g)^T a``, for a convolution PyTorch's weight-gradient convolution on
  ``c * g``, else a contraction of the materialised per-sample gradients.

Clipping, noise and scaling are Opacus's (``DPOptimizer``): ``c_i = min(1, C / (|grad_i| +
1e-6))``, noise ``N(0, (σC)^2)`` drawn per parameter in parameter order from the noise
generator, and with a "mean" loss the sum divided by the *expected* batch size
``int(n * q)``. With the same generator the result equals Opacus's up to float rounding
(``tests/test_dp_fast.py``). The work saved is Opacus's per-step Python bookkeeping
(module wrapper, per-parameter ``grad_sample`` lists, hooks on every module) and, on tiny
tabular models, most of the step: see ``benchmarks/dp_throughput.py``.

Supported layers: ``Linear``, ``Conv2d`` (``groups=1``, zero padding), ``LayerNorm`` and
``GroupNorm`` -- every parametrised layer of the model zoo. :func:`supports` says whether a
model qualifies; ``make_private`` uses Opacus for any other model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
import torch.nn.grad
from torch import nn

from fedhealth.errors import FedHealthError

#: Layer types whose per-sample gradients this module computes.
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)

#: Attribute marking a model that carries this module's hooks.
HOOKS_ATTR = "_fedhealth_bk_hooks"

# (norms², clipped-sum builder): the builder maps the clip factors c (B,) to one summed
# gradient per parameter of the layer.
LayerResult = tuple[torch.Tensor, Callable[[torch.Tensor], list[torch.Tensor]]]


def supports(model: nn.Module) -> str | None:
    """Why ``model`` cannot use book-keeping DP-SGD, or None if it can.

    Every trainable parameter must be a direct parameter of a supported layer, used by
    one module only.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    str or None
        The first obstacle found, naming the module.
    """
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, SUPPORTED_LAYERS):
            return f"layer {name!r} ({type(module).__name__}) is not one of {_names()}"
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or module.padding == "same"
        ):
            return f"layer {name!r}: only Conv2d with groups=1 and zero padding"
        for p in own:
            if id(p) in seen:
                return f"layer {name!r} shares a parameter with another layer"
            seen.add(id(p))
    return None


def _names() -> str:
    return ", ".join(t.__name__ for t in SUPPORTED_LAYERS)


# -- per-layer maths ------------------------------------------------------------------------


def _materialised(per_sample: list[torch.Tensor]) -> LayerResult:
    """Norms and clipped sums from per-sample gradients (B, *param shape)."""
    flat = [g.reshape(len(g), -1) for g in per_sample]
    norms2 = cast(torch.Tensor, sum(f.pow(2).sum(1) for f in flat))  # never empty

    def clipped(c: torch.Tensor) -> list[torch.Tensor]:
        return [(c @ f).view(g.shape[1:]) for f, g in zip(flat, per_sample, strict=True)]

    return norms2, clipped


def _linear(module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> LayerResult:
    has_bias = module.bias is not None and module.bias.requires_grad
    has_weight = module.weight.requires_grad
    if a.dim() == 2:  # ghost norm: |g_i a_i^T|_F = |g_i| |a_i|
        g2 = g.pow(2).sum(1)
        norms2 = g2 * a.pow(2).sum(1) if has_weight else torch.zeros_like(g2)
        if has_bias:
            norms2 = norms2 + g2

        def clipped(c: torch.Tensor) -> list[torch.Tensor]:
            cg = g * c.unsqueeze(1)
            out = [cg.t() @ a] if has_weight else []
            return [*out, cg.sum(0)] if has_bias else out

        return norms2, clipped
    per_sample = []
    if has_weight:
        per_sample.append(torch.einsum("n...o,n...i->noi", g, a))
    if has_bias:
        per_sample.append(g.reshape(len(g), -1, g.shape[-1]).sum(1))
    return _materialised(per_sample)


def _conv2d(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> LayerResult:
    n, out_ch = g.shape[:2]
    positions = g.shape[2] * g.shape[3]
    has_bias = module.bias is not None and module.bias.requires_grad
    has_weight = module.weight.requires_grad
    gf = g.reshape(n, out_ch, positions)
    k = module.weight[0].numel()  # in_channels x kernel area
    norms2 = gf.sum(2).pow(2).sum(1) if has_bias else gf.new_zeros(n)
    bias_sum = cast(torch.Tensor, gf.sum(2) if has_bias else None)  # used only if has_bias
    if not has_weight:

        def clipped_bias(c: torch.Tensor) -> list[torch.Tensor]:
            return [c @ bias_sum]

        return norms2, clipped_bias
    padding = cast(tuple[int, ...], module.padding)  # numbers: the supported layers' padding
    cols = F.unfold(a, module.kernel_size, module.dilation, padding, module.stride)
    # Ghost norm <A A^T, G G^T> costs positions^2 (k + out); materialising costs positions k out.
    if positions * (k + out_ch) < k * out_ch:
        aa = torch.bmm(cols.transpose(1, 2), cols)
        gg = torch.bmm(gf.transpose(1, 2), gf)
        norms2 = norms2 + (aa * gg).sum((1, 2))

        def clipped(c: torch.Tensor) -> list[torch.Tensor]:
            cg = g * c.view(-1, 1, 1, 1)
            w = torch.nn.grad.conv2d_weight(
                a, module.weight.shape, cg, module.stride, module.padding, module.dilation
            )
            return [w, c @ bias_sum] if has_bias else [w]

        return norms2, clipped
    per_sample = torch.bmm(gf, cols.transpose(1, 2)).view(n, *module.weight.shape)
    norms2 = norms2 + per_sample.reshape(n, -1).pow(2).sum(1)
    flat = per_sample.reshape(n, -1)

    def clipped_m(c: torch.Tensor) -> list[torch.Tensor]:
        w = (c @ flat).view(module.weight.shape)
        return [w, c @ bias_sum] if has_bias else [w]

    return norms2, clipped_m


def _norm_layer(
    module: nn.LayerNorm | nn.GroupNorm, a: torch.Tensor, g: torch.Tensor
) -> LayerResult:
    n = len(a)
    if isinstance(module, nn.GroupNorm):
        xhat = torch.group_norm(a, module.num_groups, None, None, module.eps)
        dims = tuple(range(2, a.dim()))  # sum over positions, one value per channel
    else:
        xhat = torch.layer_norm(a, module.normalized_shape, None, None, module.eps)
        dims = tuple(range(1, a.dim() - len(module.normalized_shape)))
    per_sample = []
    if module.weight is not None and module.weight.requires_grad:
        gw = g * xhat
        per_sample.append(gw.sum(dims) if dims else gw)
    if module.bias is not None and module.bias.requires_grad:
        per_sample.append(g.sum(dims) if dims else g)
    return _materialised([p.reshape(n, *p.shape[1:]) for p in per_sample])


def _layer_result(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> LayerResult:
    if isinstance(module, nn.Linear):
        return _linear(module, a, g)
    if isinstance(module, nn.Conv2d):
        return _conv2d(module, a, g)
    return _norm_layer(cast("nn.LayerNorm | nn.GroupNorm", module), a, g)  # the last supported


# -- the engine -----------------------------------------------------------------------------


class BookKeeping:
    """Hooks on a model's parametrised layers and the clipped, noised gradient of one step.

    Parameters
    ----------
    model : nn.Module
        A model :func:`supports` accepts; hooks are attached to it (remove with :meth:`remove`).
    max_grad_norm : float
        C, the per-sample clipping norm.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.layers: list[tuple[nn.Module, list[nn.Parameter]]] = []
        handles = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                self.layers.append((module, own))
                handles.append(module.register_forward_hook(self._forward_hook))
        setattr(model, HOOKS_ATTR, handles)
        self.params = [p for _, ps in self.layers for p in ps]
        self._taps: list[list[Any]] = []  # [module, input, output gradient] per forward call
        self._outputs: list[torch.Tensor] = []  # the layers' outputs, to backpropagate to
        self.summed: list[torch.Tensor] | None = None  # clipped sums of the last backward

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and module.training and output.requires_grad):
            return
        tap: list[Any] = [module, inputs[0].detach(), None]
        self._taps.append(tap)
        self._outputs.append(output)

        # The hook must not reference ``output`` (a cycle would keep every graph alive
        # until the garbage collector runs, and make it run often).
        def keep(grad: torch.Tensor) -> None:
            tap[2] = grad

        output.register_hook(keep)

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in getattr(self.model, HOOKS_ATTR, []):
            handle.remove()
        if hasattr(self.model, HOOKS_ATTR):
            delattr(self.model, HOOKS_ATTR)
        self.reset()

    def reset(self) -> None:
        """Forget recorded activations and clipped sums (``zero_grad``)."""
        self._taps, self._outputs, self.summed = [], [], None

    def backward(self, loss: torch.Tensor, batch: int, scale: float) -> None:
        """Clipped per-sample gradient sums of ``loss`` over a batch of ``batch`` records.

        Parameters
        ----------
        loss : torch.Tensor
            The batch loss (scalar).
        batch : int
            Records in the batch (0: an empty Poisson batch, the sum is zero).
        scale : float
            Factor turning ``loss`` into a sum of per-sample losses (``batch`` for "mean").
        """
        taps, outputs = self._taps, self._outputs
        self._taps, self._outputs = [], []
        if batch == 0:
            self.summed = [torch.zeros_like(p) for p in self.params]
            return
        torch.autograd.grad(loss * scale if scale != 1 else loss, outputs, allow_unused=True)
        del outputs
        results = {}
        norms2 = None
        for module, a, g in taps:
            if g is None or len(a) != batch:
                raise FedHealthError(
                    f"DP-SGD: layer {type(module).__name__} saw a batch of {len(a)} records "
                    f"(gradient {'missing' if g is None else 'present'}) in a step over "
                    f"{batch}; run exactly one forward pass of pt.model per loss"
                )
            if module in results:
                raise FedHealthError(
                    f"DP-SGD: layer {type(module).__name__} ran twice in one forward pass; "
                    "reused layers need grad_sample_mode='hooks'"
                )
            n2, clipped = _layer_result(module, a, g)
            results[module] = clipped
            norms2 = n2 if norms2 is None else norms2 + n2
        if len(results) != len(self.layers):
            missing = [type(m).__name__ for m, _ in self.layers if m not in results]
            raise FedHealthError(
                f"DP-SGD: layers {missing} took no part in the forward pass; their parameters "
                "would get noise without a gradient. Freeze them (requires_grad=False)."
            )
        assert norms2 is not None  # every layer took part
        factor = (self.max_grad_norm / (norms2.sqrt() + 1e-6)).clamp(max=1.0)
        self.summed = [s for module, _ in self.layers for s in results[module](factor)]


class BKLoss:
    """The loss a book-keeping training step returns: ``backward()`` clips per sample.

    Behaves like the loss tensor for what a training loop does with it (``backward``,
    ``detach``, ``item``, ``float``).
    """

    def __init__(self, loss: torch.Tensor, engine: BookKeeping, batch: int, scale: float):
        self.loss, self.engine, self.batch, self.scale = loss, engine, batch, scale

    def backward(self) -> None:
        """One backward pass to the layer outputs, then per-sample clipping."""
        self.engine.backward(self.loss, self.batch, self.scale)

    def detach(self) -> torch.Tensor:
        """The loss value as a plain tensor."""
        return self.loss.detach()

    def item(self) -> float:
        """The loss value."""
        return self.loss.item()

    def __float__(self) -> float:
        return float(self.loss)


class BKCriterion:
    """Wraps a loss module (reduction "mean" or "sum") into one returning :class:`BKLoss`."""

    def __init__(self, criterion: Any, engine: BookKeeping) -> None:
        self.criterion = criterion
        self.engine = engine
        self.reduction = getattr(criterion, "reduction", "mean")

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> BKLoss:
        batch = len(output)
        if batch == 0:  # an empty Poisson batch: noise only
            return BKLoss(output.sum() * 0.0, self.engine, 0, 1.0)
        loss = self.criterion(output, target)
        return BKLoss(loss, self.engine, batch, float(batch) if self.reduction == "mean" else 1.0)


class BKOptimizer:
    """Opacus's ``DPOptimizer`` step on book-keeping sums: noise, scaling, the inner step.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The original optimiser over the model's parameters.
    engine : BookKeeping
    noise_multiplier : float
        σ; the noise std is σC per coordinate.
    expected_batch_size : int
        ``int(n * q)``; a "mean" loss divides the noisy sum by it.
    loss_reduction : {"mean", "sum"}
    generator : torch.Generator, optional
        Noise source (None: torch's global generator).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        engine: BookKeeping,
        noise_multiplier: float,
        expected_batch_size: int,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
    ) -> None:
        self.original_optimizer = optimizer
        self.engine = engine
        self.noise_multiplier = float(noise_multiplier)
        self.std = self.noise_multiplier * engine.max_grad_norm
        self.expected_batch_size = int(expected_batch_size)
        self.loss_reduction = loss_reduction
        self.generator = generator
        _check_same_params(optimizer, engine.params)

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimiser's parameter groups."""
        return self.original_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and what the engine recorded."""
        self.engine.reset()
        self.original_optimizer.zero_grad(set_to_none)

    def step(self, closure: Any = None) -> Any:
        """Add noise to the clipped sums, scale, and step the inner optimiser."""
        summed = self.engine.summed
        if summed is None:
            raise FedHealthError(
                "DP-SGD: no clipped gradient for this step -- the loss was not computed with "
                "PrivateTraining.criterion (or backward() was not called), so this step would "
                "not be differentially private. Compute the loss as "
                "`pt.criterion(pt.model(x), y)` and call its backward()."
            )
        self.engine.summed = None
        if self.std > 0:
            for s in summed:
                s.add_(
                    torch.normal(0.0, self.std, s.shape, generator=self.generator, dtype=s.dtype)
                )
        if self.loss_reduction == "mean":
            torch._foreach_div_(summed, float(self.expected_batch_size))
        for p, s in zip(self.engine.params, summed, strict=True):
            p.grad = s
        return self.original_optimizer.step(closure) if closure else self.original_optimizer.step()

    def state_dict(self) -> dict:
        """The inner optimiser's state."""
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the inner optimiser's state."""
        self.original_optimizer.load_state_dict(state)


def _check_same_params(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in params if id(p) not in in_opt]
    if missing:
        raise FedHealthError(
            f"DP-SGD: {len(missing)} trainable parameter(s) of the model are not in the "
            "optimiser; build the optimiser over model.parameters()"
        )


def expected_batch_size(n_records: int, q: float) -> int:
    """Opacus's expected batch size ``int(n * q)`` (the divisor of a "mean" loss)."""
    return int(n_records * q) if math.isfinite(q) else 0
