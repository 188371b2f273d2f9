"""A real deployment on 127.0.0.1 for the deployment tests: a coordinator (SuperLink +
MLflow server) and sites as separate ``fedhealth`` processes, torn down without leftovers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedhealth.deploy.processes import descendants, free_port, kill_tree

FEDHEALTH = str(Path(sys.executable).parent / "fedhealth")
SITES = ["st-olav", "karolinska", "charite"]
# The demo tables of the quickstart hospitals are small (25-81 test records): like the
# quickstart's own profiles (sites/*.toml), the test sites accept splits of 20 records, below
# the default minimum of 50 (a site would refuse to evaluate on its test split otherwise).
DEMO_MIN_SPLIT_RECORDS = 20


def demo_privacy(min_split_records: int = DEMO_MIN_SPLIT_RECORDS) -> str:
    """The ``[privacy]`` section of a test site on demo data: the default policy but for the
    smallest split it computes on."""
    return f"\n[privacy]\nmin_split_records = {min_split_records}\n"


def wait_for(cond, timeout: float, what: str, poll: float = 0.1):
    """Poll ``cond()`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def privacy_sections(root: Path, dp: bool = True, he: bool = True) -> str:
    """``[privacy.dp]`` (record-level DP-SGD, ε = 1 per site) and ``[privacy.he]`` (the
    consortium's keys under ``<root>/consortium``) for :func:`write_experiment`'s ``extra``."""
    out = ""
    if dp:
        out += (
            "\n[privacy.dp]\nenabled = true\ntarget_epsilon = 1.0\ndelta = 1e-3\n"
            "max_grad_norm = 1.0\n"
        )
    if he:
        out += f'\n[privacy.he]\nenabled = true\nkeys_dir = "{root / "consortium"}"\nquorum = 2\n'
    return out


def write_experiment(root: Path, name: str, sites: list[str], **over) -> Path:
    """A small tabular experiment (breast cancer demo table) for the deployment tests;
    ``extra`` is appended (e.g. :func:`privacy_sections`)."""
    rounds = over.get("rounds", 3)
    extra = over.get("extra", "")
    text = f"""
[experiment]
name = "{name}"
sites = [{", ".join(f'"sites/{s}.toml"' for s in sites)}]
rounds = {rounds}
min_sites = {over.get("min_sites", 2)}
seed = 7
round_timeout = {over.get("round_timeout", 25)}

[task]
dataset = "breast-cancer"
kind = "tabular"
num_classes = 2
normalisation = "site"

[task.schema]
label = "diagnosis"
label_map = {{ benign = 0, malignant = 1 }}
missing = "error"
numeric = ["mean_radius", "mean_texture", "mean_perimeter", "mean_area", "mean_smoothness"]

[model]
name = "logistic_regression"

[training]
local_epochs = 1
batch_size = 32
learning_rate = 0.1

[tracking]
registered_model = "{name}"
{extra}
"""
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


def write_site(
    root: Path,
    site: str,
    data: Path,
    port: int,
    superlink: str,
    tls: bool,
    extra: str = "",
    min_split_records: int = DEMO_MIN_SPLIT_RECORDS,
) -> Path:
    """A site profile whose [deploy] section points at the provisioned keys, with the demo
    data's split minimum (:func:`demo_privacy`); ``extra`` is appended (more datasets)."""
    keys = root / "consortium" / "sites" / site
    deploy = f'superlink = "{superlink}"\nport = {port}\n'
    if tls:
        deploy += f'root_certificate = "{keys / "tls" / "ca.pem"}"\n'
        deploy += f'auth_key = "{keys / "supernode.key"}"\n'
    if (keys / "identity.pem").is_file():  # the consortium was provisioned with HE keys
        extra = (
            f'[keys]\nidentity = "{keys / "identity.pem"}"\n'
            f'he_secret = "{keys / "he-secret.wrapped"}"\n'
            f'registry = "{root / "consortium" / "public" / "registry.json"}"\n\n{extra}'
        )
    text = f"""
[site]
name = "{site}"
workspace = "{root / "site-ws"}"

[datasets.breast-cancer]
kind = "tabular"
path = "{data / site / "breast-cancer.csv"}"

[deploy]
{deploy}
{demo_privacy(min_split_records)}
{extra}"""
    path = root / "sites" / f"{site}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@dataclass
class Deployment:
    """Processes of one test deployment; :meth:`teardown` kills every one of them."""

    root: Path
    tls: bool = True
    link_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = dict(os.environ, FLWR_HOME=str(self.root / "flwr-home"), COLUMNS="200")
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.env["FEDHEALTH_MLFLOW_RETRY_SECONDS"] = "120"

    @property
    def tracking_uri(self) -> str:
        """The coordinator's MLflow server."""
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def superlink(self) -> str:
        """The SuperLink's address."""
        return f"127.0.0.1:{self.link_port}"

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a ``fedhealth`` command to completion."""
        return subprocess.run(
            [FEDHEALTH, *args], cwd=self.root, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        """Start a long-running ``fedhealth`` command, output to ``<root>/<name>.out``."""
        out = open(self.root / f"{name}.out", "ab")  # noqa: SIM115 - closed by the child's end
        proc = subprocess.Popen(
            [FEDHEALTH, *args], cwd=self.root, env=self.env, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        out.close()
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        """What a spawned command printed so far."""
        path = self.root / f"{name}.out"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait_output(self, name: str, text: str, timeout: float = 90) -> None:
        """Wait until a spawned command prints ``text``; fail with its output otherwise."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.output(name):
                return
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.3)
        raise AssertionError(f"{name} did not print {text!r}:\n{self.output(name)[-3000:]}")

    @property
    def coordinator_dir(self) -> Path:
        """The coordinator's files only (``fedhealth consortium coordinator-dir``)."""
        return self.root / "coordinator-files"

    @property
    def mlflow_admin(self) -> Path:
        """The MLflow admin's credentials file."""
        if self.tls:
            return self.coordinator_dir / "coordinator" / "mlflow" / "admin.json"
        return self.root / "coordinator" / "mlflow" / "admin.json"

    def start_coordinator(self, host: str | None = None) -> None:
        """``fedhealth coordinator start`` and wait until it says it runs; then this process
        and the commands it runs use the MLflow admin account (the server requires one)."""
        args = [
            "coordinator", "start", "--consortium", str(self.coordinator_dir),
            "--workspace", str(self.root / "coordinator"), "--port", str(self.link_port),
            "--mlflow-port", str(self.mlflow_port), "--federation", "test",
        ]  # fmt: skip
        if host:
            args += ["--host", host]
        if not self.tls:
            args.append("--insecure")
        self.spawn("coordinator", *args)
        self.wait_output("coordinator", "Ctrl-C stops the coordinator", timeout=300)
        from fedhealth.deploy.mlflow_auth import Credentials

        creds = Credentials.load(self.mlflow_admin).env()
        self.env.update(creds)
        os.environ.update(creds)  # MLflow clients in the test process

    def start_site(self, site: str) -> None:
        """``fedhealth site start`` for one site."""
        self.spawn(f"site-{site}", "site", "start", str(self.root / "sites" / f"{site}.toml"))
        self.wait_output(f"site-{site}", "Ctrl-C stops the site", timeout=180)

    def start_sites(self, sites: list[str]) -> None:
        """``fedhealth site start`` for several sites at once."""
        for site in sites:
            self.spawn(f"site-{site}", "site", "start", str(self.root / "sites" / f"{site}.toml"))
        for site in sites:
            self.wait_output(f"site-{site}", "Ctrl-C stops the site", timeout=180)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a spawned command and everything it started (a crash with SIGKILL)."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            kill_tree(proc.pid, timeout=5, sig=sig)
            proc.wait(timeout=10)

    def freeze(self, name: str) -> None:
        """SIGSTOP a spawned command and everything it started: it can do nothing more,
        so a crash lands exactly here (follow with :meth:`kill`)."""
        proc = self.procs.get(name)
        if proc is not None:
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)

    def teardown(self) -> None:
        """Kill every process of the deployment, helpers included."""
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


def provisioned_consortium(
    root: Path, sites: list[str], he: bool = True, hosts: tuple[str, ...] = ()
) -> Deployment:
    """Demo data, a TLS + SuperNode-auth consortium (with the HE key ceremony unless
    ``he`` is false; ``hosts``: more names of the coordinator), the coordinator's own copy
    of its files, and one profile per site."""
    from fedhealth.data.demo import write_demo_data

    data = root / "data"
    write_demo_data(data, sites, seed=0, images_per_site=4)
    dep = Deployment(root)
    flags = ([] if he else ["--no-he"]) + [f"--host={h}" for h in hosts]
    res = dep.cli("consortium", "init", *sites, "--dir", str(root / "consortium"), *flags)
    assert res.returncode == 0, res.stdout + res.stderr
    res = dep.cli(
        "consortium", "coordinator-dir", str(dep.coordinator_dir), "--dir", str(root / "consortium")
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for site in sites:
        write_site(root, site, data, free_port(), dep.superlink, tls=True)
    return dep
