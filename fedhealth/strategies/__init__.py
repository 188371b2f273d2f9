"""Named aggregation strategies and the rules that say where each may run.

Strategies are declared in this package's modules (``flower.py`` holds Flower's
built-ins) with a lazy ``"module:class"`` target and their traits, so config validation
knows names and traits without importing Flower. A custom strategy named by path
(``strategies/file.py:Class``) declares its traits as class attributes instead:
``weighted_mean_aggregation`` and ``proximal_term`` (see :func:`class_traits`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedhealth.catalogue import PROXIMAL, STRATEGIES, WEIGHTED_MEAN


def refusal(
    label: str,
    traits: Iterable[str],
    options: Mapping[str, Any],
    *,
    he: bool,
    dp_mode: str | None,
) -> str | None:
    """Why a strategy cannot run with these privacy settings, or ``None`` if it can.

    Parameters
    ----------
    label : str
        The strategy as the message should name it.
    traits : iterable of str
        Its traits (:data:`fedhealth.catalogue.WEIGHTED_MEAN`, ``PROXIMAL``).
    options : mapping
        ``strategy.options`` (a ``proximal_mu`` there makes any strategy proximal).
    he : bool
        ``privacy.he.enabled``.
    dp_mode : str or None
        ``privacy.dp.mode`` when DP is on, else ``None``.
    """
    traits = set(traits)
    mean_ones = ", ".join(STRATEGIES.names(WEIGHTED_MEAN))
    if dp_mode is not None and (PROXIMAL in traits or "proximal_mu" in options):
        proximal = STRATEGIES.names(PROXIMAL)
        usable = [n for n in STRATEGIES.names(WEIGHTED_MEAN) if n not in proximal]
        return (
            f"`privacy.dp.enabled` with {label}, a FedProx-style strategy (`strategy.name`/"
            "`strategy.options.proximal_mu`): the proximal term is added outside "
            "Opacus's per-sample "
            f"gradients, so it would be dropped or break clipping. Use {', '.join(usable)} "
            "with DP"
        )
    if he and WEIGHTED_MEAN not in traits:
        return (
            f"strategy {label} needs every site's individual update, but with "
            "`privacy.he.enabled` the coordinator only ever decrypts their weighted sum. "
            f"Use a weighted-mean strategy ({mean_ones}, or a subclass that keeps their "
            "aggregate_train) or turn privacy.he off"
        )
    if dp_mode == "site" and WEIGHTED_MEAN not in traits:
        return (
            f'site-level DP (`privacy.dp.mode = "site"`) calibrates its noise for the plain '
            f"mean of the sites' clipped updates, but {label} aggregates otherwise. Use one "
            f"of {mean_ones}"
        )
    return None


def class_traits(cls: type, builtin: Mapping[type, frozenset[str]]) -> frozenset[str]:
    """Traits of a strategy class: declared as class attributes, else inherited.

    Parameters
    ----------
    cls : type
        The strategy class.
    builtin : mapping
        Class -> traits of the catalogue's entries (loaded by the caller, which may import
        Flower).

    Returns
    -------
    frozenset of str
        ``weighted_mean_aggregation = True/False`` and ``proximal_term = True/False`` on the
        class win; otherwise the traits of the first catalogued base class, where
        ``weighted-mean`` holds only if the class keeps that base's ``aggregate_train``.
    """
    traits: set[str] = set()
    for base in cls.__mro__:
        known = builtin.get(base)
        if known is not None:
            traits = set(known)
            if getattr(cls, "aggregate_train", None) is not getattr(base, "aggregate_train", None):
                traits.discard(WEIGHTED_MEAN)
            break
    for attr, trait in (("weighted_mean_aggregation", WEIGHTED_MEAN), ("proximal_term", PROXIMAL)):
        declared = getattr(cls, attr, None)
        if declared is True:
            traits.add(trait)
        elif declared is False:
            traits.discard(trait)
    return frozenset(traits)
