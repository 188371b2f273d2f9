"""Fast tests of the deployment pieces: provisioning, audit log, checkpoints, retries, guard."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedhealth.deploy.audit import append, audit_path, content_digest, read
from fedhealth.deploy.checkpoint import Checkpoint, _pack, _unpack, strategy_state
from fedhealth.deploy.guard import GuardedGrid
from fedhealth.deploy.provision import TLSLayout, add_site_tls, init_tls
from fedhealth.errors import ConfigError, FederationError
from fedhealth.registry.retry import is_transient, retrying


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
