"""Retry MLflow calls while the tracking server restarts, so no metric or version is lost.

A server restart takes seconds to minutes. :func:`retrying` keeps trying connection-level
failures with back-off up to a deadline (``$FEDHEALTH_MLFLOW_RETRY_SECONDS``, default 300),
re-raises anything that is not a connection problem at once, and when the deadline passes
raises :class:`TrackingUnavailable`, naming the server and what was being logged.

Retrying is only safe for a call that can be repeated. MLflow's own HTTP client re-sends
any request, ``POST`` included, up to seven times over about four minutes, also when the
request reached the server and only its response was lost; a re-sent "create run" or
"create model version" then creates a second one. :func:`retrying` turns that off while
its call runs (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` unless the operator set it), so that
every retry goes through code that knows whether the call creates something:
:class:`RetryingClient` for calls that can be repeated as they are (reads, tags, params,
artifacts, ending a run), and :func:`find_or_create` for calls that create something,
which first look for what a lost attempt created.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from fedhealth.errors import FederationError

T = TypeVar("T")
log = logging.getLogger("fedhealth.registry")

DEADLINE_ENV = "FEDHEALTH_MLFLOW_RETRY_SECONDS"
DEFAULT_DEADLINE = 300.0
MAX_DELAY = 5.0  # seconds between attempts at most, so a restarted server is noticed soon
_TRANSIENT = (
    "connection refused",
    "max retries exceeded",
    "failed to establish",
    "connection reset",
    "connection aborted",
    "remote end closed",
    "remotedisconnected",
    "temporarily unavailable",
    "timeout exception",
    "timed out",
    "database is locked",
)
# Gateway and availability status codes as words, not inside ids such as a run's hex uuid.
_TRANSIENT_STATUS = re.compile(r"(?<![0-9a-z])(429|502|503|504)(?![0-9a-z])")


class TrackingUnavailable(FederationError):
    """The MLflow tracking server did not answer within the retry deadline."""


def retry_seconds() -> float:
    """How long to keep retrying one MLflow call (``$FEDHEALTH_MLFLOW_RETRY_SECONDS``)."""
    return float(os.environ.get(DEADLINE_ENV, DEFAULT_DEADLINE))


HTTP_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
_http = {"depth": 0, "set": False}
_http_lock = threading.Lock()


@contextlib.contextmanager
def own_http_retries() -> Iterator[None]:
    """While inside, :func:`retrying` is the only place MLflow requests are retried.

    Sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` (which MLflow reads at every request) unless
    the operator set it, and removes it again when the outermost such block ends, so that
    nothing else in the process is affected: MLflow's HTTP client would otherwise re-send a
    request whose response was lost (creating a second run or model version) and could wait
    minutes inside one call, past our deadline.
    """
    with _http_lock:
        if _http["depth"] == 0:
            _http["set"] = HTTP_RETRIES_ENV not in os.environ
            if _http["set"]:
                os.environ[HTTP_RETRIES_ENV] = "0"
        _http["depth"] += 1
    try:
        yield
    finally:
        with _http_lock:
            _http["depth"] -= 1
            if _http["depth"] == 0 and _http["set"]:
                os.environ.pop(HTTP_RETRIES_ENV, None)
                _http["set"] = False


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` looks like the tracking server being briefly unreachable."""
    if isinstance(exc, TrackingUnavailable):
        return False  # an inner retry already waited the whole deadline
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(t in text for t in _TRANSIENT) or bool(_TRANSIENT_STATUS.search(text))


def _short(exc: BaseException, limit: int = 200) -> str:
    """The informative part of an MLflow/urllib3 error: ``[Errno 111] Connection refused``."""
    text = " ".join(str(exc).split())
    errno = re.search(r"\[Errno -?\d+\][^\"'()]*", text)
    if errno:
        return errno.group(0).strip()
    reason = re.search(r"\w+Error\(-?\d+, '([^']+)'\)", text)  # ConnectionResetError(104, ..)
    if reason:
        return reason.group(1)
    cause = text.rfind("Caused by ")
    if cause >= 0:  # urllib3's nested message: the cause is the informative part
        text = text[cause + len("Caused by ") :].rstrip(")")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def retrying(
    fn: Callable[..., T],
    *args: Any,
    what: str = "MLflow call",
    deadline: float | None = None,
    uri: str | None = None,
    hint: str = "",
    **kwargs: Any,
) -> T:
    """Call ``fn(*args, **kwargs)``, retrying transient failures until ``deadline`` seconds.

    Only retry calls that can be repeated safely (see the module's docstring).

    Parameters
    ----------
    fn : callable
        The MLflow call.
    what : str
        What it does ("logging round 3's metrics to MLflow run ..."), for the log and the
        final error.
    deadline : float, optional
        Seconds to keep trying (default ``$FEDHEALTH_MLFLOW_RETRY_SECONDS`` or 300).
    uri : str, optional
        The tracking URI, named in the log and the final error.
    hint : str
        What the user can do, appended to the final error.

    Raises
    ------
    TrackingUnavailable
        The server was unreachable for longer than ``deadline``.
    Exception
        Whatever ``fn`` raised, at once, when it is not a connection problem.
    """
    limit = deadline if deadline is not None else retry_seconds()
    server = f"the MLflow server at {uri}" if uri else "the MLflow tracking store"
    start, delay, failures = time.monotonic(), 0.5, 0
    while True:
        try:
            with own_http_retries():
                result = fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc):
                raise
            waited = time.monotonic() - start
            if waited >= limit:
                raise TrackingUnavailable(
                    f"{server} did not answer for {waited:.0f} s while {what} "
                    f"(last error: {_short(exc)}). {hint}".rstrip()
                    + f" Set {DEADLINE_ENV} (now {limit:.0f} s) to wait longer."
                ) from exc
            if failures == 0:
                log.warning(
                    "%s is unreachable while %s (%s); retrying for up to %.0f s",
                    server, what, _short(exc, 120), limit,
                )  # fmt: skip
            failures += 1
            time.sleep(min(delay, max(limit - waited, 0.05)))
            delay = min(delay * 2, MAX_DELAY)
            continue
        if failures:
            log.warning(
                "%s answered again after %.1f s (%d retries); done %s",
                server, time.monotonic() - start, failures, what,
            )  # fmt: skip
        return result


def find_or_create(find: Callable[[], T | None], create: Callable[[], T]) -> Callable[[], T]:
    """A call for :func:`retrying` that creates something at most once.

    Every attempt first calls ``find`` (what an earlier attempt, or an earlier process of
    the same run, may have created although its response was lost) and calls ``create``
    only when it finds nothing.
    """

    def call() -> T:
        found = find()
        return found if found is not None else create()

    return call


def create_once(find: Callable[[], T | None], create: Callable[[], T]) -> Callable[[], T]:
    """Like :func:`find_or_create`, but the first attempt creates without looking first
    (one request less when nothing can exist yet)."""
    tried = False

    def call() -> T:
        nonlocal tried
        if tried:
            found = find()
            if found is not None:
                return found
        tried = True
        return create()

    return call


def _describe(name: str, args: tuple, kwargs: dict) -> str:
    """A call in words, for messages: ``uploading checkpoints/round-0003.npz``."""
    if name == "log_artifact" and len(args) >= 2:
        folder = args[2] if len(args) > 2 else kwargs.get("artifact_path")
        file = Path(str(args[1])).name
        return f"uploading {f'{folder}/' if folder else ''}{file}"
    if name == "log_model_artifacts":
        return "uploading the model's files"
    return f"calling {name}"


class RetryingClient:
    """An :class:`mlflow.MlflowClient` whose public methods are each retried (:func:`retrying`).

    For calls that can be repeated as they are: reads, tags, params (a param's value never
    changes), artifacts (an upload to the same path replaces the file) and ending a run.
    Creating calls belong in :func:`find_or_create`/:func:`create_once` on :attr:`raw`.

    Parameters
    ----------
    client : mlflow.MlflowClient
        The client to wrap.
    uri : str
        Its tracking URI, for messages.
    scope : callable, optional
        Returns where the caller is ("round 3 of MLflow run ..."), for messages.
    hint : callable, optional
        Returns what the user can do when the server stays down, for the final error.
    """

    def __init__(
        self,
        client: Any,
        uri: str,
        scope: Callable[[], str] | None = None,
        hint: Callable[[], str] | None = None,
    ) -> None:
        self.raw = client
        self.uri = uri
        self._scope = scope or (lambda: "")
        self._hint = hint or (lambda: "")
        self.gave_up = False  # a call failed after the whole deadline

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.raw, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            scope = self._scope()
            what = _describe(name, args, kwargs) + (f" for {scope}" if scope else "")
            try:
                return retrying(attr, *args, what=what, uri=self.uri, hint=self._hint(), **kwargs)
            except TrackingUnavailable:
                self.gave_up = True
                raise

        call.__name__ = name
        call.__doc__ = attr.__doc__
        return call
