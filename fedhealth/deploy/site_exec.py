"""The site's own app process: the SuperNode runs no code the coordinator sends.

A run submitted to the SuperLink carries a Flower App Bundle (FAB); Flower's default
SuperNode (``--isolation subprocess``) installs it and imports whatever ``clientapp`` its
``pyproject.toml`` names — code chosen by whoever submitted the run. The site instead starts
its SuperNode with ``--isolation process`` (the SuperNode launches nothing) and runs this
process beside it:

``python -m fedhealth.deploy.site_exec --runtime-api-address 127.0.0.1:PORT --profile P``
    starts once, imports what the site's messages need (torch, the readers of the site's
    datasets, Opacus, TenSEAL; :func:`warm_up`), then serves every message of every run:
    it takes each task from the SuperNode's local Runtime API (``AcquireTask``, as Flower's
    SuperExec does), pulls the message, its run and its FAB, and checks the FAB with
    :func:`check_fab`. A FAB that is fedhealth's own app bundle at the installed fedhealth
    version runs the message through the *installed* ``fedhealth.site.client_app:app`` in
    this process (the FAB is never unpacked, installed or put on ``sys.path``); anything
    else is refused before any of its code could run: an error reply to the coordinator,
    and a ``refused`` line with rule ``untrusted-app`` in the site's audit log
    (:mod:`fedhealth.site.audit`). A message whose handler raises gets an error reply
    naming only the exception's type (the traceback stays in the site's log) and the
    process goes on with the next one. With ``--wake PIPE`` it asks the SuperNode for a
    task when the SuperNode wakes it (:mod:`fedhealth.deploy.wake`) and otherwise once a
    second; without, its polls are paced by a
    :class:`~fedhealth.deploy.flower_pacing.Pacer` (tens of milliseconds while a run is
    active).
``python -m fedhealth.deploy.site_exec task --token T ...``
    runs one task in a fresh process and exits (the same checks; for debugging a message
    in isolation).

It talks only to the SuperNode on 127.0.0.1, authenticated with the site's SuperExec
secret (``<workspace>/superexec.secret``, 0600) so that no other local account can take
the site's tasks. The process imports nothing but Flower, fedhealth and their libraries.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import sys
import time
import tomllib
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhealth import __version__
from fedhealth.deploy.flower_pacing import Pacer
from fedhealth.deploy.wake import FALLBACK_POLL, WakeReader

CLIENT_APP = "fedhealth.site.client_app:app"
APP_NAME = "fedhealth-app"
ALLOWED_FAB_FILES = {"pyproject.toml", ".info/CONTENT"}  # a FAB of fedhealth holds no code
SECRET_FILE = "superexec.secret"
RULE = "untrusted-app"
#: First pause (s) between polls of the SuperNode after a message (a local request).
EXECUTOR_POLL = 0.02
#: Longest pause (s) between those polls while a run is active.
EXECUTOR_SETTLED_POLL = 0.05


@dataclass
class FabVerdict:
    """Whether a run's app bundle is fedhealth's own; ``reason`` says why not."""

    trusted: bool
    reason: str = ""
    name: str = ""
    version: str = ""
    clientapp: str = ""


def check_fab(content: bytes, task_type: str = "flwr-clientapp") -> FabVerdict:
    """Check a run's FAB (zip bytes) against the app this site runs.

    Trusted only if the task is a ClientApp task and the bundle holds nothing but a
    ``pyproject.toml`` whose ``[project]`` is ``fedhealth-app`` at the installed fedhealth
    version and whose ``clientapp`` component is ``fedhealth.site.client_app:app``.

    Parameters
    ----------
    content : bytes
        The FAB (a zip archive).
    task_type : str
        The Flower task type of the message (``flwr-clientapp``, ``flwr-agentapp``, ...).

    Returns
    -------
    FabVerdict
    """
    if task_type != "flwr-clientapp":
        return FabVerdict(False, f"task type {task_type!r}: this site runs only ClientApp tasks")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = set(fab.namelist())
            project = tomllib.loads(fab.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return FabVerdict(False, f"the app bundle is not a readable FAB ({exc})")
    meta = project.get("project", {})
    name, version = str(meta.get("name", "")), str(meta.get("version", ""))
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    clientapp = str(components.get("clientapp", ""))
    verdict = FabVerdict(False, "", name, version, clientapp)
    extra = sorted(names - ALLOWED_FAB_FILES)
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        verdict.reason = f"the app bundle carries code or files of its own ({shown})"
    elif clientapp != CLIENT_APP:
        verdict.reason = f"its ClientApp is {clientapp!r}, not fedhealth's {CLIENT_APP!r}"
    elif name != APP_NAME:
        verdict.reason = f"the app is {name!r}, not {APP_NAME!r}"
    elif version != __version__:
        verdict.reason = (
            f"the app is fedhealth {version}, this site runs fedhealth {__version__} "
            "(coordinator and sites must run the same version)"
        )
    else:
        verdict.trusted = True
    return verdict


def secret_path(workspace: Path) -> Path:
    """The SuperExec secret shared by the site's SuperNode and this executor."""
    return Path(workspace) / SECRET_FILE


def ensure_secret(workspace: Path) -> Path:
    """Create the site's SuperExec secret (0600) unless it exists; returns its path."""
    path = secret_path(workspace)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32).hex().encode())
    return path


def _runtime_client(address: str, interceptors: list[Any]) -> Any:
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # 127.0.0.1 only: the SuperNode's local Runtime API
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), *interceptors],
        retry_invoker=make_simple_http_retry_invoker(),
    )


def warm_up(profile: Path) -> list[str]:
    """Import, once, what this site's messages need, so that no message pays for it.

    The ClientApp, the site runtime (torch), pandas (the tables' reader), the readers of
    the site's datasets, Opacus, the encrypted-reply code (TenSEAL), and one ``torch.optim`` step
    (whose first use imports ``torch._dynamo``).

    Parameters
    ----------
    profile : Path
        The site profile (which readers its datasets need).

    Returns
    -------
    list of str
        The modules imported, in order.
    """
    from fedhealth.catalogue import READERS
    from fedhealth.config.site import load_site

    modules = ["fedhealth.site.client_app", "fedhealth.site.runtime", "pandas"]
    for source in load_site(profile).datasets.values():
        modules += [m for m in READERS.get(source.kind).imports if m not in modules]
    modules += ["opacus", "fedhealth.site.encrypted_reply"]
    for name in modules:
        importlib.import_module(name)
    import torch

    model = torch.nn.Linear(1, 1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.0)
    optimiser.zero_grad()
    model(torch.zeros(1, 1)).sum().backward()
    optimiser.step()
    return modules


def run_executor(
    address: str,
    profile: Path,
    secret: Path,
    pacer: Pacer | None = None,
    wake: Path | None = None,
) -> None:
    """Serve every task of every run in this process, one at a time, until stopped.

    Parameters
    ----------
    address : str
        The SuperNode's Runtime API (``127.0.0.1:PORT``).
    profile, secret : Path
        The site profile and the SuperExec secret file.
    pacer : Pacer, optional
        Pauses between polls when there is no wake-up pipe.
    wake : Path, optional
        The site's wake-up pipe: poll when woken, else every
        :data:`~fedhealth.deploy.wake.FALLBACK_POLL` seconds.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    from fedhealth.deploy.heap import settle
    from fedhealth.flower_object_pulls import pace_object_pulls
    from fedhealth.site.timing import serving

    pace_object_pulls()  # the SuperNode hands over the message's objects at once
    reader = WakeReader(wake) if wake is not None else None  # wake-ups queue from now on
    t0 = time.perf_counter()
    modules = warm_up(profile)
    serving()  # this process's start is not any message's
    settle()  # the imports are done: later collections skip their objects
    print(f"site app process {os.getpid()} ready in {time.perf_counter() - t0:.1f} s "
          f"({', '.join(modules)}); serving every message", flush=True)  # fmt: skip
    master = load_superexec_auth_secret(str(secret))
    assert master is not None  # it returns None only when given no file
    auth = SuperExecAuthHttpInterceptor(
        master_secret=master,
        protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
    )
    client = _runtime_client(address, [auth])
    pacer = pacer or Pacer(active=EXECUTOR_POLL, settled=EXECUTOR_SETTLED_POLL)
    # Every task type is taken, so that an agent app (or any other kind) is refused and
    # audited here instead of waiting unseen on the SuperNode.
    types = [t.value for t in TaskType]
    try:
        while True:
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=types))
            if res.HasField("task") and res.token:
                pacer.busy()
                try:
                    run_task(address, res.token, profile, res.task.type)
                except Exception:  # noqa: BLE001 - logged; the next message still runs
                    traceback.print_exc()
            elif reader is not None:
                reader.wait(FALLBACK_POLL)
            else:
                time.sleep(pacer.pause())
    finally:
        client.close()
        if reader is not None:
            reader.close()


def _audit_refusal(profile: Path, run: Any, fab: Any, verdict: FabVerdict, msg: Any) -> None:
    from fedhealth.config.site import load_site
    from fedhealth.site.audit import append, audit_path

    site = load_site(profile)
    append(
        audit_path(site.workspace),
        {
            "ts": time.time(), "event": "refused", "site": site.name, "handler": "-",
            "message_type": msg.metadata.message_type if msg is not None else "",
            "rule": RULE, "message": f"refused run {run.run_id}: {verdict.reason}",
            "flwr_run": int(run.run_id), "app": f"{run.fab_id} {run.fab_version}".strip(),
            "fab_sha256": fab.hash_str,
        },
    )  # fmt: skip


def run_task(address: str, token: str, profile: Path, task_type: str) -> int:
    """Pull one message, check its run's FAB, run fedhealth's installed ClientApp or refuse.

    A handler that raises is answered with an error reply naming the exception's type
    only (its message could quote the site's data); the traceback goes to this process's
    log.

    Returns
    -------
    int
        The process exit code of a ``task`` process (0: handled, a refusal included).
    """
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    client = _runtime_client(address, [RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = None
    status, details, code = SubStatus.FAILED, "", 1
    try:
        message, context, run, fab = pull_task_input(client)
        verdict = check_fab(fab.content, task_type)
        if not verdict.trusted:
            _audit_refusal(profile, run, fab, verdict, message)
            reason = f"site refused the run's app: {verdict.reason} (rule {RULE})"
            reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=reason),
                            reply_to=message)  # fmt: skip
            details, code = reason, 0
        else:
            from fedhealth.site.client_app import app  # the installed fedhealth, never the FAB

            try:
                reply = app(message=message, context=context)
                status, code = SubStatus.COMPLETED, 0
            except Exception as exc:  # noqa: BLE001 - answered and logged, never re-raised
                traceback.print_exc()
                details = f"the site's ClientApp raised {type(exc).__name__} (see the site's log)"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=details), reply_to=message)  # fmt: skip
        push_message(client, reply, context)
    finally:
        heartbeat.stop()
        push_task_output(client, context, status, details)
        client.close()
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: the executor loop, or (``task``) one task process."""
    p = argparse.ArgumentParser(prog="python -m fedhealth.deploy.site_exec")
    p.add_argument("mode", nargs="?", default="executor", choices=["executor", "task"])
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--secret-file", type=Path)
    p.add_argument("--token")
    p.add_argument("--task-type", default="flwr-clientapp")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--wake", type=Path, help="the site's wake-up pipe (fedhealth.deploy.wake)")
    a = p.parse_args(argv)
    if a.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(a.parent_pid)
    if a.mode == "task":
        return run_task(a.runtime_api_address, a.token, a.profile, a.task_type)
    run_executor(a.runtime_api_address, a.profile, a.secret_file, wake=a.wake)
    return 0


if __name__ == "__main__":
    sys.exit(main())
