"""Record-level DP-SGD at a site: book-keeping or Opacus's ``make_private``, made safe.

:func:`make_private` validates the model (naming any layer that breaks DP),
picks the per-sample-gradient path, wraps model, optimiser and loader, and
returns them with the criterion the training loop must use.

``auto`` picks ``"bk"`` -- fedhealth's book-keeping DP-SGD
(:mod:`fedhealth.privacy.dp.bookkeeping`, with the vectorised Poisson loader of
:mod:`fedhealth.privacy.dp.poisson`) -- whenever every trainable layer is a Linear,
Conv2d, LayerNorm or GroupNorm (every model of the zoo) and ``secure_mode`` is off. It
computes the same clipped, noised gradient as Opacus from the same generators, without
Opacus's per-step bookkeeping; ``benchmarks/dp_throughput.py`` measures both. Other
models go to Opacus, where ``auto`` chooses as follows.

Opacus's per-sample-gradient paths, measured on Opacus 1.6.0 /
torch 2.13 CPU, one thread, median step time (log. reg. 512->2 and MLP
512-512-512-2 at batch 256; CNN conv32-conv64 on 32x32 at batch 64;
DenseNet121 on 1x64x64 at batch 16). All four train with both ``hooks`` and
``ghost``; ``functorch`` works too (as fast as hooks or slower):

================================  =======  ============  =============================
model                             hooks    ghost         ``auto`` picks
================================  =======  ============  =============================
Sequential(Linear) log. reg.      1.3 ms   1.3 ms        hooks (batch x params < 1e6)
MLP with LayerNorm (512 wide)     678 ms   23 ms         ghost (Linear ≈ all params)
small CNN with GroupNorm          252 ms   315 ms        hooks (conv params dominate)
MONAI DenseNet121 (GroupNorm 8)   1.10 s   1.28 s        hooks (conv params dominate)
================================  =======  ============  =============================

Ghost clipping (Li et al. 2022; ``grad_sample_mode="ghost"``) computes per-sample
gradient *norms* without materialising per-sample gradients, but Opacus 1.6
has ghost norm samplers only for ``Linear`` and ``Embedding``; every other
layer falls back to materialising its per-sample gradients, plus a second
backward pass. So ghost wins when Linear/Embedding hold most parameters and
loses on conv nets. ``auto`` picks ghost iff at least ``GHOST_MIN_FRACTION`` of
the trainable parameters sit in ghost-capable layers, no parameter is shared,
and the work it saves is large enough: batch size x ghost-capable parameters of
at least ``GHOST_MIN_WORK`` (below it the second backward pass costs more than
materialising per-sample gradients: the quickstart's 30-32-2 MLP at batch 16
takes 1.2 ms per step with hooks and 1.8 ms with ghost; a 30-128-128-2 MLP at
batch 64 takes 5.1 ms with hooks and 2.6 ms with ghost). Else hooks.
``"ew"`` (PyTorch expanded weights) and ``"functorch"`` may be requested
explicitly; ``ew`` fails on DenseNet121 (a PyTorch expanded-weights view error
in conv) and is never picked automatically.

In-place activations (``ReLU(inplace=True)``, as in MONAI's DenseNet121) break
Opacus's backward hooks ("Output 0 of BackwardHookFunction is a view and is
being modified inplace"); :func:`make_private` switches every module's
``inplace`` flag off (same outputs, a little more memory) and says so in
``PrivateTraining.notes``. In-place tensor ops written in a model's
``forward`` (e.g. MONAI ResNet's ``out += residual``) cannot be fixed from
outside: such a model needs ``grad_sample_mode="ew"``.

The training loop contract (same for every path; ``bk`` and ghost need ``pt.criterion``)::

    pt = make_private(model, optimizer, loader, noise_multiplier=1.1, max_grad_norm=1.0)
    for x, y in pt.data_loader:          # Poisson batches, possibly empty
        pt.optimizer.zero_grad()
        loss = pt.criterion(pt.model(x), y)
        loss.backward()                  # ghost: two backward passes inside
        pt.optimizer.step()

With book-keeping or ghost clipping the loss **must** come from ``pt.criterion``: a plain
loss would skip clipping. A guard refuses the optimiser step if that happens.
Count every loader iteration (empty batches included) as a step for the
accountant; ``steps_per_epoch`` gives the number Opacus's loader yields.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedhealth.errors import ConfigError, FedHealthError

GRAD_SAMPLE_MODES = ("auto", "bk", "hooks", "ghost", "ew", "functorch")

#: ``auto`` uses ghost clipping when at least this fraction of the trainable
#: parameters is in layers Opacus can ghost-clip (Linear, Embedding).
GHOST_MIN_FRACTION = 0.5

#: ... and when batch size x those parameters reaches this (measured crossover,
#: ``benchmarks/dp_throughput.py``); without a batch size this condition is skipped.
GHOST_MIN_WORK = 1_000_000


@dataclass
class PrivateTraining:
    """Everything a DP-SGD training loop needs, as returned by :func:`make_private`.

    Attributes
    ----------
    model : nn.Module
        Opacus's wrapper around the model (train this one).
    optimizer : torch.optim.Optimizer
        The DP optimiser (clips and adds noise in ``step``).
    data_loader : DataLoader
        Poisson-sampling loader (variable, possibly empty batches).
    criterion : callable
        The loss to use -- always, and mandatory with ghost clipping.
    grad_sample_mode : str
        The per-sample-gradient path in use: "hooks", "ghost", "ew" or "functorch".
    sample_rate : float
        q of each step (what the accountant must be charged with).
    steps_per_epoch : int
        Batches one pass over ``data_loader`` yields.
    noise_multiplier, max_grad_norm : float
        σ and the per-sample clipping norm C.
    notes : list of str
        What was changed or decided on the way (in-place flags, fallbacks).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader
    criterion: Any
    grad_sample_mode: str
    sample_rate: float
    steps_per_epoch: int
    noise_multiplier: float
    max_grad_norm: float
    notes: list[str] = field(default_factory=list)
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> nn.Module:
        """Remove the DP-SGD hooks and return the plain model (e.g. to re-wrap next round).

        Returns
        -------
        nn.Module
        """
        if self._release is not None:
            self._release()
            return self.model
        to_standard = getattr(self.model, "to_standard_module", None)
        return to_standard() if to_standard is not None else self.model


def steps_per_epoch(n_records: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches Opacus's Poisson loader yields per epoch.

    Opacus sets ``q = 1 / len(loader)`` and runs ``int(1 / q)`` batches, which in
    floating point is ``len(loader) - 1`` for some sizes (93 batches -> 92).
    This reproduces it exactly.

    Parameters
    ----------
    n_records : int
        Size of the site's training split.
    batch_size : int
        Batch size of the original (non-private) loader.
    drop_last : bool
        ``drop_last`` of the original loader (it changes ``len(loader)``).

    Returns
    -------
    int
    """
    return int(1 / sample_rate(n_records, batch_size, drop_last))


def sample_rate(n_records: int, batch_size: int, drop_last: bool = False) -> float:
    """Poisson sampling rate q Opacus uses: ``1 / len(original loader)``.

    This is ``1 / ceil(n / batch_size)`` (``1 / floor(...)`` with
    ``drop_last``), which is *at most* ``batch_size / n``.

    Parameters
    ----------
    n_records : int
        Size of the site's training split.
    batch_size : int
        Batch size of the original loader.
    drop_last : bool
        ``drop_last`` of the original loader.

    Returns
    -------
    float
    """
    n, b = int(n_records), int(batch_size)
    if n < 1 or b < 1:
        raise ConfigError(f"need at least 1 record and batch size >= 1, got n={n}, batch={b}")
    batches = n // b if drop_last else math.ceil(n / b)
    if batches < 1:
        raise ConfigError(
            f"batch size {b} is larger than the {n} records with drop_last: no batch at all"
        )
    return 1 / batches


def validate_model(model: nn.Module, site: str | None = None) -> None:
    """Refuse a model DP-SGD cannot train privately, naming the offending layers.

    Runs ``opacus.validators.ModuleValidator.validate(model, strict=True)``;
    also refuses *any* BatchNorm (even frozen: in train mode it still
    normalises with batch statistics, which couples the samples of a batch).

    Parameters
    ----------
    model : nn.Module
    site : str, optional
        For the message.

    Raises
    ------
    ConfigError
    """
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import UnsupportedModuleError

    where = f" at site {site!r}" if site else ""
    problems: list[str] = []
    try:
        ModuleValidator.validate(model, strict=True)
    except UnsupportedModuleError as exc:
        for name, sub in trainable_modules(model):
            validator = ModuleValidator.VALIDATORS.get(type(sub))
            for err in validator(sub) if validator else []:
                why = str(err).split(". ")[0].rstrip(".")
                problems.append(f"layer {name or '<root>'!r} ({type(sub).__name__}): {why}")
        if not problems:
            problems = [str(e) for e in (exc.args[0] if exc.args else [exc])]
    for name, sub in model.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not any(
            f"layer {name!r}" in p for p in problems
        ):
            problems.append(
                f"layer {name!r} ({type(sub).__name__}): BatchNorm mixes the samples of a batch"
            )
    if problems:
        raise ConfigError(
            f"the model cannot be trained with DP-SGD{where}: " + "; ".join(problems) + ". "
            "Replace BatchNorm by GroupNorm (fedhealth.models.imaging.batchnorm_to_groupnorm or "
            "opacus.validators.ModuleValidator.fix) and choose a DP-safe model from the zoo."
        )


def pick_grad_sample_mode(model: nn.Module, batch_size: int | None = None) -> str:
    """The Opacus path ``auto`` uses when book-keeping cannot: "ghost" or "hooks".

    Parameters
    ----------
    model : nn.Module
    batch_size : int, optional
        Expected batch size; with it, ghost is picked only when batch size x
        ghost-capable parameters is at least ``GHOST_MIN_WORK``.

    Returns
    -------
    str
    """
    from opacus.grad_sample import GradSampleHooksFastGradientClipping

    ghost_types = tuple(GradSampleHooksFastGradientClipping.NORM_SAMPLERS)
    seen: set[int] = set()
    total = in_ghost = 0
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            if id(p) in seen:  # shared parameter / reused module: ghost refuses tying
                return "hooks"
            seen.add(id(p))
            total += p.numel()
            if type(module) in ghost_types:
                in_ghost += p.numel()
    enough = batch_size is None or int(batch_size) * in_ghost >= GHOST_MIN_WORK
    if total and in_ghost / total >= GHOST_MIN_FRACTION and enough and _ghost_api_available():
        return "ghost"
    return "hooks"


def _ghost_api_available() -> bool:
    """Whether the installed Opacus has the ghost-clipping API this module uses."""
    try:
        from opacus import PrivacyEngine
        from opacus.grad_sample.utils import get_gsm_class

        get_gsm_class("ghost")
        return "criterion" in inspect.signature(PrivacyEngine.make_private).parameters
    except Exception:  # noqa: BLE001 - any mismatch means "not available"
        return False


def _disable_inplace(model: nn.Module) -> list[str]:
    changed = []
    for name, module in model.named_modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
            changed.append(name)
    return changed


def _rollback_hooks(model: nn.Module) -> None:
    """Undo what a failed ``make_private`` attached to ``model``."""
    handles = getattr(model, "autograd_grad_sample_hooks", None)
    if handles is not None:
        while handles:
            handles.pop().remove()
        del model.autograd_grad_sample_hooks
    for module in model.modules():
        if hasattr(module, "ft_compute_sample_grad"):
            del module.ft_compute_sample_grad


def _guard_ghost_step(gsm: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimiser steps whose gradients were not clipped by the ghost criterion."""
    inner_step = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if getattr(gsm, "_per_sample_gradient_norms", None) is None:
            raise FedHealthError(
                "DP-SGD with ghost clipping: the loss was not computed with "
                "PrivateTraining.criterion, so per-sample gradients were not clipped and this "
                "step would not be differentially private. Compute the loss as "
                "`pt.criterion(pt.model(x), y)` (or pass grad_sample_mode='hooks')."
            )
        try:
            return inner_step(*args, **kwargs)
        finally:
            gsm._per_sample_gradient_norms = None  # type: ignore[assignment]  # torch's stub: tensors/modules only

    optimizer.step = step  # type: ignore[method-assign]


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
    grad_sample_mode: str = "auto",
    criterion: Any = None,
    noise_generator: torch.Generator | None = None,
    secure_mode: bool = False,
    site: str | None = None,
) -> PrivateTraining:
    """Wrap model, optimiser and loader for record-level DP-SGD.

    Parameters
    ----------
    model : nn.Module
        The model (switched to train mode; in-place activation flags are turned off).
    optimizer : torch.optim.Optimizer
        An optimiser over ``model``'s parameters.
    data_loader : DataLoader
        The site's training loader; its ``batch_size`` sets q = 1 / len(loader).
    noise_multiplier : float
        σ: noise std / clipping norm.
    max_grad_norm : float
        C: per-sample gradient clipping norm.
    poisson_sampling : bool
        Replace the loader by a Poisson-sampling loader (required for the
        accountant's guarantee; False is only an approximation).
    grad_sample_mode : {"auto", "bk", "hooks", "ghost", "ew", "functorch"}
        Per-sample-gradient path; see the module docstring for what ``auto`` picks.
    criterion : callable, optional
        Loss module (default ``nn.CrossEntropyLoss()``); its ``reduction``
        ("mean" or "sum") is used for the whole pipeline.
    noise_generator : torch.Generator, optional
        Seeded noise for reproducible tests only -- a known seed voids the privacy.
    secure_mode : bool
        Opacus's cryptographically secure noise (needs ``torchcsprng``; Opacus paths only).
    site : str, optional
        Site name for error messages.

    Returns
    -------
    PrivateTraining

    Raises
    ------
    ConfigError
        Invalid parameters, a model DP-SGD cannot train (naming the layer), or
        a per-sample-gradient path that does not work for the model.
    """
    where = f" at site {site!r}" if site else ""
    sigma, clip = _check_noise(noise_multiplier, max_grad_norm, where)
    criterion, reduction = _check_criterion(criterion, where)
    notes = _prepare_model(model, where, site)
    mode = _choose_mode(model, grad_sample_mode, data_loader, secure_mode, notes, where)
    if not poisson_sampling:
        notes.append("poisson_sampling=False: the accountant's guarantee is only approximate")
    args = _Args(sigma, clip, criterion, reduction, poisson_sampling, noise_generator, secure_mode)
    if mode == "bk":
        return _wrap_bookkeeping(model, optimizer, data_loader, args, notes)
    return _wrap_opacus(model, optimizer, data_loader, args, mode, grad_sample_mode, notes, where)


@dataclass
class _Args:
    """The validated DP-SGD settings every wrapping path needs."""

    sigma: float
    clip: float
    criterion: Any
    reduction: str
    poisson_sampling: bool
    noise_generator: torch.Generator | None
    secure_mode: bool


def _check_noise(noise_multiplier: float, max_grad_norm: float, where: str) -> tuple:
    """σ and C as floats, refused unless σ >= 0 and C > 0 (both finite)."""
    sigma, clip = float(noise_multiplier), float(max_grad_norm)
    if not math.isfinite(sigma) or sigma < 0:
        raise ConfigError(f"noise multiplier must be >= 0{where}, got {noise_multiplier!r}")
    if not math.isfinite(clip) or clip <= 0:
        raise ConfigError(f"max_grad_norm must be > 0{where}, got {max_grad_norm!r}")
    return sigma, clip


def _check_criterion(criterion: Any, where: str) -> tuple[Any, str]:
    """The loss (default cross-entropy) and its reduction, which must be "mean" or "sum"."""
    if criterion is None:
        criterion = nn.CrossEntropyLoss()
    reduction = getattr(criterion, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ConfigError(
            f"the loss must reduce with 'mean' or 'sum' for DP-SGD{where}, got {reduction!r}"
        )
    return criterion, reduction


def _prepare_model(model: nn.Module, where: str, site: str | None) -> list[str]:
    """Refuse a model still wrapped or unfit for DP-SGD; train mode, no in-place ops."""
    from fedhealth.privacy.dp.bookkeeping import HOOKS_ATTR

    if hasattr(model, "autograd_grad_sample_hooks") or hasattr(model, HOOKS_ATTR):
        raise ConfigError(
            f"the model{where} still carries DP-SGD hooks from an earlier make_private; call "
            "PrivateTraining.release() after each round (or build a fresh model) before "
            "wrapping it again"
        )
    notes: list[str] = []
    model.train()
    changed = _disable_inplace(model)
    if changed:
        notes.append(
            f"switched off in-place operation of {len(changed)} module(s) (e.g. {changed[0]!r}): "
            "Opacus's backward hooks cannot see through in-place ops"
        )
    validate_model(model, site)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"the model has no trainable parameters{where}")
    return notes


def _choose_mode(
    model: nn.Module,
    requested: str,
    data_loader: DataLoader,
    secure_mode: bool,
    notes: list[str],
    where: str,
) -> str:
    """The per-sample-gradient path: ``requested``, or what ``auto`` picks (noted)."""
    from fedhealth.privacy.dp.bookkeeping import supports

    if requested not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"unknown grad_sample_mode {requested!r}{where}; choose one of "
            f"{', '.join(GRAD_SAMPLE_MODES)}"
        )
    if requested == "bk":
        why = "secure_mode needs Opacus's noise" if secure_mode else supports(model)
        if why:
            raise ConfigError(f"grad_sample_mode 'bk' cannot train the model{where}: {why}")
        return "bk"
    if requested == "auto":
        why = "secure_mode" if secure_mode else supports(model)
        if why is None:
            notes.append("grad_sample_mode auto -> bk")
            return "bk"
        mode = pick_grad_sample_mode(model, getattr(data_loader, "batch_size", None))
        notes.append(f"grad_sample_mode auto -> {mode} (book-keeping not possible: {why})")
        return mode
    if requested == "ghost" and not _ghost_api_available():
        raise ConfigError(
            f"grad_sample_mode 'ghost'{where} is not available in the installed Opacus; "
            "use 'hooks' or 'auto'"
        )
    return requested


def _wrap_bookkeeping(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    args: _Args,
    notes: list[str],
) -> PrivateTraining:
    """fedhealth's book-keeping DP-SGD (:mod:`fedhealth.privacy.dp.bookkeeping`)."""
    from opacus.data_loader import DPDataLoader

    from fedhealth.privacy.dp.bookkeeping import (
        BKCriterion,
        BKOptimizer,
        BookKeeping,
        expected_batch_size,
    )
    from fedhealth.privacy.dp.poisson import PoissonLoader, fast_loader_applies

    q = 1 / len(data_loader)
    loader: Any = data_loader
    if args.poisson_sampling:
        if fast_loader_applies(data_loader):
            dataset = cast(TensorDataset, data_loader.dataset)  # fast_loader_applies checked
            loader = PoissonLoader(dataset, q, data_loader.generator)
        else:
            loader = DPDataLoader.from_data_loader(data_loader)
    engine = BookKeeping(model, args.clip)
    try:
        dp_optimizer = BKOptimizer(
            optimizer,
            engine,
            args.sigma,
            expected_batch_size(len(cast(Sized, data_loader.dataset)), q),
            args.reduction,
            args.noise_generator,
        )
    except FedHealthError as exc:
        engine.remove()
        raise ConfigError(str(exc)) from None
    return PrivateTraining(
        model=model,
        optimizer=dp_optimizer,  # type: ignore[arg-type]
        data_loader=loader,
        criterion=BKCriterion(args.criterion, engine),
        grad_sample_mode="bk",
        sample_rate=q,
        steps_per_epoch=len(loader),
        noise_multiplier=args.sigma,
        max_grad_norm=args.clip,
        notes=notes,
        _release=engine.remove,
    )


def _opacus_make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    args: _Args,
    mode: str,
) -> tuple:
    """One call of Opacus's ``PrivacyEngine.make_private`` with ``mode``."""
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=args.secure_mode)
    kwargs: dict[str, Any] = {"criterion": args.criterion} if mode == "ghost" else {}
    return engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=args.sigma,
        max_grad_norm=args.clip,
        loss_reduction=args.reduction,
        poisson_sampling=args.poisson_sampling,
        grad_sample_mode=mode,
        noise_generator=args.noise_generator,
        **kwargs,
    )


def _wrap_opacus(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    args: _Args,
    mode: str,
    requested: str,
    notes: list[str],
    where: str,
) -> PrivateTraining:
    """Opacus's DP-SGD with ``mode``; ``auto``'s ghost falls back to hooks if Opacus fails."""
    try:
        out = _opacus_make_private(model, optimizer, data_loader, args, mode)
    except ImportError as exc:
        raise ConfigError(f"secure_mode needs torchcsprng{where}: {exc}") from exc
    except Exception as exc:
        _rollback_hooks(model)
        if not (requested == "auto" and mode == "ghost"):
            raise ConfigError(
                f"Opacus could not wrap the model with grad_sample_mode {mode!r}{where}: "
                f"{type(exc).__name__}: {exc}. Try grad_sample_mode='auto' or 'hooks'."
            ) from exc
        notes.append(f"ghost clipping failed ({type(exc).__name__}: {exc}); fell back to hooks")
        mode = "hooks"
        out = _opacus_make_private(model, optimizer, data_loader, args, mode)
    if mode == "ghost":
        if len(out) != 4:  # pragma: no cover - guards against an Opacus API change
            raise ConfigError(f"Opacus returned {len(out)} objects for ghost clipping, expected 4")
        wrapped, dp_optimizer, dp_criterion, loader = out
        _guard_ghost_step(wrapped, dp_optimizer)
    else:
        wrapped, dp_optimizer, loader = out
        dp_criterion = args.criterion
    return PrivateTraining(
        model=wrapped,
        optimizer=dp_optimizer,
        data_loader=loader,
        criterion=dp_criterion,
        grad_sample_mode=mode,
        sample_rate=float(getattr(loader, "sample_rate", 1 / len(data_loader))),
        steps_per_epoch=len(loader),
        noise_multiplier=args.sigma,
        max_grad_norm=args.clip,
        notes=notes,
    )
