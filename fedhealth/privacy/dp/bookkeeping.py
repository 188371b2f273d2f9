"""DP-SGD by book-keeping: per-sample clipping from one backward pass, without Opacus's wrappers.

Book-keeping (BK; Bu et al., "Differentially private optimization on large model at small
cost", ICML 2023) keeps, for every layer with trainable parameters, its input ``a`` and the
gradient edge of its output (from a forward hook). One ``torch.autograd.grad`` call to those
edges computes only the layers' output gradients ``g`` -- no parameter gradients -- and each
layer then turns ``(a, g)`` into

* per-sample gradient norms, either *ghost norms* (``|g_i| |a_i|`` for a Linear layer on 2-D
  input; ``<a_i a_i^T, g_i g_i^T>`` for a convolution, when its output has few positions) or
  norms of materialised per-sample gradients (whichever costs fewer operations); one
  ``vector_norm`` over every layer's entries gives each sample's total norm;
* the noised sum of the clipped per-sample gradients ``N + sum_i f_i grad_i``, directly: for
  Linear one ``addmm(N, (f * g)^T, a)``, for a convolution PyTorch's weight-gradient
  convolution on ``f * g``, else an ``addmv`` over the materialised per-sample gradients.

Clipping, noise and scaling are Opacus's (``DPOptimizer``): ``c_i = min(1, C / (|G_i| +
1e-6))`` for the per-sample gradient ``G_i`` of sample i's loss, noise ``N(0, (σC)^2)``
drawn per parameter in parameter order from the noise generator, and with a "mean" loss the
noisy sum divided by the *expected* batch size ``int(n * q)``. The loss's scale, ``c_i`` and
the division are folded into one factor ``f_i`` per sample, and the noise is drawn (already
divided) in the backward pass -- the same draws, in the same order, from the same generator
as Opacus's optimiser step -- so that it enters the matrix products as their additive term.
With the same generator the result equals Opacus's up to float rounding
(``tests/test_dp_fast.py``). The work saved is Opacus's per-step Python bookkeeping (module
wrapper, per-parameter ``grad_sample`` lists, hooks on every module) and, on tiny tabular
models, most of the step: see ``benchmarks/dp_throughput.py``.

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
from torch.autograd.graph import get_gradient_edge

from fedhealth.errors import FedHealthError

#: Layer types whose per-sample gradients this module computes.
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)

#: Attribute marking a model that carries this module's hooks.
HOOKS_ATTR = "_fedhealth_bk_hooks"


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
#
# A layer turns its input ``a`` and output gradient ``g`` into
#
# * per-sample norms (B,) whose squares sum to the squared per-sample gradient norm of the
#   layer's parameters (a list: the engine takes one norm over all layers' entries), and
# * a builder ``clipped(f, noise)`` returning one tensor per trainable parameter of the
#   layer, in the layer's parameter order: ``sum_i f_i grad_i`` plus that parameter's noise
#   (None: no noise), where ``grad_i`` is sample i's gradient *of the loss as computed* (the
#   engine folds the loss's scale, the clip factors and the final division into ``f``).
#
# Matrix products take the noise as their additive term (``addmm``/``addmv``), so adding it
# costs no separate pass. Builders never keep a reference to the norms (the engine changes
# them in place).

Noise = list[torch.Tensor] | None
LayerResult = tuple[list[torch.Tensor], Callable[[torch.Tensor, Noise], list[torch.Tensor]]]


def _row_sum(rows: torch.Tensor, f: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """``f @ rows`` (+ ``noise``) for per-sample rows (B, P); shaped like ``noise`` if given."""
    if noise is None:
        return torch.mv(rows.t(), f)
    if noise.dim() == 1:
        return torch.addmv(noise, rows.t(), f)
    return torch.addmv(noise.reshape(-1), rows.t(), f).view(noise.shape)


def _norm(rows: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norms of rows (B, P)."""
    return torch.linalg.vector_norm(rows, dim=1)


def _materialised(per_sample: list[torch.Tensor]) -> LayerResult:
    """Norms and clipped sums from per-sample gradients (B, *param shape)."""
    flat = [g if g.dim() == 2 else g.reshape(len(g), -1) for g in per_sample]

    def clipped(f: torch.Tensor, noise: Noise) -> list[torch.Tensor]:
        out = []
        for k, (rows, g) in enumerate(zip(flat, per_sample, strict=True)):
            s = _row_sum(rows, f, noise[k] if noise else None)
            out.append(s if g.dim() == 2 else s.view(g.shape[1:]))
        return out

    return [_norm(rows) for rows in flat], clipped


def _linear(module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> LayerResult:
    has_bias = module.bias is not None and module.bias.requires_grad
    has_weight = module.weight.requires_grad
    if a.dim() == 2:  # ghost norm: |g_i a_i^T|_F = |g_i| |a_i|
        gn = _norm(g)
        norms = [gn * _norm(a)] if has_weight else []
        if has_bias:
            norms.append(gn)

        def clipped(f: torch.Tensor, noise: Noise) -> list[torch.Tensor]:
            out = []
            gt = g.t()
            if has_weight:
                fg = gt * f  # (out, B)
                out.append(torch.addmm(noise[0], fg, a) if noise else torch.mm(fg, a))
            if has_bias:  # f @ g (+ noise)
                nb = noise[-1] if noise else None
                out.append(torch.mv(gt, f) if nb is None else torch.addmv(nb, gt, f))
            return out

        return norms, clipped
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
    bias_rows = gf.sum(2) if has_bias else None
    norms = [_norm(bias_rows)] if bias_rows is not None else []

    def bias_sum(f: torch.Tensor, noise: Noise) -> list[torch.Tensor]:
        return [] if bias_rows is None else [_row_sum(bias_rows, f, noise[-1] if noise else None)]

    if not has_weight:
        return norms, bias_sum
    padding = cast(tuple[int, ...], module.padding)  # numbers: the supported layers' padding
    cols = F.unfold(a, module.kernel_size, module.dilation, padding, module.stride)
    # Ghost norm <A A^T, G G^T> costs positions^2 (k + out); materialising costs positions k out.
    if positions * (k + out_ch) < k * out_ch:
        aa = torch.bmm(cols.transpose(1, 2), cols)
        gg = torch.bmm(gf.transpose(1, 2), gf)
        norms.append((aa * gg).sum((1, 2)).clamp_(min=0).sqrt_())

        def clipped(f: torch.Tensor, noise: Noise) -> list[torch.Tensor]:
            fg = g * f.view(-1, 1, 1, 1)
            w = torch.nn.grad.conv2d_weight(
                a, module.weight.shape, fg, module.stride, module.padding, module.dilation
            )
            if noise:
                w.add_(noise[0])
            return [w, *bias_sum(f, noise)]

        return norms, clipped
    flat = torch.bmm(gf, cols.transpose(1, 2)).view(n, -1)  # per-sample weight gradients
    norms.append(_norm(flat))

    def clipped_m(f: torch.Tensor, noise: Noise) -> list[torch.Tensor]:
        w = _row_sum(flat, f, noise[0] if noise else None).view(module.weight.shape)
        return [w, *bias_sum(f, noise)]

    return norms, clipped_m


def _norm_layer(
    module: nn.LayerNorm | nn.GroupNorm,
    a: torch.Tensor,
    g: torch.Tensor,
    unit: tuple[torch.Tensor, torch.Tensor],
) -> LayerResult:
    # x-hat, the normalised input; an affine map with weight 1 and bias 0 (``unit``) takes
    # PyTorch's faster kernel than none.
    if isinstance(module, nn.GroupNorm):
        xhat = torch.group_norm(a, module.num_groups, *unit, module.eps)
        dims = tuple(range(2, a.dim()))  # sum over positions, one value per channel
    else:
        xhat = torch.layer_norm(a, module.normalized_shape, *unit, module.eps)
        dims = tuple(range(1, a.dim() - len(module.normalized_shape)))
    per_sample = []
    if module.weight is not None and module.weight.requires_grad:
        gw = g * xhat
        per_sample.append(gw.sum(dims) if dims else gw)
    if module.bias is not None and module.bias.requires_grad:
        per_sample.append(g.sum(dims) if dims else g)
    return _materialised(per_sample)


def _unit(module: nn.LayerNorm | nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight 1 and bias 0 of the shape of ``module``'s affine map."""
    ref = module.weight if module.weight is not None else module.bias
    assert ref is not None  # only layers with a trainable parameter are hooked
    return torch.ones_like(ref, requires_grad=False), torch.zeros_like(ref, requires_grad=False)


# -- the engine -----------------------------------------------------------------------------


class BookKeeping:
    """Hooks on a model's parametrised layers and the clipped, noised gradient of one step.

    Parameters
    ----------
    model : nn.Module
        A model :func:`supports` accepts; hooks are attached to it (remove with :meth:`remove`).
    max_grad_norm : float
        C, the per-sample clipping norm.

    Attributes
    ----------
    noise_std : float
        Standard deviation of the noise added to each coordinate of the clipped sum *before*
        the final division (σC; 0 for none). Set by :meth:`set_noise`.
    divisor : float
        What the noisy sum is divided by: the expected batch size for a "mean" loss, else 1.
    generator : torch.Generator or None
        Source of the noise (None: torch's global generator).
    summed : list of torch.Tensor or None
        The last backward pass's result, one gradient per parameter (:attr:`params` order),
        consumed by the optimiser step.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.layers: list[tuple[nn.Module, list[nn.Parameter]]] = []
        self._units: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                self.layers.append((module, own))
                handles.append(module.register_forward_hook(self._forward_hook))
                if isinstance(module, nn.LayerNorm | nn.GroupNorm):
                    self._units[module] = _unit(module)
        setattr(model, HOOKS_ATTR, handles)
        self.params = [p for _, ps in self.layers for p in ps]
        # (module, input, gradient edge of the output) per forward call of a layer. The edge
        # (not the output tensor) is what the backward pass differentiates with respect to:
        # it names the layer's output as computed, even if a later in-place operation (e.g.
        # MONAI ResNet's ``out += residual``) modifies the tensor.
        self._taps: list[tuple[nn.Module, torch.Tensor, Any]] = []
        self.summed: list[torch.Tensor] | None = None
        self.set_noise(0.0, 1.0, None)

    def set_noise(self, std: float, divisor: float, generator: torch.Generator | None) -> None:
        """Noise std σC, the divisor of the noisy sum and the noise generator."""
        self.noise_std = float(std)
        self.divisor = float(divisor)
        self.generator = generator
        self._c_over_d = torch.tensor(self.max_grad_norm / self.divisor)

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if output.requires_grad and module.training and torch.is_grad_enabled():
            self._taps.append((module, inputs[0], get_gradient_edge(output)))

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in getattr(self.model, HOOKS_ATTR, []):
            handle.remove()
        if hasattr(self.model, HOOKS_ATTR):
            delattr(self.model, HOOKS_ATTR)
        self.reset()

    def reset(self) -> None:
        """Forget recorded activations and clipped sums (``zero_grad``)."""
        self._taps, self.summed = [], None

    def _noise(self) -> list[torch.Tensor] | None:
        """One draw per parameter, in parameter order, as Opacus's optimiser step draws it.

        Drawn with std σC / divisor (Opacus draws σC and divides the noisy sum afterwards:
        the same numbers up to float rounding).
        """
        if self.noise_std <= 0:
            return None
        std = self.noise_std / self.divisor
        gen = self.generator
        return [torch.normal(0.0, std, p.shape, generator=gen, dtype=p.dtype) for p in self.params]

    def backward(self, loss: torch.Tensor, batch: int, scale: float) -> None:
        """Clipped, noised per-sample gradient sums of ``loss`` over ``batch`` records.

        Parameters
        ----------
        loss : torch.Tensor
            The batch loss (scalar).
        batch : int
            Records in the batch (0: an empty Poisson batch, the sum is noise only).
        scale : float
            Factor turning ``loss`` into a sum of per-sample losses (``batch`` for "mean").
        """
        taps = self._taps
        self._taps = []
        if batch == 0:
            noise = self._noise()
            self.summed = noise if noise is not None else [torch.zeros_like(p) for p in self.params]
            return
        grads = torch.autograd.grad(loss, [edge for _, _, edge in taps], allow_unused=True)
        results: dict[nn.Module, Callable[[torch.Tensor, Noise], list[torch.Tensor]]] = {}
        norms: list[torch.Tensor] = []
        with torch.no_grad():
            for (module, a, _), g in zip(taps, grads, strict=True):
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
                if isinstance(module, nn.Linear):
                    layer_norms, results[module] = _linear(module, a, g)
                elif isinstance(module, nn.Conv2d):
                    layer_norms, results[module] = _conv2d(module, a, g)
                else:  # the supported normalisation layers
                    layer = cast("nn.LayerNorm | nn.GroupNorm", module)
                    layer_norms, results[module] = _norm_layer(layer, a, g, self._units[module])
                norms += layer_norms
            if len(results) != len(self.layers):
                missing = [type(m).__name__ for m, _ in self.layers if m not in results]
                raise FedHealthError(
                    f"DP-SGD: layers {missing} took no part in the forward pass; their "
                    "parameters would get noise without a gradient. Freeze them "
                    "(requires_grad=False)."
                )
            self.summed = self._clipped_sums(results, norms, scale)

    def _clipped_sums(self, results: dict, norms: list[torch.Tensor], scale: float) -> list:
        """Noise + sum_i f_i grad_i per parameter, with every scalar folded into ``f``.

        Opacus's step is ``(sum_i c_i G_i + N(0, σ²C²)) / d`` with ``G_i = scale * grad_i``
        (the per-sample gradient of the per-sample loss), ``c_i = min(1, C / (|G_i| + 1e-6))``
        and ``d`` the divisor. So ``f_i = c_i scale / d = (C / d) / max(|grad_i| + 1e-6 /
        scale, C / scale)``; the noise is drawn with std σC / d.
        """
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)
        denom = total.add_(1e-6 / scale).clamp_(min=self.max_grad_norm / scale)
        f = torch.div(self._c_over_d, denom)
        noise = self._noise()
        summed: list[torch.Tensor] = []
        for module, params in self.layers:
            start = len(summed)
            summed += results[module](f, noise[start : start + len(params)] if noise else None)
        return summed


class BKLoss:
    """The loss a book-keeping training step returns: ``backward()`` clips per sample.

    Behaves like the loss tensor for what a training loop does with it (``backward``,
    ``detach``, ``item``, ``float``).
    """

    def __init__(self, loss: torch.Tensor, engine: BookKeeping, batch: int, scale: float):
        self.loss, self.engine, self.batch, self.scale = loss, engine, batch, scale

    def backward(self) -> None:
        """One backward pass to the layer outputs, then per-sample clipping and noise."""
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

    The noise is drawn in the backward pass (:meth:`BookKeeping.backward`), from the same
    generator and in the same order as Opacus's step draws it, so that it enters the
    clipped sums' matrix products as their additive term; the step only hands the sums to
    the inner optimiser.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The original optimiser over the model's parameters.
    engine : BookKeeping
    noise_multiplier : float
        σ; the noise std is σC per coordinate (before the division by the batch size).
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
        self.expected_batch_size = int(expected_batch_size)
        self.loss_reduction = loss_reduction
        self.generator = generator
        _check_same_params(optimizer, engine.params)
        if loss_reduction == "mean" and self.expected_batch_size < 1:
            raise FedHealthError(
                "DP-SGD: the expected batch size int(n * q) is 0, so a mean loss would be "
                "divided by zero; use a larger batch size"
            )
        engine.set_noise(
            self.noise_multiplier * engine.max_grad_norm,
            float(self.expected_batch_size) if loss_reduction == "mean" else 1.0,
            generator,
        )

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimiser's parameter groups."""
        return self.original_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and what the engine recorded."""
        self.engine.reset()
        self.original_optimizer.zero_grad(set_to_none)

    def step(self, closure: Any = None) -> Any:
        """Hand the clipped, noised, scaled sums to the inner optimiser and step it."""
        summed = self.engine.summed
        if summed is None:
            raise FedHealthError(
                "DP-SGD: no clipped gradient for this step -- the loss was not computed with "
                "PrivateTraining.criterion (or backward() was not called), so this step would "
                "not be differentially private. Compute the loss as "
                "`pt.criterion(pt.model(x), y)` and call its backward()."
            )
        self.engine.summed = None
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
