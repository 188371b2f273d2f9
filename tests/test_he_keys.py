"""Site identities, key wrapping, signatures and the consortium key ceremony."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from fedhealth.errors import ConfigError, CryptoError
from fedhealth.privacy.he.ceremony import (
    add_site,
    init_consortium,
    load_coordinator_keys,
    load_site_keys,
)
from fedhealth.privacy.he.ckks import HEParams
from fedhealth.privacy.he.contribute import make_contribution
from fedhealth.privacy.he.decrypt import verify_and_decrypt
from fedhealth.privacy.he.encrypted_sum import EncryptedSum
from fedhealth.privacy.he.keys import (
    ed25519_public,
    generate_identity,
    load_private,
    sign,
    unwrap_secret,
    verify,
    wrap_secret,
    x25519_public,
)

INFO = b"fedhealth/test|site=alpha"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# ------------------------------------------------------------------ wrapping


def test_wrap_round_trip() -> None:
    alice = generate_identity("alpha")
    secret = os.urandom(100)
    blob = wrap_secret(secret, alice.public_bundle()["x25519"], INFO)
    assert secret not in blob
    assert unwrap_secret(blob, alice, INFO) == secret
    assert unwrap_secret(blob, alice.kx_key, INFO) == secret


def test_wrong_key_refused() -> None:
    alice, bob = generate_identity("alpha"), generate_identity("beta")
    blob = wrap_secret(b"secret", alice.kx_public, INFO)
    with pytest.raises(CryptoError, match="different key or purpose"):
        unwrap_secret(blob, bob, INFO)


def test_wrong_context_refused() -> None:
    alice = generate_identity("alpha")
    blob = wrap_secret(b"secret", alice.kx_public, INFO)
    with pytest.raises(CryptoError):
        unwrap_secret(blob, alice, b"fedhealth/test|site=beta")


@pytest.mark.parametrize("where", [10, 40, 60, -1])
def test_tampered_blob_refused(where: int) -> None:
    alice = generate_identity("alpha")
    blob = bytearray(wrap_secret(b"secret" * 10, alice.kx_public, INFO))
    blob[where] ^= 0x01
    with pytest.raises(CryptoError):
        unwrap_secret(bytes(blob), alice, INFO)


def test_truncated_blob_refused() -> None:
    alice = generate_identity("alpha")
    with pytest.raises(CryptoError, match="truncated"):
        unwrap_secret(b"FHWRAP1\x00short", alice, INFO)


# ------------------------------------------------------------------ private key files


def test_private_key_written_0600_and_loads(tmp_path: Path) -> None:
    ident = generate_identity("alpha")
    path = tmp_path / "identity.pem"
    ident.save_private(path)
    assert _mode(path) == 0o600
    back = load_private(path, site="alpha")
    assert back.name == "alpha"
    assert back.public_bundle() == ident.public_bundle()


def test_group_readable_private_key_refused(tmp_path: Path) -> None:
    ident = generate_identity("alpha")
    path = tmp_path / "identity.pem"
    ident.save_private(path)
    path.chmod(0o644)
    with pytest.raises(CryptoError, match=f"chmod 600 {path}"):
        load_private(path)


def test_private_key_of_other_site_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    generate_identity("alpha").save_private(path)
    with pytest.raises(CryptoError, match="'alpha', not 'beta'"):
        load_private(path, site="beta")


def test_password_protected_private_key(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    ident = generate_identity("alpha")
    ident.save_private(path, password=b"correct horse")
    assert b"ENCRYPTED" in path.read_bytes()
    assert load_private(path, password=b"correct horse").kx_public == ident.kx_public
    with pytest.raises(CryptoError, match="passphrase"):
        load_private(path, password=b"wrong")


def test_public_bundle_is_base64_of_raw_keys() -> None:
    b = generate_identity("alpha").public_bundle()
    assert b["site"] == "alpha"
    assert len(base64.b64decode(b["ed25519"])) == 32
    assert len(base64.b64decode(b["x25519"])) == 32
    assert len(b["fingerprint"]) == 16


@pytest.mark.parametrize(("coerce", "bundle_key", "what"), [
    (ed25519_public, "ed25519", "Ed25519"),
    (x25519_public, "x25519", "X25519"),
])  # fmt: skip
def test_public_keys_coerce_from_base64_raw_or_key_and_name_a_bad_one(
    coerce, bundle_key: str, what: str
) -> None:
    text = generate_identity("alpha").public_bundle()[bundle_key]
    key = coerce(text)
    assert coerce(key) is key
    assert coerce(base64.b64decode(text)).public_bytes_raw() == key.public_bytes_raw()
    with pytest.raises(CryptoError, match=f"malformed {what} public key"):
        coerce(b"short")
    with pytest.raises(CryptoError, match=f"{what} public key is not valid base64"):
        coerce("not base64!")


# ------------------------------------------------------------------ signatures


def test_sign_verify() -> None:
    a, b = generate_identity("alpha"), generate_identity("beta")
    sig = sign(a, b"message")
    verify(a.public_bundle()["ed25519"], b"message", sig)
    verify(a.signing_public, b"message", sig)
    with pytest.raises(CryptoError, match="invalid signature"):
        verify(b.signing_public, b"message", sig)
    with pytest.raises(CryptoError, match="invalid signature"):
        verify(a.signing_public, b"messagE", sig)
    with pytest.raises(CryptoError, match="unsigned"):
        verify(a.signing_public, b"message", b"")


# ------------------------------------------------------------------ ceremony


def _snapshot(root: Path, rels: list[str]) -> dict[str, bytes]:
    out = {}
    for rel in rels:
        p = root / rel
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                out[str(f.relative_to(root))] = f.read_bytes()
    return out


def test_ceremony_layout_and_permissions(tmp_path: Path) -> None:
    root = tmp_path / "consortium"
    reg = init_consortium(root, ["alpha", "beta", "gamma"], "beta", HEParams())
    assert reg.key_holder == "beta"
    assert [reg.sites[s].index for s in ("alpha", "beta", "gamma")] == [0, 1, 2]
    for s in ("alpha", "beta", "gamma"):
        assert _mode(root / "sites" / s / "identity.pem") == 0o600
        assert _mode(root / "sites" / s / "he-secret.wrapped") == 0o600
        pub = json.loads((root / "public" / f"{s}.json").read_text())
        assert pub["ed25519"] == reg.sites[s].ed25519
    assert (root / "coordinator" / "sites.json").read_bytes() == (
        root / "public" / "registry.json"
    ).read_bytes()
    manifest = (root / "MANIFEST.txt").read_text()
    assert "COORDINATOR" in manifest and "sites/gamma/identity.pem" in manifest
    with pytest.raises(ConfigError, match="already holds a consortium"):
        init_consortium(root, ["x"], "x")


def test_ceremony_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key holder"):
        init_consortium(tmp_path / "a", ["alpha", "beta"], "coordinator")
    with pytest.raises(ConfigError, match="not allowed"):
        init_consortium(tmp_path / "b", ["../evil"], "../evil")
    with pytest.raises(ConfigError, match="128-bit security"):
        init_consortium(tmp_path / "c", ["a"], "a", HEParams(poly_modulus_degree=4096))


def test_coordinator_files_hold_no_secret_and_cannot_decrypt(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_consortium(root, ["alpha", "beta"], "alpha")
    raw = (root / "coordinator" / "he-public.ctx").read_bytes()
    ctx = ts.context_from(raw)
    assert not ctx.is_private()
    assert not ctx.has_galois_keys() and not ctx.has_relin_keys()
    assert len(raw) < 1024  # parameters only: a secret key alone is > 64 KiB
    coord = load_coordinator_keys(root)
    assert not coord.public_context.can_decrypt
    alpha = load_site_keys(root, "alpha")
    chunks = alpha.secret_context.encrypt(np.ones(alpha.params.lanes))
    ct = coord.public_context.load(chunks)
    with pytest.raises(CryptoError, match="no secret key"):
        coord.public_context.decrypt(ct)
    with pytest.raises(CryptoError, match="no secret key"):
        coord.public_context.encrypt(np.ones(alpha.params.lanes))
    # a secret context misplaced onto the coordinator is refused
    secret = alpha.secret_context.ts_context.serialize(save_secret_key=True)
    (root / "coordinator" / "he-public.ctx").write_bytes(secret)
    with pytest.raises(CryptoError, match="contains a CKKS secret key"):
        load_coordinator_keys(root)


def test_sites_share_the_secret_but_files_differ(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_consortium(root, ["alpha", "beta"], "alpha")
    a, b = load_site_keys(root, "alpha"), load_site_keys(root, "beta")
    assert a.tag_key == b.tag_key and len(a.tag_key) == 32
    wa = (root / "sites/alpha/he-secret.wrapped").read_bytes()
    wb = (root / "sites/beta/he-secret.wrapped").read_bytes()
    assert wa != wb
    # beta's wrapped secret cannot be opened with alpha's identity
    with pytest.raises(CryptoError):
        load_site_keys(
            None,
            "alpha",
            identity_path=root / "sites/alpha/identity.pem",
            wrapped_path=root / "sites/beta/he-secret.wrapped",
            registry_path=root / "public/registry.json",
        )


def test_add_site_leaves_other_sites_byte_identical(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_consortium(root, ["alpha", "beta"], "alpha")
    keep = [
        "sites/alpha",
        "sites/beta",
        "public/alpha.json",
        "public/beta.json",
        "coordinator/he-public.ctx",
    ]
    before = _snapshot(root, keep)
    reg = add_site(root, "gamma", "alpha")
    assert _snapshot(root, keep) == before
    assert reg.sites["gamma"].index == 2
    assert _mode(root / "sites/gamma/identity.pem") == 0o600
    with pytest.raises(ConfigError, match="already in consortium"):
        add_site(root, "gamma", "alpha")

    # the new site takes part: its contribution is summed and decrypted by an old site
    keys = {s: load_site_keys(root, s) for s in ("alpha", "beta", "gamma")}
    coord = load_coordinator_keys(root)
    assert set(coord.registry.sites) == {"alpha", "beta", "gamma"}
    total = EncryptedSum(coord.public_context, "exp", 0, "n0", coord.registry)
    vecs = {s: np.full(10, float(i + 1)) for i, s in enumerate(keys)}
    for s, k in keys.items():
        total.add(*make_contribution(vecs[s], 1000, k, experiment_id="exp", round=0, nonce="n0"))
    out = verify_and_decrypt(
        total.decryption_request(),
        keys["beta"],
        expected_experiment="exp",
        expected_round=0,
        expected_nonce="n0",
        min_sites=3,
    )
    np.testing.assert_allclose(out[:-1], 6.0, atol=1e-4)
    assert out[-1] == pytest.approx(3.0, abs=1e-4)
