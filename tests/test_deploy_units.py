"""Fast tests of the deployment pieces: provisioning, audit log, checkpoints, retries, guard."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedhealth.coordinator.checkpoint import Checkpoint, _pack, _unpack
from fedhealth.coordinator.guard import GuardedGrid
from fedhealth.coordinator.strategies import strategy_state
from fedhealth.deploy.provision import TLSLayout, add_site_tls, init_tls
from fedhealth.errors import ConfigError, FederationError
from fedhealth.registry.retry import is_transient, retrying
from fedhealth.site.audit import append, audit_path, content_digest, read


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_tls_writes_ca_server_cert_and_node_keys(tmp_path: Path) -> None:
    placed = init_tls(tmp_path, ["a", "b"], hosts=["coord.example.org", "10.0.0.5"])
    layout = TLSLayout.load(tmp_path)
    cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(map(str, san.get_values_for_type(x509.IPAddress))) | set(
        san.get_values_for_type(x509.DNSName)
    )
    assert {"127.0.0.1", "localhost", "coord.example.org", "10.0.0.5"} <= names
    for p in placed:
        assert p.path.is_file()
        if p.private:
            assert _mode(p.path) == 0o600
    key = serialization.load_ssh_private_key(layout.site_files("a")["key"].read_bytes(), None)
    pub = serialization.load_ssh_public_key(layout.node_public_key("a").read_bytes())
    assert key.public_key().public_numbers() == pub.public_numbers()
    with pytest.raises(ConfigError, match="already holds"):
        init_tls(tmp_path, ["c"])


def test_add_site_touches_no_other_file(tmp_path: Path) -> None:
    init_tls(tmp_path, ["a", "b"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    add_site_tls(tmp_path, "c")
    for p, data in before.items():
        if p.name != "deployment.json":
            assert p.read_bytes() == data, p
    assert TLSLayout.load(tmp_path).sites == ["a", "b", "c"]
    assert _mode(tmp_path / "sites" / "c" / "supernode.key") == 0o600
    with pytest.raises(ConfigError, match="already provisioned"):
        add_site_tls(tmp_path, "a")


def test_audit_log_appends_json_lines(tmp_path: Path) -> None:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))}),
            "metrics": MetricRecord({"n": 3}),
        }
    )
    size, digest, names = content_digest(content)
    assert size >= 12 and len(digest) == 64 and names == ["arrays", "metrics"]
    path = audit_path(tmp_path)
    append(path, {"event": "received", "round": 1})
    append(path, {"event": "sent", "bytes": size, "sha256": digest})
    assert [r["event"] for r in read(path)] == ["received", "sent"]


def test_checkpoint_roundtrip_keeps_strategy_moments() -> None:
    class Strat:
        def __init__(self) -> None:
            self.m_t = {"w": np.arange(3.0)}
            self.momentum_vector = [np.ones(2)]
            self.current_arrays = {"w": np.zeros(3)}
            self.eta = 0.1

    state = strategy_state(Strat())
    assert set(state) == {"m_t", "momentum_vector"}
    ck = Checkpoint(4, {"b": np.ones(2), "a": np.zeros(1)}, state, {"norm_stats": None})
    back = _unpack(_pack(ck))
    assert back.round == 4 and list(back.arrays) == ["b", "a"]
    np.testing.assert_array_equal(back.strategy_state["m_t"]["w"], np.arange(3.0))
    np.testing.assert_array_equal(back.strategy_state["momentum_vector"][0], np.ones(2))


def test_checkpoint_cut_short_by_a_crash_falls_back_to_the_previous(tmp_path) -> None:
    import mlflow

    from fedhealth.coordinator.checkpoint import load_latest, save_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("ck", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    for r in (1, 2):
        save_checkpoint(client, run_id, Checkpoint(r, {"w": np.full(3, float(r))}, {}, {}))
    torn = tmp_path / "round-0003.npz"
    torn.write_bytes(_pack(Checkpoint(3, {"w": np.zeros(3)}, {}, {}))[:100])
    client.log_artifact(run_id, str(torn), "checkpoints")
    ck = load_latest(client, run_id)
    assert ck is not None and ck.round == 2
    np.testing.assert_array_equal(ck.arrays["w"], np.full(3, 2.0))


def test_retrying_retries_transient_errors_only() -> None:
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("Connection refused")
        return "ok"

    assert retrying(flaky, deadline=10) == "ok" and calls["n"] == 3
    assert not is_transient(ValueError("bad parameter"))
    with pytest.raises(ValueError):
        retrying(lambda: (_ for _ in ()).throw(ValueError("bad")), deadline=10)


def test_guarded_grid_never_waits_forever() -> None:
    class Grid:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

        def get_node_ids(self) -> list[int]:
            return self.ids

    assert GuardedGrid(Grid([1, 2, 3]), 2, 3, wait=1).get_node_ids() == [1, 2, 3]
    g = GuardedGrid(Grid([1, 2]), 2, 3, wait=1, first_wait=1)
    t0 = time.monotonic()
    assert g.get_node_ids() == [1, 2]  # all expected did not come: go on with min_sites
    assert time.monotonic() - t0 < 5
    with pytest.raises(FederationError, match="min_sites"):
        GuardedGrid(Grid([1]), 2, 3, wait=1, first_wait=1).get_node_ids()


# -- where a site handler's time goes, and what the ClientApp process imports ---------------


def _audited_handler(tmp_path: Path, fail: bool = False):
    from flwr.app import Error, Message, MetricRecord, RecordDict

    from fedhealth.site.audit import audited
    from fedhealth.site.client_app import _refuse
    from fedhealth.site.request import SiteRequest
    from fedhealth.site.timing import phase

    @audited(lambda context: ("h1", tmp_path), SiteRequest.from_message, _refuse)
    def train(msg: Message, context: object, request: SiteRequest) -> Message:
        assert request.round == 2 and request.experiment == "e1"
        with phase("load"):
            time.sleep(0.02)
        with phase("train"):
            time.sleep(0.03)
            with phase("encrypt"):  # nested: counts for itself only
                time.sleep(0.02)
        if fail:
            reason = '{"site": "h1", "rule": "max_epsilon", "message": "no"}'
            return Message(Error(code=4100, reason=reason), reply_to=msg)
        return Message(RecordDict({"metrics": MetricRecord({"n": 1})}), reply_to=msg)

    return train


def _spec(experiment: str = "e1", dataset: str = "table", dp: bool = False):
    from fedhealth.protocol import ModelSection, TaskSection, TaskSpec

    schema = {"numeric": ["a"], "label": "y"}
    return TaskSpec(
        experiment=experiment,
        task=TaskSection(dataset=dataset, kind="tabular", schema=schema),
        model=ModelSection(name="logistic_regression"),
        training={},
        seed=0,
        rounds=3,
        dp={"enabled": True, "noise_multiplier": 1.0} if dp else {},
    )


def _request(round_: int = 2):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedhealth.protocol import RoundConfig

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    config = ConfigRecord(RoundConfig(_spec(), server_round=round_).to_record())
    return Message(RecordDict({"config": config}), dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("fail", [False, True])
def test_audit_outcome_carries_the_handler_timing(tmp_path: Path, fail: bool) -> None:
    from fedhealth.site.timing import PHASES

    _audited_handler(tmp_path, fail)(_request(), None)
    received, outcome = list(read(audit_path(tmp_path)))
    assert received["event"] == "received" and "timing" not in received
    assert outcome["event"] == ("refused" if fail else "sent") and outcome["round"] == 2
    t = outcome["timing"]
    assert set(t) == {f"{p}_s" for p in PHASES} | {
        "process_start_s", "queued_s", "handler_s", "other_s",
    }  # fmt: skip
    assert all(isinstance(v, float) for v in t.values())
    assert t["load_s"] >= 0.0199 and t["encrypt_s"] >= 0.0199  # sleeps last at least that
    assert t["train_s"] >= 0.0299 and t["train_s"] < t["handler_s"] - t["encrypt_s"]  # own time
    assert t["handler_s"] >= t["load_s"] + t["train_s"] + t["encrypt_s"]
    claimed = sum(t[f"{p}_s"] for p in PHASES) + t["other_s"]
    assert claimed == pytest.approx(t["handler_s"], abs=1e-3)


def test_process_start_counts_once_per_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    from fedhealth.site.timing import HandlerTiming, process_created_at

    code = (
        "import time; t = time.time()\n"
        "from fedhealth.site.timing import HandlerTiming, process_created_at\n"
        "a, b = HandlerTiming(), HandlerTiming()\n"
        "print(t - process_created_at(), a.process_start, b.process_start)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before_main, first, second = map(float, out.stdout.split())
    assert -0.05 <= before_main < 10  # interpreter start, 10 ms clock ticks
    assert first >= before_main - 0.05 and second == 0.0
    assert process_created_at() <= time.time()
    HandlerTiming()
    assert HandlerTiming().process_start == 0.0  # not the process's first handler


def test_a_decryption_query_is_audited_under_its_round(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedhealth.site.audit import _request_info

    record = ConfigRecord({"experiment_id": "study:run1:ab12", "round": 3, "nonce": "n"})
    msg = Message(RecordDict({"he-request": record}), dst_node_id=1, message_type="query.decrypt")
    info = _request_info(msg)
    assert info["round"] == 3 and info["experiment"] == "study"


def test_audit_view_summarises_the_timing() -> None:
    from fedhealth.cli.audit_view import timing_summary

    t = {"process_start_s": 0.5, "handler_s": 1.5, "import_s": 1.2, "load_s": 0.1,
         "train_s": 0.15, "serialise_s": 0.001, "other_s": 0.05}  # fmt: skip
    assert timing_summary(t) == "2.00 s: start 0.50, imports 1.20, training 0.15, data 0.10"
    assert timing_summary(None) == ""


def test_each_message_imports_only_what_it_needs(tmp_path: Path) -> None:
    from fedhealth.config.site import load_site
    from fedhealth.protocol import HERound, RoundConfig
    from fedhealth.site.client_app import modules_for
    from fedhealth.site.request import SiteRequest

    (tmp_path / "site.toml").write_text(
        '[site]\nname = "h1"\nworkspace = "ws"\n\n'
        '[datasets.table]\nkind = "tabular"\npath = "t.csv"\n\n'
        '[datasets.ct]\nkind = "dicom"\npath = "ct"\n'
    )
    profile = load_site(tmp_path / "site.toml")

    def request(dataset: str, dp: bool, he: bool) -> SiteRequest:
        announced = HERound("e:run:x", 1, "nonce", 1.0, "num-examples", 2) if he else None
        return SiteRequest(RoundConfig(_spec("e", dataset, dp), server_round=1, he=announced))

    runtime = "fedhealth.site.runtime"
    assert modules_for(profile, request("table", False, False), training=True) == [runtime]
    assert modules_for(profile, request("table", True, True), training=True) == [
        runtime, "opacus", "fedhealth.site.encrypted_reply",
    ]  # fmt: skip
    assert modules_for(profile, request("table", True, True), training=False) == [runtime]
    assert "pydicom" in modules_for(profile, request("ct", False, False), training=False)


_HANDLER_PROCESS = """
import json, sys
from pathlib import Path
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
d = json.loads(Path(sys.argv[1]).read_text())
import fedhealth.site.client_app as ca
heavy = ["torch", "pandas", "opacus", "tenseal", "mlflow", "pydicom", "PIL", "torch._dynamo"]
loaded = {"import": [m for m in heavy if m in sys.modules]}
config = ConfigRecord({"spec": json.dumps(d["spec"]), "norm-stats": "", "server-round": 1})
arrays = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in d["arrays"].items()})
msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1,
              message_type=MessageType.TRAIN)
ctx = Context(run_id=1, node_id=1, node_config={"profile": d["profile"], "site-index": 0},
              state=RecordDict(), run_config={})
reply = ca.train(msg, ctx)
assert not reply.has_error(), reply.error.reason
loaded["train"] = [m for m in heavy if m in sys.modules]
print(json.dumps(loaded))
"""


def test_a_clientapp_process_imports_only_what_its_message_needs(tmp_path: Path) -> None:
    """In a fresh process, as in a simulated site's worker: importing the ClientApp loads
    none of torch, pandas, Opacus, TenSEAL or MLflow; a DP training message then loads
    torch, pandas, Opacus and torch._dynamo (torch.optim's first step), never TenSEAL
    (plaintext round) or MLflow.
    """
    import json
    import subprocess
    import sys

    from dp_consortium import write_experiment, write_site

    from fedhealth.config.experiment import load_experiment
    from fedhealth.models import build_model

    site = write_site(tmp_path, "h1", n=60, seed=0)
    exp = write_experiment(tmp_path, [site], min_sites=1, dp={"noise_multiplier": 1.0})
    cfg = load_experiment(exp)
    spec = cfg.task_spec()
    model = build_model(spec.model, 5, 2, 1)
    arrays = {k: v.tolist() for k, v in model.state_dict().items()}
    job = tmp_path / "job.json"
    wire = spec.model_dump(mode="json", by_alias=True)
    job.write_text(json.dumps({"spec": wire, "profile": str(site), "arrays": arrays}))
    out = subprocess.run(
        [sys.executable, "-c", _HANDLER_PROCESS, str(job)], capture_output=True, text=True,
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["import"] == []
    assert loaded["train"] == ["torch", "pandas", "opacus", "torch._dynamo"]
    entry = [r for r in read(audit_path(tmp_path / "workspace" / "h1")) if r["event"] == "sent"]
    t = entry[-1]["timing"]
    assert t["import_s"] > 0 and t["process_start_s"] > 0 and t["privacy_s"] > 0


def _fab(files: dict[str, bytes]) -> bytes:
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(files)[0]


def test_site_trusts_only_fedhealths_own_app_bundle() -> None:
    from fedhealth.deploy.site_exec import check_fab
    from fedhealth.deploy.submit import APP_PYPROJECT

    own = APP_PYPROJECT.encode()
    assert check_fab(_fab({"pyproject.toml": own})).trusted
    # A bundle that names fedhealth's ClientApp but ships a module shadowing it.
    shadow = _fab({"pyproject.toml": own, "fedhealth/site/client_app.py": b"import os\n"})
    verdict = check_fab(shadow)
    assert not verdict.trusted and "fedhealth/site/client_app.py" in verdict.reason
    other = own.replace(b"fedhealth.site.client_app:app", b"evil:app")
    assert "'evil:app'" in check_fab(_fab({"pyproject.toml": other})).reason
    old = own.replace(b'version = "', b'version = "0.0.0-')
    assert "same version" in check_fab(_fab({"pyproject.toml": old})).reason
    assert "ClientApp tasks" in check_fab(_fab({"pyproject.toml": own}), "flwr-agentapp").reason
    assert not check_fab(b"not a zip").trusted


def test_superlink_gate_serves_operator_apis_to_loopback_only() -> None:
    from fedhealth.deploy.superlink_gate import OperatorGate, allowed

    assert allowed("/v1/fleet/pull-messages", "192.0.2.7")
    assert allowed("/health", "192.0.2.7")
    for path in ("/v1/control/list-runs", "/v1/control/register-node",
                 "/v1/control/start-run", "/v1/runtime/pull-messages", "/docs",
                 "/v1/fleetx", "/healthz"):  # fmt: skip
        assert not allowed(path, "192.0.2.7"), path
        assert allowed(path, "127.0.0.1") and allowed(path, "::1"), path
    assert allowed("/v1/control/list-runs", "::ffff:127.0.0.1")
    assert not allowed("/v1/control/list-runs", None)

    from flwr.superlink.main import create_app
    from starlette.testclient import TestClient

    app = OperatorGate(create_app())
    with TestClient(app, client=("192.0.2.7", 40000)) as outside:
        res = outside.post("/v1/control/list-runs", content=b"")
        assert res.status_code == 403 and "coordinator's own machine" in res.json()["message"]
    with TestClient(app, client=("127.0.0.1", 40000)) as local:
        assert local.post("/v1/control/list-runs", content=b"").status_code != 403


def test_coordinator_refuses_the_ceremony_directory(tmp_path: Path) -> None:
    from fedhealth.deploy.coordinator import check_coordinator_dir, check_host
    from fedhealth.deploy.provision import copy_coordinator_files

    init_tls(tmp_path / "ceremony", ["a", "b"])
    with pytest.raises(ConfigError, match=r"ca\.key.*coordinator-dir") as err:
        check_coordinator_dir(tmp_path / "ceremony")
    assert "sites/a/supernode.key" in str(err.value)
    files = copy_coordinator_files(tmp_path / "ceremony", tmp_path / "coord")
    check_coordinator_dir(tmp_path / "coord")  # only the coordinator's files
    assert _mode(tmp_path / "coord" / "coordinator" / "tls" / "superlink.key") == 0o600
    assert _mode(tmp_path / "coord" / "coordinator" / "mlflow" / "admin.json") == 0o600
    assert not any("sites" in p.parts or "ca" in p.parts for p in files)
    # A site's identity key copied in by mistake, under any name, is found by its content.
    stray = tmp_path / "coord" / "backup.pem"
    stray.write_bytes((tmp_path / "ceremony" / "ca" / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match=r"backup\.pem"):
        check_coordinator_dir(tmp_path / "coord")
    check_host("0.0.0.0")
    with pytest.raises(ConfigError, match=r"--host 10\.0\.0\.5"):
        check_host("10.0.0.5")


def test_coordinator_start_names_the_secret_it_refuses(tmp_path: Path) -> None:
    import subprocess
    import sys

    init_tls(tmp_path / "ceremony", ["a"])
    res = subprocess.run(
        [sys.executable, "-m", "fedhealth", "coordinator", "start", "--consortium",
         str(tmp_path / "ceremony"), "--workspace", str(tmp_path / "ws")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode != 0
    assert "ca.key" in out and "never be on the coordinator's machine" in out, out
    assert not (tmp_path / "ws").exists()  # nothing was started


def test_pacer_polls_fast_after_a_message_and_backs_off_when_idle() -> None:
    from fedhealth.deploy.flower_pacing import Pacer

    now = [1000.0]
    pacer = Pacer(active=0.05, settled=0.2, idle=1.0, window=60.0, clock=lambda: now[0])
    assert [pacer.pause() for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]  # never busy
    pacer.busy()
    assert [pacer.pause() for _ in range(4)] == [0.05, 0.1, 0.2, 0.2]  # active: <= settled
    now[0] += 59.0
    assert pacer.pause() == 0.2  # still within the window
    now[0] += 2.0
    assert [pacer.pause() for _ in range(4)] == [0.2, 0.4, 0.8, 1.0]  # idle: backs off
    pacer.busy()
    assert pacer.pause() == 0.05  # a message: fast again


def test_flower_pacing_changes_only_the_supernodes_three_pauses(tmp_path: Path) -> None:
    import inspect
    import types

    import flwr.supernode.start_client_internal as loop
    from flwr.supercore.version import package_version

    from fedhealth.deploy.flower_pacing import (
        REPLY_POLL,
        PacedTime,
        Pacer,
        install,
        marking_busy,
        mismatch,
    )

    # Written against the installed Flower: its version and the exact pauses in its source.
    assert mismatch(loop, package_version) == ""
    assert "1.41.x" in mismatch(loop, "1.42.0")
    # A Flower whose loop pauses differently is left alone.
    edited = tmp_path / "start_client_internal.py"
    edited.write_text(inspect.getsource(loop).replace("time.sleep(3)", "time.sleep(2)"))
    changed = types.ModuleType("flwr.supernode.start_client_internal")
    changed.__file__ = str(edited)
    assert "time.sleep(3)" in mismatch(changed, package_version)

    now = [0.0]
    paced = PacedTime(Pacer(active=0.05, settled=0.2, idle=1.0, clock=lambda: now[0]))
    assert paced.paced(3) == 0.05 and paced.paced(3) == 0.1  # idle: the pacer's pause
    assert paced.paced(0.5) == REPLY_POLL and paced.paced(7) == 7  # reply checks; others
    assert paced.monotonic is loop.time.monotonic  # everything else is time's own

    pulls = iter([None, 42])
    pull = marking_busy(lambda: next(pulls), paced.pacer)
    assert pull() is None and paced.paced(3) == 0.2  # nothing received: still backing off
    assert pull() == 42 and paced.paced(3) == 0.05  # a message: fast again

    original = (loop.time, loop._pull_and_store_message)
    try:
        installed = install()
        assert isinstance(installed, PacedTime) and loop.time is installed
        assert install() is installed  # once per process
        assert loop._pull_and_store_message is not original[1]
    finally:
        loop.time, loop._pull_and_store_message = original


def test_object_pulls_retry_in_tens_of_milliseconds_on_the_checked_flower() -> None:
    """An object pushed 100 ms after its message's header is pulled about 100 ms later,
    not after Flower's 1 s first backoff; only the two backoff defaults change."""
    import time

    from flwr.supercore.inflatable import inflatable_utils as iu

    from fedhealth.flower_object_pulls import FLOWER_DEFAULTS, pace_object_pulls

    def pull_after(delay: float) -> float:
        ready = time.monotonic() + delay

        def pull(object_id: str) -> bytes:
            if time.monotonic() < ready:
                raise iu.ObjectUnavailableError(object_id)
            return b"content"

        t0 = time.monotonic()
        assert iu.pull_objects(["a" * 64], pull) == {"a" * 64: b"content"}
        return time.monotonic() - t0

    from flwr.supercore import constant

    # Flower's own defaults (an in-process run earlier in this process may have paced them).
    assert (constant.PULL_INITIAL_BACKOFF, constant.PULL_BACKOFF_CAP) == (1, 10)
    functions = (iu.pull_objects, iu.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__) for f in functions]
    try:
        for f in functions:
            f.__kwdefaults__.update(FLOWER_DEFAULTS)
        assert pull_after(0.1) >= 0.75  # Flower: the first retry after 1 s (±20 %)
        import flwr.supercore.version as flwr_version

        real = flwr_version.package_version
        flwr_version.package_version = "1.42.0"  # another release: left as Flower's
        try:
            with pytest.warns(UserWarning, match="1.42.0"):
                assert not pace_object_pulls()
        finally:
            flwr_version.package_version = real
        assert iu.pull_objects.__kwdefaults__["initial_backoff"] == 1
        assert pace_object_pulls() and pace_object_pulls()  # idempotent
        for f in functions:
            assert {k: f.__kwdefaults__[k] for k in FLOWER_DEFAULTS} == {
                "initial_backoff": 0.02,
                "backoff_cap": 0.5,
            }
        assert pull_after(0.1) < 0.4
    finally:
        for f, before in zip(functions, saved, strict=True):
            f.__kwdefaults__.update(before)


def test_a_long_lived_app_process_counts_no_process_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "from fedhealth.site.timing import HandlerTiming, serving\n"
        "serving()\n"
        "print(HandlerTiming().process_start, HandlerTiming().process_start)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0.0", "0.0"]


def test_site_profile_is_read_again_when_the_file_changes(tmp_path: Path) -> None:
    import os

    from flwr.app import Context, RecordDict

    from fedhealth.site.client_app import site_profile

    path = tmp_path / "site.toml"
    base = '[site]\nname = "h1"\nworkspace = "ws"\n\n[datasets.t]\nkind = "tabular"\n'
    base += 'path = "t.csv"\n'
    path.write_text(base)
    ctx = Context(run_id=1, node_id=1, node_config={"profile": str(path)}, state=RecordDict(),
                  run_config={})  # fmt: skip
    assert site_profile(ctx)[0].name == "h1"
    assert site_profile(ctx)[0] is site_profile(ctx)[0]  # unchanged: read once
    path.write_text(base + "\n[limits]\nmax_batch_size = 8\n")
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000))  # a later edit, same second
    assert site_profile(ctx)[0].limits.max_batch_size == 8


_WARM_UP = """
import json, sys
from pathlib import Path
from fedhealth.deploy.site_exec import warm_up
modules = warm_up(Path(sys.argv[1]))
heavy = ["torch", "pandas", "opacus", "tenseal", "pydicom", "torch._dynamo", "mlflow"]
print(json.dumps({"modules": modules, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def test_site_app_process_imports_everything_its_messages_need_once(tmp_path: Path) -> None:
    """The deployed site's app process imports, at its start, the site runtime, the
    readers of its datasets, Opacus, TenSEAL and torch.optim's first step; never MLflow."""
    import json
    import subprocess
    import sys

    (tmp_path / "site.toml").write_text(
        '[site]\nname = "h1"\nworkspace = "ws"\n\n'
        '[datasets.table]\nkind = "tabular"\npath = "t.csv"\n\n'
        '[datasets.ct]\nkind = "dicom"\npath = "ct"\n'
    )
    out = subprocess.run(
        [sys.executable, "-c", _WARM_UP, str(tmp_path / "site.toml")], capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["modules"][:2] == ["fedhealth.site.client_app", "fedhealth.site.runtime"]
    assert "pydicom" in res["modules"]
    assert res["loaded"] == ["torch", "pandas", "opacus", "tenseal", "pydicom", "torch._dynamo"]


def test_mlflow_server_caches_verified_credentials(tmp_path: Path, monkeypatch) -> None:
    """Each MLflow request would otherwise pay a scrypt password check."""
    from mlflow.server.auth.config import read_auth_config

    from fedhealth.deploy.mlflow_auth import AUTH_CACHE_SECONDS, Credentials, server_env

    env = server_env(tmp_path / "mlflow", Credentials.new("admin"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = read_auth_config()
    assert config.auth_cache_ttl_seconds == AUTH_CACHE_SECONDS > 0
    assert config.authorization_function.endswith("authenticate_request_basic_auth")


def test_mlflow_server_starts_no_job_runner(tmp_path: Path, monkeypatch) -> None:
    """MLflow 3's job runner and queue consumers (eight processes, ~1.9 GB) stay off."""
    from mlflow.environment_variables import MLFLOW_SERVER_ENABLE_JOB_EXECUTION

    from fedhealth.deploy.mlflow_auth import Credentials, server_env

    assert MLFLOW_SERVER_ENABLE_JOB_EXECUTION.get()  # MLflow's default: on
    for key, value in server_env(tmp_path / "mlflow", Credentials.new("admin")).items():
        monkeypatch.setenv(key, value)
    assert not MLFLOW_SERVER_ENABLE_JOB_EXECUTION.get()


def test_the_superlink_keeps_its_state_in_memory_unless_given_a_file(tmp_path: Path) -> None:
    """Flower's in-memory state by default (the durable state is MLflow's and the consortium
    directory's); ``--state-db`` gives Flower an SQLite file instead."""
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    from fedhealth.deploy.coordinator import CoordinatorSettings, superlink_argv

    argv = superlink_argv(CoordinatorSettings(workspace=tmp_path, consortium=None))
    assert argv[argv.index("--database") + 1] == FLWR_IN_MEMORY_DB_NAME
    db = tmp_path / "link" / "state.db"
    argv = superlink_argv(CoordinatorSettings(workspace=tmp_path, consortium=None, state_db=db))
    assert argv[argv.index("--database") + 1] == str(db.resolve())
