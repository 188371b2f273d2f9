"""A hospital's SuperNode: ``fedhealth site start PROFILE``.

The SuperNode connects to the coordinator's SuperLink with the consortium CA and its
authentication key, and tells the ClientApp which site it serves with the node
config ``profile="<absolute path of the site profile>"``. Its log goes to
``<site workspace>/logs/supernode.log``.

The SuperNode runs with ``--isolation process``: it starts no app of its own. It is
Flower's ``flower-supernode`` started as ``python -m fedhealth.deploy.flower_pacing`` (its
polling paced to tens of milliseconds while a run is active). Beside it runs the site's own
app process (:mod:`fedhealth.deploy.site_exec`, log ``<site workspace>/logs/site-exec.log``),
started once: it runs every message of every run through the installed fedhealth ClientApp
and refuses (and audits) a run whose app bundle is anything else. The two share the
SuperExec secret ``<site workspace>/superexec.secret`` and the wake-up pipe
``<site workspace>/app-wake.fifo`` (:mod:`fedhealth.deploy.wake`): the SuperNode writes to
it when a message has arrived, so the app process need not poll.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhealth.config.site import SiteProfile
from fedhealth.deploy.processes import Child, ProcessGroup
from fedhealth.deploy.site_exec import ensure_secret
from fedhealth.deploy.wake import ensure_fifo, wake_path
from fedhealth.errors import ConfigError


@dataclass
class NodeSettings:
    """Where the SuperNode connects and with which keys (profile ``[deploy]`` + CLI)."""

    superlink: str
    root_certificate: Path | None
    auth_key: Path | None
    port: int

    @classmethod
    def from_profile(cls, profile: SiteProfile, **overrides) -> NodeSettings:
        """The profile's ``[deploy]`` section with CLI overrides (``None`` = keep)."""
        d = profile.deploy
        base: dict[str, Any] = {
            "superlink": d.superlink if d else "127.0.0.1:9093",
            "root_certificate": d.root_certificate if d else None,
            "auth_key": d.auth_key if d else None,
            "port": d.port if d else 9094,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def check(self, profile_path: Path) -> None:
        """Fail early, naming the file and key, if a key file is missing."""
        for key, path in (("root_certificate", self.root_certificate), ("auth_key", self.auth_key)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(
                    f"{profile_path}: key `deploy.{key}`: {path} does not exist; copy it from "
                    "the consortium directory (sites/<name>/) written by "
                    "`fedhealth consortium init`"
                )


def supernode_argv(
    profile_path: Path, s: NodeSettings, secret: Path, wake: Path | None = None
) -> list[str]:
    """The ``flower-supernode`` command line for one site (``secret``: the SuperExec
    secret file it shares with the site's executor; ``wake``: the pipe it wakes the
    executor through)."""
    argv = [
        sys.executable, "-m", "fedhealth.deploy.flower_pacing",  # flower-supernode, paced
        "--superlink", s.superlink,
        "--host", "127.0.0.1",
        "--port", str(s.port),
        "--node-config", f'profile="{Path(profile_path).resolve()}"',
        "--isolation", "process",
        "--superexec-auth-secret-file", str(Path(secret).resolve()),
    ]  # fmt: skip
    if s.root_certificate is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(Path(s.root_certificate).resolve())]
    if s.auth_key is not None:
        argv += ["--auth-supernode-private-key", str(Path(s.auth_key).resolve())]
    if wake is not None:
        argv += ["--fedhealth-wake", str(Path(wake).resolve())]
    return argv


def executor_argv(
    profile_path: Path, s: NodeSettings, secret: Path, wake: Path | None = None
) -> list[str]:
    """The command line of the site's own app process (:mod:`fedhealth.deploy.site_exec`)."""
    argv = [
        sys.executable, "-m", "fedhealth.deploy.site_exec",
        "--runtime-api-address", f"127.0.0.1:{s.port}",
        "--profile", str(Path(profile_path).resolve()),
        "--secret-file", str(Path(secret).resolve()),
    ]  # fmt: skip
    if wake is not None:
        argv += ["--wake", str(Path(wake).resolve())]
    return argv


def log_path(profile: SiteProfile) -> Path:
    """The SuperNode's log file."""
    return profile.workspace / "logs" / "supernode.log"


def executor_log_path(profile: SiteProfile) -> Path:
    """The site executor's log file (its task processes log there too)."""
    return profile.workspace / "logs" / "site-exec.log"


def _start_pair(
    group: ProcessGroup,
    profile_path: Path,
    profile: SiteProfile,
    s: NodeSettings,
    env: dict[str, str] | None = None,
) -> tuple[Child, Child]:
    """Start the SuperNode and the site's app process; returns both."""
    secret = ensure_secret(profile.workspace)
    wake = ensure_fifo(wake_path(profile.workspace))
    node = group.start(
        f"SuperNode of {profile.name}",
        supernode_argv(profile_path, s, secret, wake),
        log_path(profile),
        env,
    )
    executor = group.start(
        f"app process of {profile.name}",
        executor_argv(profile_path, s, secret, wake),
        executor_log_path(profile),
        env,
    )
    return node, executor


def start_site(
    profile_path: Path,
    profile: SiteProfile,
    s: NodeSettings,
    group: ProcessGroup | None = None,
    env: dict[str, str] | None = None,
) -> tuple[ProcessGroup, Child]:
    """Start the site's SuperNode and wait until its local API listens."""
    s.check(profile_path)
    group = group or ProcessGroup()
    child, _ = _start_pair(group, profile_path, profile, s, env)
    try:
        group.wait_port(child, "127.0.0.1", s.port, timeout=60)
    except BaseException:
        group.stop()
        raise
    return group, child


def run_site(
    profile_path: Path,
    profile: SiteProfile,
    s: NodeSettings,
    say=print,
    retry_delay: float = 3.0,
) -> int:
    """Run the site's SuperNode and app process until SIGINT/SIGTERM.

    The SuperNode is restarted (with a fresh app process) when the SuperLink refuses to
    activate it (coordinator down, or this site's previous session not yet expired after a
    crash: Flower keeps a node online for two 30 s heartbeats) or it exits. An app process
    that dies is restarted alone: the SuperNode keeps its session, and answers the message
    the dead process held with Flower's "ClientApp crashed" error once that task's
    heartbeat lapses.

    Returns
    -------
    int
        0 after a clean stop.
    """
    import signal
    import time

    stop = {"flag": False}

    def handler(signum, frame) -> None:
        stop["flag"] = True

    def pause() -> None:
        deadline = time.time() + retry_delay
        while not stop["flag"] and time.time() < deadline:
            time.sleep(0.2)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    group = ProcessGroup()
    try:
        while not stop["flag"]:
            group.stop()
            group.children.clear()
            node, executor = _start_pair(group, profile_path, profile, s)
            while not stop["flag"]:
                if node.proc.poll() is not None:
                    break
                if executor.proc.poll() is not None:  # the app process died: it alone
                    say(
                        f"the {executor.name} exited (code {executor.proc.returncode}); "
                        f"restarting it in {retry_delay:.0f} s - see {executor.log}"
                    )
                    pause()
                    if not stop["flag"]:
                        executor = group.restart(executor)
                time.sleep(0.3)
            if stop["flag"]:
                break
            reason = "refused activation" if "activate" in node.tail(20) else "exited"
            say(
                f"the {node.name} {reason} (code {node.proc.returncode}); restarting in "
                f"{retry_delay:.0f} s - see {node.log}"
            )
            pause()
        return 0
    finally:
        group.stop()
        for sig, h in old.items():
            signal.signal(sig, h)
