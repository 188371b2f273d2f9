"""One catalogue per kind of plug-in: models, data readers and aggregation strategies.

Each thing registers itself in the file that defines it, with its name, its traits and
(for models and readers) the pydantic schema of its options::

    @MODELS.register("mlp", traits={"tabular"}, options=MLPOptions)
    def mlp(n_features, num_classes, hidden, dropout): ...

or, when the implementation is heavy or lives in another library, by a lazy
``"module:attr"`` target that is imported only when it is used::

    STRATEGIES.declare("fedavg", "flwr.serverapp.strategy:FedAvg", traits={"weighted-mean"})

Config validation, the site and the generated docs read the catalogues; none of them
lists names. A catalogue finds its entries by importing the modules of its package that
register something (a text search for ``MODELS.register`` etc., so helper modules are not
imported). Those modules keep heavy imports (torch, pandas, flwr, pydicom) inside
functions: validating a config imports none of them (a test checks this).

This module imports only the standard library and pydantic.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One registered model, reader or strategy.

    Attributes
    ----------
    name : str
        The name configs use (``model.name``, ``datasets.<name>.kind``, ``strategy.name``).
    target : str
        ``"module:attr"`` of the implementation, imported by :meth:`load`.
    traits : frozenset of str
        What it can do: ``"tabular"``/``"image"`` (task kinds a model or reader serves),
        ``"weighted-mean"``/``"proximal"`` (strategies).
    options : type[BaseModel] or None
        Schema of its options (a model's ``[model]`` keys, a reader's
        ``[datasets.<name>]`` keys).
    summary : str
        One line for the docs.
    imports : tuple of str
        Modules the implementation imports beyond the site runtime (readers), so a site
        process can import them up front and time them.
    """

    name: str
    target: str
    traits: frozenset[str] = frozenset()
    options: type[BaseModel] | None = None
    summary: str = ""
    imports: tuple[str, ...] = ()
    obj: Any = field(default=None, compare=False, repr=False)

    def load(self) -> Any:
        """The implementation (imported on first use)."""
        if self.obj is not None:
            return self.obj
        module, _, attr = self.target.partition(":")
        value: Any = importlib.import_module(module)
        for part in attr.split("."):
            value = getattr(value, part)
        return value


class UnknownName(KeyError):
    """A name no entry of the catalogue has; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class Catalogue:
    """Entries of one kind, found in the modules of ``package`` that register them.

    Parameters
    ----------
    kind : str
        What an entry is, for messages ("model", "dataset kind", "strategy").
    package : str
        Package whose modules register entries.
    handle : str
        The name modules use for this catalogue (``MODELS``), searched for in their text.
    """

    def __init__(self, kind: str, package: str, handle: str) -> None:
        self.kind = kind
        self.package = package
        self.handle = handle
        self._entries: dict[str, Entry] = {}
        self._discovered = False

    # -- registering -------------------------------------------------------------------

    def declare(
        self,
        name: str,
        target: str,
        *,
        traits: Iterable[str] = (),
        options: type[BaseModel] | None = None,
        summary: str = "",
        imports: Iterable[str] = (),
        obj: Any = None,
    ) -> Entry:
        """Add an entry whose implementation is imported lazily from ``target``."""
        if ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: target {target!r} is not 'module:attr'")
        known = self._entries.get(name)
        if known is not None and known.target != target:
            raise ValueError(
                f"{self.kind} {name!r} is registered twice ({known.target} and {target}); "
                "rename one"
            )
        entry = Entry(name, target, frozenset(traits), options, summary, tuple(imports), obj)
        self._entries[name] = entry
        return entry

    def register(
        self,
        name: str,
        *,
        traits: Iterable[str] = (),
        options: type[BaseModel] | None = None,
        summary: str = "",
        imports: Iterable[str] = (),
    ) -> Callable[[T], T]:
        """Decorator: register the decorated function or class under ``name``."""

        def add(obj: T) -> T:
            doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
            self.declare(
                name,
                f"{obj.__module__}:{obj.__qualname__}",  # type: ignore[attr-defined]
                traits=traits,
                options=options,
                summary=summary or (doc[0] if doc else ""),
                imports=imports,
                obj=obj,
            )
            return obj

        return add

    @contextmanager
    def temporarily(self) -> Iterator[None]:
        """Keep only for the ``with`` block the entries registered in it (tests)."""
        self._discover()
        before = dict(self._entries)
        try:
            yield
        finally:
            self._entries = before

    # -- reading -----------------------------------------------------------------------

    def get(self, name: str) -> Entry:
        """The entry called ``name``.

        Raises
        ------
        UnknownName
            With the known names, so the message says what to use instead.
        """
        self._discover()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}"
            ) from None

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def names(self, trait: str | None = None) -> list[str]:
        """Registered names (with ``trait``, only those that have it), sorted."""
        return [e.name for e in self.entries() if trait is None or trait in e.traits]

    def entries(self) -> list[Entry]:
        """Every entry, sorted by name."""
        self._discover()
        return [self._entries[n] for n in sorted(self._entries)]

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        spec = importlib.util.find_spec(self.package)
        folders = list(spec.submodule_search_locations or []) if spec else []
        markers = (f"{self.handle}.register", f"{self.handle}.declare")
        for info in pkgutil.iter_modules(folders):
            path = Path(info.module_finder.path) / f"{info.name}.py"  # type: ignore[union-attr]
            if info.ispkg or not path.is_file():
                continue
            text = path.read_text(encoding="utf-8")
            if any(m in text for m in markers):
                importlib.import_module(f"{self.package}.{info.name}")


#: Networks of the model zoo (``[model] name``), registered in ``fedhealth/models/``.
MODELS = Catalogue("model", "fedhealth.models", "MODELS")
#: Dataset kinds a site may register (``[datasets.<name>] kind``), in ``fedhealth/data/``.
READERS = Catalogue("dataset kind", "fedhealth.data", "READERS")
#: Named aggregation strategies (``[strategy] name``), declared in ``fedhealth/strategies/``.
STRATEGIES = Catalogue("strategy", "fedhealth.strategies", "STRATEGIES")

#: Task kinds (``task.kind``): the trait a model or reader has when it serves that kind.
TASK_KINDS = ("tabular", "image")
#: A strategy whose aggregate is a weighted mean of the replies: it works when the
#: coordinator only ever decrypts an encrypted weighted sum, and under site-level DP.
WEIGHTED_MEAN = "weighted-mean"
#: A strategy that asks sites to add a proximal term to their loss (FedProx): the term
#: bypasses Opacus's per-sample gradients, so it cannot run with DP.
PROXIMAL = "proximal"


def options_problems(exc: ValidationError, what: str) -> str:
    """One line naming each bad key of a plug-in's options (for the enclosing message)."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(options)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "missing":
            msg = "required key is missing"
        parts.append(f"`{key}`: {msg}")
    return f"{what}: " + "; ".join(parts)
