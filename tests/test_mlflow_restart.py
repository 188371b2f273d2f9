"""The MLflow server restarting mid-run: the coordinator retries and loses no metric or
model version.

Everything here talks to a real ``mlflow server`` process (SQLite backend store and
artifact root under ``tmp_path``, started with the coordinator's own flags) on 127.0.0.1:

- a response lost on the way back (a small HTTP proxy forwards each request and drops the
  first answer of every call that creates something) creates nothing twice;
- ``fedhealth run`` (simulation: the coordinator's recorder and checkpoints are the ones
  the deployed ServerApp runs) survives the server being SIGKILLed mid-run and restarted
  on the same port with the same store, and survives it being down at registration;
- when the server stays down past the retry deadline the run fails with a message naming
  the server, what was being logged and the round, and ``--resume`` completes the run;
- ``fedhealth coordinator start`` restarts its MLflow server when it dies, within a budget.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from flwr.app import ArrayRecord
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from fedhealth.config.experiment import load_experiment_with_sites
from fedhealth.coordinator.federation import Federation
from fedhealth.deploy.coordinator import CoordinatorSettings, RestartBudget, mlflow_argv
from fedhealth.deploy.mlflow_auth import Credentials, ensure_admin, server_env
from fedhealth.deploy.processes import (
    _alive,
    child_env,
    descendants,
    free_port,
    kill_tree,
    port_open,
)
from fedhealth.registry.retry import (
    TrackingUnavailable,
    configure_mlflow_http,
    is_transient,
    retrying,
)
from tests.deploy_harness import (
    FEDHEALTH,
    SITES,
    Deployment,
    demo_privacy,
    wait_for,
    write_experiment,
)

VERSION_TAGS = {
    "sites", "rounds", "strategy", "config_hash", "fedhealth_version", "experiment", "task",
    "dataset", "seed", "dp", "he", "accuracy", "fedhealth.run_id",
    "fedhealth.registration_token",
}  # fmt: skip


# -- a real MLflow server ---------------------------------------------------------------------


@dataclass
class MlflowServer:
    """``mlflow server`` as the coordinator runs it (basic auth on: every call needs an
    account), with its store and its admin account under ``root``."""

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def admin(self) -> Credentials:
        """The server's admin account (created on first use, as the coordinator does)."""
        return ensure_admin(self.root / "mlflow" / "admin.json")[0]

    @property
    def uri(self) -> str:
        """Its tracking URI."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        """Start it (again: same port, same store) and wait until it answers."""
        s = CoordinatorSettings(workspace=self.root, consortium=None, mlflow_port=self.port)
        Path(s.artifacts()).mkdir(parents=True, exist_ok=True)
        with open(self.root / "mlflow.log", "ab") as log:
            self.proc = subprocess.Popen(
                mlflow_argv(s), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env(server_env(self.root / "mlflow", self.admin)),
            )  # fmt: skip
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "mlflow.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"mlflow server not up within {timeout} s")

    def kill(self) -> None:
        """SIGKILL the server and every process it started (a crash)."""
        assert self.proc is not None
        kill_tree(self.proc.pid, timeout=5, sig=signal.SIGKILL)
        self.proc.wait(timeout=10)
        deadline = time.time() + 10
        while port_open("127.0.0.1", self.port) and time.time() < deadline:
            time.sleep(0.1)
        assert not port_open("127.0.0.1", self.port)

    def stop(self) -> None:
        """Stop it if it runs."""
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid, timeout=5)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server; this process and the ``fedhealth run`` it starts use its admin account
    (MLflow's client reads it from the environment)."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in srv.admin.env().items():
            mp.setenv(key, value)
        srv.start()
        yield srv
        srv.stop()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Demo breast-cancer tables for the three quickstart hospitals and site profiles with the
    default privacy policy but the demo data's split minimum, beside the experiments the
    tests write."""
    from fedhealth.data.demo import write_demo_data

    root = tmp_path_factory.mktemp("consortium")
    write_demo_data(root / "data", SITES, seed=0, images_per_site=4)
    for site in SITES:
        path = root / "sites" / f"{site}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f'[site]\nname = "{site}"\nworkspace = "{root / "site-ws"}"\n\n'
            f'[datasets.breast-cancer]\nkind = "tabular"\n'
            f'path = "{root / "data" / site / "breast-cancer.csv"}"\n{demo_privacy()}'
        )
    return root


@pytest.fixture(autouse=True)
def _mlflow_client_fails_fast(monkeypatch) -> None:
    # This process polls the server while it is down: no minutes of MLflow-internal retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


# -- helpers ----------------------------------------------------------------------------------


def _quiet(fn: Callable[[], object]) -> object:
    """``fn()``, or ``None`` while the server is unreachable."""
    try:
        return fn()
    except (MlflowException, OSError):
        return None


def _the_run(client: MlflowClient, experiment: str) -> str | None:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return runs[0].info.run_id if runs else None


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _run_fedhealth(project: Path, *args: str, retry_seconds: int) -> tuple[subprocess.Popen, Path]:
    out = project / f"run-{time.monotonic_ns()}.out"
    env = dict(child_env(), COLUMNS="200", FEDHEALTH_MLFLOW_RETRY_SECONDS=str(retry_seconds))
    env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)  # the recorder's own default applies
    with open(out, "wb") as fh:
        proc = subprocess.Popen(
            [FEDHEALTH, "run", *args], cwd=project, env=env, stdout=fh,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return proc, out


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 150) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid, timeout=5)
        raise AssertionError(f"fedhealth run hung:\n{out.read_text()[-4000:]}") from None
    return code, out.read_text(errors="replace")


def assert_run_recorded_once(client: MlflowClient, experiment: str, rounds: int) -> str:
    """The experiment has one finished run; every metric holds each round exactly once; one
    checkpoint per round; one ready logged model; exactly one registered version with full
    provenance. Returns the run id."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    keys = set(run.data.metrics)
    expected = {"global/accuracy", "global/loss"} | {f"site/{s}/accuracy" for s in SITES}
    expected |= {f"site/{s}/train-loss" for s in SITES}
    assert expected <= keys, expected - keys
    for key in sorted(keys):
        # The final evaluation (ROC/calibration statistics of the last model) is one point.
        once = [rounds] if key.startswith("final/") else list(range(1, rounds + 1))
        assert _steps(client, run_id, key) == once, key
    assert any(k.startswith("final/") for k in keys), sorted(keys)
    names = sorted(f.path for f in client.list_artifacts(run_id, "checkpoints"))
    npz = [n for n in names if n.endswith(".npz")]
    assert npz == [f"checkpoints/round-{r:04d}.npz" for r in range(1, rounds + 1)], names
    models = client.search_logged_models(
        [exp.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert len(models) == 1 and models[0].status.to_int() == 2  # LoggedModelStatus.READY
    assert [o.model_id for o in run.outputs.model_outputs] == [models[0].model_id]
    versions = client.search_model_versions(f"name = '{experiment}'")
    assert [v.version for v in versions] == ["1"], [(v.version, v.run_id) for v in versions]
    mv = client.get_model_version(experiment, "1")
    assert mv.run_id == run_id and mv.status == "READY"
    assert set(mv.tags) >= VERSION_TAGS, VERSION_TAGS - set(mv.tags)
    assert set(mv.tags["sites"].split(",")) == set(SITES)
    assert mv.tags["rounds"] == str(rounds) and mv.tags["fedhealth.run_id"] == run_id
    assert run.data.tags["fedhealth.registered_version"] == f"{experiment}/1"
    return run_id


# -- a proxy that loses answers -----------------------------------------------------------------


@dataclass
class LossyProxy:
    """An HTTP proxy to the MLflow server that forwards every request and, the first time a
    request matches a rule, closes the connection instead of returning the server's answer:
    the request took effect, the client never hears of it."""

    upstream: int
    rules: dict[str, Callable[[str, str, bytes], bool]]
    dropped: list[str] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                assert "chunked" not in self.headers.get("Transfer-Encoding", "")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                skip = {"host", "connection", "content-length"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if proxy.lose(self.command, self.path, body):
                    self.close_connection = True  # the answer is lost
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def lose(self, method: str, path: str, body: bytes) -> bool:
        """Whether to lose this answer (the first match of each rule)."""
        with self._lock:
            for name, rule in self.rules.items():
                if name not in self.dropped and rule(method, path, body):
                    self.dropped.append(name)
                    return True
        return False

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def _post(suffix: str, contains: bytes = b"") -> Callable[[str, str, bytes], bool]:
    return lambda m, p, b: m == "POST" and p.split("?")[0].endswith(suffix) and contains in b


LOST_ANSWERS = {
    "create experiment": _post("/experiments/create"),
    "create run": _post("/runs/create"),
    "log metrics": _post("/runs/log-batch", b'"metrics"'),
    "create logged model": _post("/mlflow/logged-models"),
    "link model to run": _post("/runs/outputs"),
    "create registered model": _post("/registered-models/create"),
    "create model version": _post("/model-versions/create"),
    "upload model card": lambda m, p, b: m == "PUT" and p.endswith("/model_card.md"),
}


def test_lost_answers_create_nothing_twice(project, server, monkeypatch) -> None:
    """Every creating call whose answer is lost is retried without a second run, metric
    point, logged model, output link or model version. MLflow's own re-sending (else MLflow
    itself would re-send the lost "create" requests) is switched off as a coordinator process
    does at start (the ServerApp's main)."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    configure_mlflow_http()  # monkeypatch restores the environment after the test
    exp = write_experiment(project, "lost-answers", SITES, rounds=2)
    cfg, _ = load_experiment_with_sites(exp)
    proxy = LossyProxy(server.port, LOST_ANSWERS)
    try:
        fed = Federation(cfg, f"http://127.0.0.1:{proxy.port}")
        fed.recorder.start()
        glob, per_site = {}, {}
        for r in (1, 2):
            per_site = {
                s: {"accuracy": 0.5 + r / 10, "loss": 1.0 / r, "num-examples": 10.0 + i}
                for i, s in enumerate(SITES)
            }
            fed.recorder.log_round(r, {}, {s: {"train-loss": 1.0 / r} for s in SITES})
            glob = {"accuracy": 0.5 + r / 10, "loss": 1.0 / r, "num-examples": 33.0}
            fed.recorder.log_round(r, glob, per_site)
        version = fed.register(ArrayRecord(fed.initial_model().state_dict()), glob, per_site)
        fed.recorder.finish()
    finally:
        proxy.close()
    assert sorted(proxy.dropped) == sorted(LOST_ANSWERS), proxy.dropped
    assert version == "1"
    client = MlflowClient(server.uri, registry_uri=server.uri)
    exp_id = client.get_experiment_by_name("lost-answers").experiment_id
    runs = client.search_runs([exp_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in run.data.metrics:
        assert _steps(client, run.info.run_id, key) == [1, 2], key
    models = client.search_logged_models([exp_id])
    assert len(models) == 1 and models[0].source_run_id == run.info.run_id
    assert [o.model_id for o in run.outputs.model_outputs] == [models[0].model_id]
    versions = client.search_model_versions("name = 'lost-answers'")
    assert [v.version for v in versions] == ["1"]
    assert set(versions[0].tags) >= VERSION_TAGS
    mlflow.set_tracking_uri(server.uri)
    mlflow.set_registry_uri(server.uri)  # the recorder pointed both at the (closed) proxy
    model = mlflow.pyfunc.load_model("models:/lost-answers/1")
    names = model.metadata.get_input_schema().input_names()
    rows = pd.DataFrame({n: [1.0, 2.0] for n in names})  # raw rows in
    # Registered without a statistics phase: the site-normalised model never guesses them.
    with pytest.raises(MlflowException, match="holds no statistics"):
        model.predict(rows)
    stats = json.dumps({"mean": [0.0] * len(names), "std": [1.0] * len(names)})
    assert model.predict(rows, params={"statistics": stats}).shape == (2, 2)  # probabilities


def test_unreachable_server_fails_after_the_deadline_naming_it() -> None:
    port = free_port()
    client = MlflowClient(f"http://127.0.0.1:{port}", registry_uri=f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable) as err:
        retrying(
            client.get_experiment_by_name, "x", what="logging round 3's metrics",
            deadline=1.5, uri=f"http://127.0.0.1:{port}", hint="Resume later.",
        )  # fmt: skip
    assert 1.5 <= time.monotonic() - t0 < 10
    msg = str(err.value)
    assert f"http://127.0.0.1:{port}" in msg and "round 3" in msg and "Resume later." in msg
    assert "FEDHEALTH_MLFLOW_RETRY_SECONDS" in msg
    assert not is_transient(err.value)
    # Transient by type, never by text: a run id that happens to contain "503" is not a
    # gateway error; MLflow's code for an HTTP 503 answer is.
    assert not is_transient(MlflowException("Run 'a503f0' not found"))
    assert not is_transient(MlflowException("503 Service Unavailable"))
    assert is_transient(MlflowException("unavailable", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_transient(MlflowException("API request failed")) is False
    try:
        try:
            raise requests.ConnectionError("refused")
        except requests.ConnectionError as inner:
            raise MlflowException(f"API request failed with exception {inner}")  # noqa: B904
    except MlflowException as wrapped:  # how MLflow's REST client reports a refused connection
        assert is_transient(wrapped)


def test_restart_budget_counts_restarts_in_a_window() -> None:
    budget = RestartBudget(limit=2, window=600.0)
    assert budget.allows(now=0.0) and budget.pause(now=0.0) == 1.0
    budget.record(now=0.0)
    assert budget.allows(now=1.0) and budget.pause(now=1.0) == 2.0
    budget.record(now=1.0)
    assert not budget.allows(now=2.0)
    assert budget.allows(now=601.0) and budget.recent(now=601.0) == 0


# -- fedhealth run while the server restarts -----------------------------------------------------


def _wait_output(out: Path, proc: subprocess.Popen, text: str, timeout: float) -> None:
    def seen() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before printing {text!r}:\n{out.read_text()}")
        return text in out.read_text(errors="replace")

    wait_for(seen, timeout, f"{text!r} in the run's output", poll=0.2)


def _run_until_round(
    project: Path, server, name: str, rounds: int, round_: int, retry_seconds: int
) -> tuple[subprocess.Popen, Path, MlflowClient, str]:
    """Start ``fedhealth run`` of a ``rounds``-round experiment against ``server`` and wait
    until round ``round_``'s metrics are recorded; returns the process, its output file,
    a client of the server and the run id."""
    exp = write_experiment(project, name, SITES, rounds=rounds)
    proc, out = _run_fedhealth(
        project, str(exp), "--tracking-uri", server.uri, retry_seconds=retry_seconds
    )
    client = MlflowClient(server.uri, registry_uri=server.uri)
    run_id = wait_for(lambda: _quiet(lambda: _the_run(client, name)), 120, "the MLflow run")
    wait_for(
        lambda: round_ in (_quiet(lambda: _steps(client, run_id, "global/accuracy")) or []),
        120,
        f"round {round_}'s metrics",
    )
    return proc, out, client, str(run_id)


@pytest.mark.slow
def test_run_survives_mlflow_server_restart_mid_run(project, server) -> None:
    """SIGKILL the server once round 1 is recorded, keep it down until a logging call has
    failed and retried a few times, restart it: the run completes with nothing lost or
    doubled and one model version."""
    rounds = 10
    try:
        proc, out, client, run_id = _run_until_round(
            project, server, "restart-mid-run", rounds, 1, retry_seconds=120
        )
        server.kill()
        _wait_output(out, proc, "is unreachable while", timeout=60)
        time.sleep(3)  # several more attempts fail while the server is down
        server.start()
        code, text = _finish(proc, out)
    finally:
        if server.proc is None or server.proc.poll() is not None:
            server.start()
    assert code == 0, text
    assert "answered again" in text
    assert re.search(r"Registered model: restart-mid-run version 1\b", " ".join(text.split()))
    assert assert_run_recorded_once(client, "restart-mid-run", rounds) == run_id


@pytest.mark.slow
def test_run_survives_mlflow_server_down_at_registration(project, server) -> None:
    """SIGKILL the server when the last round's metrics land (the coordinator goes on to
    register the model), restart it a few seconds later: still exactly one version."""
    rounds = 3
    try:
        proc, out, client, run_id = _run_until_round(
            project, server, "restart-at-registration", rounds, rounds, retry_seconds=120
        )
        server.kill()
        _wait_output(out, proc, "is unreachable while", timeout=60)
        time.sleep(2)
        server.start()
        code, text = _finish(proc, out)
    finally:
        if server.proc is None or server.proc.poll() is not None:
            server.start()
    assert code == 0, text
    assert assert_run_recorded_once(client, "restart-at-registration", rounds) == run_id


@pytest.mark.slow
def test_server_down_past_the_deadline_fails_clearly_and_resumes(project, server) -> None:
    """With a 4 s retry deadline and the server down for longer, the run exits non-zero
    naming the server, the round and the run to resume; once the server is back,
    ``fedhealth run --resume RUN_ID`` completes the same run from its checkpoints."""
    rounds = 6
    exp = project / "restart-too-late.toml"
    try:
        proc, out, client, run_id = _run_until_round(
            project, server, "restart-too-late", rounds, 2, retry_seconds=4
        )
        server.kill()
        code, text = _finish(proc, out, timeout=90)
        flat = " ".join(text.split())
        assert code != 0, text
        assert f"the MLflow server at {server.uri} did not answer" in flat, text
        assert re.search(r"did not answer for \d+ s while [^(]*\bround \d+", flat), text
        assert f"--resume {run_id}" in flat, text
        # The rounds completed before the failure are checkpointed in the store (read from
        # the artifact root on disk: the server is down); the resumed run does not redo them.
        ckdir = next(server.root.glob(f"mlflow/artifacts/*/{run_id}/artifacts/checkpoints"))
        before = {p.name: p.stat().st_mtime_ns for p in ckdir.glob("*.npz")}
        assert 1 <= len(before) < rounds, sorted(before)
        # Resume at once: the resumed run waits for the server while it starts again.
        proc, out = _run_fedhealth(
            project, str(exp), "--tracking-uri", server.uri, "--resume", run_id, retry_seconds=120
        )
        server.start()
        code, text = _finish(proc, out)
    finally:
        if server.proc is None or server.proc.poll() is not None:
            server.start()
    assert code == 0, text
    assert assert_run_recorded_once(client, "restart-too-late", rounds) == run_id
    assert {n: (ckdir / n).stat().st_mtime_ns for n in before} == before


# -- fedhealth coordinator start supervises its MLflow server -----------------------------------


def _children(pid: int) -> dict[str, int]:
    """The coordinator's direct children by role."""
    out = {}
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text()
            cmd = (child / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        if "mlflow server" in cmd:
            out["mlflow"] = int(child.name)
        elif "superlink_gate" in cmd:  # flower-superlink behind fedhealth's operator gate
            out["superlink"] = int(child.name)
    return out


def _admin(ws: Path) -> dict[str, str]:
    """The MLflow admin account of an ``--insecure`` coordinator (the server needs one)."""
    return Credentials.load(ws / "mlflow" / "admin.json").env()


@pytest.mark.slow
def test_coordinator_restarts_its_mlflow_server(tmp_path, monkeypatch) -> None:
    """Kill the coordinator's MLflow server (first only its main process, which leaves its
    uvicorn worker holding the port; then the whole tree): each time the coordinator prints
    that it restarted it on the same port with the same store, the SuperLink keeps running.
    Past ``--mlflow-max-restarts`` the coordinator stops and says where mlflow.log is."""
    dep = Deployment(tmp_path, tls=False)
    ws = tmp_path / "coordinator"
    args = [
        "coordinator", "start", "--insecure", "--workspace", str(ws),
        "--port", str(dep.link_port), "--mlflow-port", str(dep.mlflow_port),
        "--federation", "test", "--mlflow-max-restarts", "2",
    ]  # fmt: skip
    coord = dep.spawn("coordinator", *args)
    try:
        dep.wait_output("coordinator", "Ctrl-C stops the coordinator", timeout=120)
        for key, value in _admin(ws).items():
            monkeypatch.setenv(key, value)
        first = wait_for(
            lambda: len(_children(coord.pid)) == 2 and _children(coord.pid), 30, "kids"
        )
        client = MlflowClient(dep.tracking_uri, registry_uri=dep.tracking_uri)
        exp_id = client.create_experiment("kept-across-restarts")
        helpers = descendants(first["mlflow"])
        assert helpers, "mlflow server runs its app in a worker process"
        time.sleep(2)  # the coordinator has noted the helpers (it looks every 0.5 s)

        os.kill(first["mlflow"], signal.SIGKILL)  # the worker lives on, holding the port
        dep.wait_output("coordinator", "restarted the MLflow server", timeout=120)
        second = _children(coord.pid)
        assert second["mlflow"] != first["mlflow"]
        assert second["superlink"] == first["superlink"] and _alive(first["superlink"])
        assert not any(_alive(p) for p in helpers), "the old worker was stopped"
        assert client.get_experiment(exp_id).name == "kept-across-restarts"  # same store
        assert coord.poll() is None

        kill_tree(second["mlflow"], timeout=5, sig=signal.SIGKILL)
        wait_for(
            lambda: dep.output("coordinator").count("restarted the MLflow server") == 2,
            120,
            "the second restart",
        )
        assert port_open("127.0.0.1", dep.mlflow_port)
        assert client.get_experiment(exp_id).name == "kept-across-restarts"
        assert _alive(first["superlink"]) and coord.poll() is None
        assert "restart 2 of at most 2" in dep.output("coordinator")

        third = _children(coord.pid)
        kill_tree(third["mlflow"], timeout=5, sig=signal.SIGKILL)  # over the budget
        assert coord.wait(timeout=60) == 1
        text = " ".join(dep.output("coordinator").split())
        assert "stopping the coordinator" in text
        assert str(ws / "logs" / "mlflow.log") in text
        assert not _alive(first["superlink"])
        assert (ws / "logs" / "mlflow.log").read_text().count("restarting it (restart") == 2
    finally:
        dep.teardown()
