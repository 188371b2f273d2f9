"""Build the experiment's aggregation strategy: a catalogued one or a custom class.

Named strategies and their traits come from the strategy catalogue
(:data:`fedhealth.catalogue.STRATEGIES`, declared in ``fedhealth/strategies/``). Custom
strategies live in ``strategies/`` (or anywhere) and are named in the
experiment as ``path/to/file.py:ClassName``; they subclass Flower's
``flwr.serverapp.strategy.Strategy`` (usually ``FedAvg``), like the built-ins.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedhealth.catalogue import STRATEGIES, WEIGHTED_MEAN
from fedhealth.config.experiment import ExperimentConfig
from fedhealth.errors import ConfigError
from fedhealth.protocol import Metric
from fedhealth.strategies import class_traits, refusal


def builtin_traits() -> dict[type, frozenset[str]]:
    """Class -> traits of every strategy in the catalogue (imports their classes)."""
    return {entry.load(): entry.traits for entry in STRATEGIES.entries()}


def load_custom(ref: str) -> type[Strategy]:
    """Import ``/abs/path/file.py:ClassName`` and check it is a Flower strategy."""
    file_part, _, cls_name = ref.rpartition(":")
    path = Path(file_part)
    if not path.is_file():
        raise ConfigError(f"custom strategy file {path} not found (key `strategy.name`)")
    mod_name = f"fedhealth_custom_strategy_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as exc:  # noqa: BLE001 - any import failure is a config problem
        raise ConfigError(f"{path}: the custom strategy failed to import: {exc!r}") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        found = [n for n, o in vars(module).items() if inspect.isclass(o)]
        raise ConfigError(f"{path}: no class {cls_name!r} (classes defined: {', '.join(found)})")
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError(f"{path}: {cls_name} is not a subclass of flwr Strategy")
    return cls


def strategy_class(name: str) -> type[Strategy]:
    """The class an experiment's ``strategy.name`` refers to."""
    return STRATEGIES.get(name).load() if name in STRATEGIES else load_custom(name)


def strategy_traits(name: str, cls: type[Strategy]) -> frozenset[str]:
    """Traits of the experiment's strategy: the catalogue's, or the custom class's own.

    A custom class inherits the traits of the catalogued class it subclasses (a
    weighted mean only while it keeps that class's ``aggregate_train``, e.g.
    ``strategies/balanced_fedavg.py``), and may declare them as class attributes
    ``weighted_mean_aggregation`` and ``proximal_term``.
    """
    if name in STRATEGIES:
        return STRATEGIES.get(name).traits
    return class_traits(cls, builtin_traits())


def works_under_encryption(cls: type[Strategy]) -> bool:
    """Whether ``cls`` aggregates only through a weighted mean of the replies."""
    return WEIGHTED_MEAN in class_traits(cls, builtin_traits())


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """Instantiate the experiment's strategy with its options and sampling settings.

    Raises
    ------
    ConfigError
        If an option is not a parameter of the strategy (the message lists the
        accepted ones), or encryption is on and the strategy needs individual updates.
    """
    cls = strategy_class(cfg.strategy.name)
    dp = cfg.privacy.dp
    site_level = dp.enabled and dp.mode == "site"
    problem = refusal(
        cls.__name__,
        strategy_traits(cfg.strategy.name, cls),
        cfg.strategy.options,
        he=cfg.privacy.he.enabled,
        dp_mode=dp.mode if dp.enabled else None,
    )
    if problem:
        raise ConfigError(f"key `strategy.name`: {problem}")
    params = inspect.signature(cls.__init__).parameters
    exp = cfg.experiment
    kwargs: dict[str, Any] = {
        "fraction_train": exp.fraction_train,
        "fraction_evaluate": exp.fraction_evaluate,
        "min_train_nodes": exp.min_sites,
        "min_evaluate_nodes": exp.min_sites if exp.fraction_evaluate > 0 else 0,
        "min_available_nodes": exp.min_sites,
    }
    if site_level:
        kwargs["weighted_by_key"] = Metric.SITE_WEIGHT  # each site weighs 1 in site mode
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    for key, value in cfg.strategy.options.items():
        if key not in params or key == "self":
            accepted = sorted(p for p in params if p not in ("self", "args", "kwargs"))
            raise ConfigError(
                f"key `strategy.options.{key}`: {cls.__name__} has no option {key!r}; "
                f"accepted: {', '.join(accepted)}"
            )
        kwargs[key] = value
    try:
        strategy = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"key `strategy.options`: {cls.__name__} rejected them: {exc}") from None
    if site_level and getattr(strategy, "weighted_by_key", None) != Metric.SITE_WEIGHT:
        raise ConfigError(
            f"key `strategy.name`: site-level DP needs every site to weigh the same, but "
            f"{cls.__name__} weighs replies by {getattr(strategy, 'weighted_by_key', '?')!r}; "
            "use a strategy that accepts weighted_by_key (e.g. fedavg)"
        )
    return strategy


#: Strategy attributes a checkpoint does not keep (recomputed by configure_train every round).
_NOT_STATE = {"current_arrays"}


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's array state: attributes holding ndarrays, or dicts or lists of them
    (server-optimiser moments such as FedAdam's ``m_t``/``v_t``, FedAvgM's momentum).

    Flower's strategies keep this state as plain attributes and have no ``state_dict``;
    this is it, for any strategy built on Flower's base classes.
    """
    import numpy as np

    out: dict[str, Any] = {}
    for name, value in vars(strategy).items():
        if name in _NOT_STATE or name.startswith("_"):
            continue
        if isinstance(value, np.ndarray) or (
            isinstance(value, (dict, list))
            and value
            and all(
                isinstance(v, np.ndarray)
                for v in (value.values() if isinstance(value, dict) else value)
            )
        ):
            out[name] = value
    return out


def load_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    """Put :func:`strategy_state` back on the strategy."""
    for name, value in state.items():
        setattr(strategy, name, value)
