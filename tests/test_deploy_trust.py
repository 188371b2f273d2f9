"""Who may do what on a real deployment: attacks from outside the consortium's operators.

A coordinator (SuperLink on 0.0.0.0, MLflow server) and one site run as separate processes.
The outsider reaches the SuperLink at this machine's non-loopback address with only the
consortium's CA certificate, as a machine on the hospital network would:

* ``flwr ls``, ``flwr supernode register`` and ``flwr run`` are each refused;
* a foreign Flower app submitted by whoever can submit (here the operator, standing in for a
  malicious coordinator) is refused at the site before any of its code runs there: its
  ClientApp's marker file never appears, the coordinator gets an error reply naming the
  rule, and the site's audit log has a ``refused`` line;
* the MLflow server refuses anonymous requests; a reader account reads and cannot write.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedhealth.deploy.pki import make_node_keypair, write_private, write_public
from fedhealth.site.audit import audit_path, read
from tests.deploy_harness import Deployment, provisioned_consortium, wait_for

pytestmark = pytest.mark.slow

SITE = "st-olav"
FLWR = str(Path(sys.executable).parent / "flwr")


def _public_ip() -> str | None:
    """This machine's non-loopback IPv4 address (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


IP = _public_ip()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    if IP is None:
        pytest.skip("no non-loopback address: cannot connect as another machine")
    root = tmp_path_factory.mktemp("trust")
    dep = provisioned_consortium(root, [SITE], he=False, hosts=(IP,))
    try:
        dep.start_coordinator(host="0.0.0.0")
        dep.start_site(SITE)
        yield dep
    finally:
        dep.teardown()


def _outsider_env(dep: Deployment) -> dict[str, str]:
    """A flwr CLI home with one connection: this machine's public address, the CA only."""
    home = dep.root / "outsider-home"
    ca = dep.root / "consortium" / "sites" / SITE / "tls" / "ca.pem"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "outside"\n\n[superlink.outside]\n'
        f'address = "{IP}:{dep.link_port}"\nroot-certificates = "{ca}"\n'
    )
    env = {k: v for k, v in dep.env.items() if not k.startswith("MLFLOW_TRACKING_")}
    return {**env, "FLWR_HOME": str(home)}


def _flwr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FLWR, *args], env=env, capture_output=True, text=True, timeout=120, cwd=env["FLWR_HOME"]
    )


def _runs(dep: Deployment) -> dict:
    """The SuperLink's runs, as the operator on the coordinator's machine sees them."""
    res = _flwr(dep.env, "ls", "test", "--format", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


FOREIGN_CLIENT = '''\
"""A foreign ClientApp: it would leave a marker and send back a file of the site."""
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

Path({marker!r}).write_text("foreign code ran at import")
app = ClientApp()


@app.query()
def steal(msg, context):
    Path({marker!r}).write_text("foreign code ran")
    text = Path(context.node_config["profile"]).read_text()
    return Message(RecordDict({{"loot": ConfigRecord({{"file": text}})}}), reply_to=msg)
'''

FOREIGN_SERVER = '''\
"""The foreign app's ServerApp: asks every node, writes what came back."""
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid, ServerApp

server = ServerApp()


@server.main()
def main(grid: Grid, context) -> None:
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    out = [r.error.reason if r.has_error() else "content: " + str(r.content) for r in replies]
    Path({result!r}).write_text("\\n".join(out) or "no reply")
'''


def _foreign_app(folder: Path, marker: Path, result: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "foreign_client.py").write_text(FOREIGN_CLIENT.format(marker=str(marker)))
    (folder / "foreign_server.py").write_text(FOREIGN_SERVER.format(result=str(result)))
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "foreign-app"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "outsider"\n\n'
        '[tool.flwr.app.components]\nserverapp = "foreign_server:server"\n'
        'clientapp = "foreign_client:app"\n'
    )
    return folder


def test_outsider_with_only_the_ca_can_list_register_or_run_nothing(deployment) -> None:
    dep = deployment
    env = _outsider_env(dep)
    before = _runs(dep)["runs"]

    res = _flwr(env, "ls", "outside")
    assert res.returncode != 0 and "403" in res.stdout + res.stderr, res.stdout + res.stderr

    private, public = make_node_keypair()
    write_private(dep.root / "rogue" / "rogue.key", private)
    write_public(dep.root / "rogue" / "rogue.pub", public)
    res = _flwr(env, "supernode", "register", str(dep.root / "rogue" / "rogue.pub"), "outside")
    assert res.returncode != 0 and "403" in res.stdout + res.stderr, res.stdout + res.stderr

    app = _foreign_app(dep.root / "outsider-app", dep.root / "never", dep.root / "never.txt")
    res = _flwr(env, "run", str(app), "outside")
    assert res.returncode != 0 and "403" in res.stdout + res.stderr, res.stdout + res.stderr

    assert _runs(dep)["runs"] == before  # nothing was started
    # The same SuperNode key registration from the coordinator's own machine is accepted:
    # the refusal is the gate, not a broken request.
    res = _flwr(dep.env, "supernode", "register", str(dep.root / "rogue" / "rogue.pub"), "test")
    assert res.returncode == 0, res.stdout + res.stderr


def test_foreign_app_is_refused_before_any_of_its_code_runs_at_the_site(deployment) -> None:
    dep = deployment
    marker, result = dep.root / "site-marker.txt", dep.root / "foreign-result.txt"
    app = _foreign_app(dep.root / "foreign-app", marker, result)
    res = _flwr(dep.env, "run", str(app), "test", "--format", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = int(json.loads(res.stdout)["run-id"])

    text = wait_for(lambda: result.is_file() and result.read_text(), 240, "the foreign run")
    assert "untrusted-app" in text and "content:" not in text, text
    # The ServerApp ran on the coordinator (the submitter's own machine); the ClientApp
    # never ran at the site, not even its module's import.
    site_ws = dep.root / "site-ws" / SITE
    assert not marker.exists()
    refused = [r for r in read(audit_path(site_ws)) if r["event"] == "refused"]
    assert refused and refused[-1]["rule"] == "untrusted-app", refused
    assert refused[-1]["flwr_run"] == run_id
    assert "foreign_client.py" in refused[-1]["message"]
    assert "foreign-app 1.0.0" in refused[-1]["app"]


def _get(url: str, auth: tuple[str, str] | None = None, data: dict | None = None) -> int:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None)
    req.add_header("Content-Type", "application/json")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_mlflow_server_requires_an_account_and_readers_only_read(deployment) -> None:
    from fedhealth.deploy.mlflow_auth import Credentials

    dep = deployment
    api = f"{dep.tracking_uri}/api/2.0/mlflow"
    search = f"{api}/experiments/search?max_results=5"
    admin = Credentials.load(dep.mlflow_admin)
    assert _get(search) == 401
    assert _get(search, ("admin", "wrong password")) == 401
    assert _get(search, (admin.username, admin.password)) == 200
    create = {"name": "consortium-study"}
    assert _get(f"{api}/experiments/create", data=create) == 401

    out = dep.root / "registry-reader.json"
    res = dep.cli(
        "coordinator", "add-reader", "registry-reader", "--out", str(out),
        "--consortium", str(dep.coordinator_dir), "--tracking-uri", dep.tracking_uri,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert os.stat(out).st_mode & 0o777 == 0o600
    reader = Credentials.load(out)
    assert _get(f"{api}/experiments/create", (admin.username, admin.password), create) == 200
    assert _get(search, (reader.username, reader.password)) == 200
    rename = {"experiment_id": "0", "new_name": "taken-over"}
    assert _get(f"{api}/experiments/update", (reader.username, reader.password), rename) == 403

    env = {k: v for k, v in dep.env.items() if not k.startswith("MLFLOW_TRACKING_")}
    for who in ({}, reader.env()):
        res = subprocess.run(
            [str(Path(sys.executable).parent / "fedhealth"), "models", "list",
             "--tracking-uri", dep.tracking_uri],
            env={**env, **who}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert (res.returncode == 0) == bool(who), res.stdout + res.stderr
