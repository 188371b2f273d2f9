"""Retry MLflow calls while the tracking server restarts, so no metric or version is lost.

A server restart takes seconds to minutes. :func:`retrying` retries (with tenacity)
failures that are typed as transient — a connection refused, reset or timed out
(``requests``/``urllib3``/OS errors, also when MLflow wraps them in an
:class:`~mlflow.exceptions.MlflowException`), or an HTTP answer meaning "try again"
(429, 502, 503, 504) — with exponential back-off up to a deadline
(``$FEDHEALTH_MLFLOW_RETRY_SECONDS``, default 300). Anything else is re-raised at once;
when the deadline passes it raises :class:`TrackingUnavailable`, naming the server and
what was being logged.

Retrying is only safe for a call that can be repeated. MLflow's own HTTP client re-sends
any request, ``POST`` included, up to seven times over about four minutes, also when the
request reached the server and only its response was lost; a re-sent "create run" or
"create model version" then creates a second one. :func:`configure_mlflow_http` therefore
switches MLflow's re-sending off once, when a coordinator process starts, so that every
retry goes through code that knows whether the call creates something:
:class:`RetryingClient` for calls that can be repeated as they are (reads, tags, params,
artifacts, ending a run), and :func:`find_or_create` for calls that create something,
which first look for what a lost attempt created.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import requests
import urllib3.exceptions
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.exceptions import MlflowException
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from fedhealth import settings
from fedhealth.errors import FederationError

T = TypeVar("T")
log = logging.getLogger("fedhealth.registry")

DEADLINE_ENV = settings.MLFLOW_RETRY_SECONDS.name
MAX_DELAY = 5.0  # seconds between attempts at most, so a restarted server is noticed soon

# The connection-level failures of an HTTP call: the server is down, restarting or slow.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # refused, reset, aborted (OSError subclasses)
    TimeoutError,
    http.client.RemoteDisconnected,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.RetryError,  # a 429/5xx answer with MLflow's re-sending switched off
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.MaxRetryError,
    urllib3.exceptions.TimeoutError,
)
# MLflow error codes of the HTTP statuses 429, 503 (502/504 arrive as RetryError above).
_TRANSIENT_CODES = {"REQUEST_LIMIT_EXCEEDED", "TEMPORARILY_UNAVAILABLE"}


class TrackingUnavailable(FederationError):
    """The MLflow tracking server did not answer within the retry deadline."""


def retry_seconds() -> float:
    """How long to keep retrying one MLflow call (``$FEDHEALTH_MLFLOW_RETRY_SECONDS``)."""
    return settings.MLFLOW_RETRY_SECONDS.get()


def configure_mlflow_http() -> None:
    """Switch off MLflow's own re-sending of HTTP requests, once per coordinator process.

    Called where a coordinator process starts (the ServerApp's main, before any MLflow
    call). MLflow reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` at every request and offers no
    per-client setting; its default re-sends a ``POST`` whose answer was lost (a second
    run, logged model or version) and can wait minutes inside one call, past our deadline.
    In a coordinator process every MLflow call goes through :func:`retrying`, so nothing
    else loses retries. An operator's own value is kept.
    """
    os.environ.setdefault(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, "0")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (MLflow wraps
    ``requests`` errors in an ``MlflowException`` raised inside the ``except``)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means the tracking server is briefly unreachable (by type, not text)."""
    if isinstance(exc, TrackingUnavailable):
        return False  # an inner retry already waited the whole deadline
    for e in _chain(exc):
        if isinstance(e, _CONNECTION_ERRORS):
            return True
        if isinstance(e, MlflowException) and e.error_code in _TRANSIENT_CODES:
            return True
    return False


def _short(exc: BaseException, limit: int = 200) -> str:
    """The innermost connection error of ``exc`` in a few words, for messages."""
    inner = [e for e in _chain(exc) if isinstance(e, _CONNECTION_ERRORS)]
    e = inner[-1] if inner else exc
    reason = getattr(e, "reason", None)  # urllib3's MaxRetryError/NewConnectionError
    if isinstance(reason, BaseException):
        e = reason
    text = " ".join(f"{type(e).__name__}: {e}".split())
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
    start = time.monotonic()

    def warn_first(state: RetryCallState) -> None:
        if state.attempt_number == 1 and state.outcome is not None:
            exc = state.outcome.exception()
            assert exc is not None  # tenacity retries only after an exception (see `retry`)
            log.warning(
                "%s is unreachable while %s (%s); retrying for up to %.0f s",
                server, what, _short(exc, 120), limit,
            )  # fmt: skip

    def give_up(state: RetryCallState) -> T:
        exc = state.outcome.exception() if state.outcome else None
        waited = time.monotonic() - start
        raise TrackingUnavailable(
            f"{server} did not answer for {waited:.0f} s while {what} "
            f"(last error: {_short(exc) if exc else 'none'}). {hint}".rstrip()
            + f" Set {DEADLINE_ENV} (now {limit:.0f} s) to wait longer."
        ) from exc

    retryer = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_delay(limit),
        wait=wait_exponential(multiplier=0.5, min=0.5, max=MAX_DELAY),
        before_sleep=warn_first,
        retry_error_callback=give_up,
        reraise=True,
    )
    result = retryer(fn, *args, **kwargs)
    attempts = retryer.statistics.get("attempt_number", 1)
    if attempts > 1:
        log.warning(
            "%s answered again after %.1f s (%d retries); done %s",
            server, time.monotonic() - start, attempts - 1, what,
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
