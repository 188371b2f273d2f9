"""Child processes of a fedhealth command: start with a log file, wait for readiness,
stop cleanly (SIGTERM, then SIGKILL) including the detached helpers Flower spawns.

Flower's SuperLink and SuperNode start ``flower-superexec`` in a new session, and
SuperExec starts the ServerApp/ClientApp processes; a process-group kill would miss
them, so :func:`descendants` walks ``/proc`` to find every process a child started.

:meth:`ProcessGroup.supervise` can restart a child that exits. A child killed on its own
(the OOM killer, ``kill -9``) leaves its helpers running, re-parented away from us: the
MLflow server's uvicorn worker would go on holding the port. The group therefore
remembers every child's helpers while they run and stops the ones left over before it
starts the child again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedhealth.errors import FedHealthError


class ProcessError(FedHealthError):
    """A child process failed to start or died."""

    exit_code = 7


def venv_bin() -> Path:
    """Folder of this interpreter's console scripts (flower-superlink, mlflow, ...)."""
    return Path(sys.executable).parent


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child: this venv's scripts first on PATH, telemetry off."""
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    if not Path("/proc").is_dir():
        return []
    tree, out, todo = _children_map(), [], [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot; ``None`` if it is gone): with the pid,
    this names one process even after the pid is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    with contextlib.suppress(OSError):
        if (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z":
            return False
    return True


def kill_trees(roots: list[int], timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to every root and all its descendants at once; SIGKILL what outlives
    ``timeout`` (including helpers started meanwhile)."""
    pids = [p for r in roots for p in (r, *descendants(r))]
    for p in pids:
        with contextlib.suppress(OSError):
            os.kill(p, sig)
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for p in [*pids, *(d for r in roots for d in descendants(r))]:
        if _alive(p):
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


def kill_tree(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``pid`` and all its descendants; SIGKILL whatever outlives ``timeout``."""
    kill_trees([pid], timeout, sig)


@dataclass
class Child:
    """One started child process and where it logs.

    ``env`` is the extra environment it was started with (to start it again), and
    ``helpers`` the processes it started, seen while it ran (pid -> :func:`start_time`).
    """

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen
    env: dict[str, str] | None = None
    helpers: dict[int, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        """The end of the child's log, for error messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """The children of one command; :meth:`stop` ends all of them and their helpers."""

    children: list[Child] = field(default_factory=list)
    stopping: bool = False  # set by a stop signal while :meth:`supervise` runs

    def start(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> Child:
        """Start ``argv`` with stdout and stderr appended to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        try:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(env),
            )
        except OSError as exc:
            raise ProcessError(f"could not start {name} ({argv[0]}): {exc}") from None
        finally:
            fh.close()
        child = Child(name, argv, log, proc, env)
        self.children.append(child)
        return child

    def note_helpers(self) -> None:
        """Remember the processes each running child has started (see :meth:`restart`)."""
        for child in self.children:
            if child.proc.poll() is None:
                for pid in descendants(child.pid):
                    if pid not in child.helpers and (started := start_time(pid)) is not None:
                        child.helpers[pid] = started

    def leftovers(self, child: Child) -> list[int]:
        """Helpers of ``child`` still running (after it exited, they are not its descendants)."""
        return [p for p, t in child.helpers.items() if _alive(p) and start_time(p) == t]

    def restart(self, child: Child, timeout: float = 10.0) -> Child:
        """Start an exited ``child`` again (same command, log and environment) after stopping
        whatever it left running; returns the new child, which replaces it in the group."""
        kill_trees(self.leftovers(child), timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=1)
        if child in self.children:
            self.children.remove(child)
        return self.start(child.name, child.argv, child.log, child.env)

    def wait_port(self, child: Child, host: str, port: int, timeout: float = 60.0) -> None:
        """Wait until ``child`` listens on ``host:port``; fail if it dies or times out (or,
        while :meth:`supervise` runs, when asked to stop)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.stopping:
                raise ProcessError(f"stopped while waiting for {child.name}")
            if child.proc.poll() is not None:
                raise ProcessError(
                    f"{child.name} exited with code {child.proc.returncode} while starting; "
                    f"its log {child.log} ends with:\n{child.tail()}"
                )
            if port_open(host, port):
                return
            time.sleep(0.2)
        raise ProcessError(
            f"{child.name} did not listen on {host}:{port} within {timeout:.0f} s; "
            f"see its log {child.log}"
        )

    def wait_log(self, child: Child, text: str, timeout: float = 60.0) -> None:
        """Wait until ``text`` appears in ``child``'s log; fail if it dies or times out."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if child.proc.poll() is not None:
                raise ProcessError(
                    f"{child.name} exited with code {child.proc.returncode}; "
                    f"its log {child.log} ends with:\n{child.tail()}"
                )
            if text in child.log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise ProcessError(f"{child.name} not ready within {timeout:.0f} s; see {child.log}")

    def dead(self) -> list[Child]:
        """Children that have exited."""
        return [c for c in self.children if c.proc.poll() is not None]

    def pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless asked to stop meanwhile; returns whether not stopping."""
        deadline = time.time() + seconds
        while not self.stopping and time.time() < deadline:
            time.sleep(min(0.2, max(deadline - time.time(), 0.0)))
        return not self.stopping

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every child and everything it started (SIGTERM, then SIGKILL), including the
        helpers an exited child left running."""
        leftovers = [
            p for c in self.children if c.proc.poll() is not None for p in self.leftovers(c)
        ]
        kill_trees([c.pid for c in self.children] + leftovers, timeout)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=1)

    def supervise(
        self, poll: float = 0.5, restart: Callable[[Child], bool] | None = None
    ) -> Child | None:
        """Block until SIGINT/SIGTERM (returns ``None``) or a child dies for good (returns it).

        Parameters
        ----------
        poll : float
            Seconds between checks.
        restart : callable, optional
            Called with a child that exited; returns whether it restarted it (with
            :meth:`restart`; :meth:`pause` and :meth:`wait_port` return early on a stop
            signal). A child it does not restart ends the supervision.
        """
        self.stopping = False

        def handler(signum, frame) -> None:
            self.stopping = True

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self.stopping:
                self.note_helpers()
                dead = self.dead()
                if dead and (restart is None or not restart(dead[0])):
                    return None if self.stopping else dead[0]
                if not dead:
                    time.sleep(poll)
            return None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
