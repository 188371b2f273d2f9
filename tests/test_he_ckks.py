"""CKKS parameters, contexts, packing and state-dict flattening."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
import torch
from torch import nn

from fedhealth.errors import ConfigError, CryptoError
from fedhealth.privacy.he import compact
from fedhealth.privacy.he.ckks import (
    FlatSpec,
    HEParams,
    SlotLayout,
    decrypt_sum,
    encrypt_update,
    flatten_state,
    load_context,
    make_secret_context,
    pack,
    public_context,
    unflatten,
    unpack,
)

PARAMS = HEParams()


@pytest.fixture(scope="module")
def contexts():
    secret = make_secret_context(PARAMS)
    return load_context(secret, PARAMS), load_context(public_context(secret), PARAMS)


def _add_all(pub, per_site: list[list[bytes]]) -> list[bytes]:
    acc = [pub.load(b) for b in per_site[0]]
    for chunks in per_site[1:]:
        for a, b in zip(acc, chunks, strict=True):
            pub.add_inplace(a, pub.load(b))
    return [pub.dump(a) for a in acc]


# ------------------------------------------------------------------ parameters


def test_default_params_are_128_bit_and_have_headroom() -> None:
    p = HEParams().validate()
    assert sum(p.coeff_mod_bit_sizes) <= 218
    assert p.slots == 4096 and p.lanes == 8192 and p.chunk_capacity == 8192 - 66
    assert HEParams.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"poly_modulus_degree": 4096}, "128-bit security"),
        ({"coeff_mod_bit_sizes": (60,)}, ">= 2 primes"),
        ({"global_scale_bits": 50}, "needs"),
        ({"max_abs_value": 1e6}, "needs"),
        ({"poly_modulus_degree": 3000}, "unsupported"),
    ],
)
def test_bad_params_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HEParams(**kwargs).validate()


def test_public_context_has_no_keys(contexts) -> None:
    secret, pub = contexts
    raw = public_context(secret.ts_context.serialize(save_secret_key=True))
    ctx = ts.context_from(raw)
    assert not ctx.is_private()
    assert not ctx.has_galois_keys() and not ctx.has_relin_keys()
    assert secret.can_decrypt and not pub.can_decrypt


# ------------------------------------------------------------------ packing


def test_pack_unpack_with_reserved_slots() -> None:
    layout = SlotLayout(16, 3, lambda c: np.array([0, 1, 5 + c]))
    vec = np.arange(30, dtype=float) + 1
    arrays = pack(vec, layout, lambda c: np.array([-1.0, -2.0, -3.0 - c]))
    assert len(arrays) == layout.n_chunks(30) == 3
    assert arrays[1][0] == -1.0 and arrays[1][6] == -4.0
    data, reserved = unpack(arrays, layout, 30)
    np.testing.assert_array_equal(data, vec)
    np.testing.assert_array_equal(reserved[2], [-1.0, -2.0, -5.0])


def test_encrypt_refuses_values_beyond_headroom(contexts) -> None:
    secret, _ = contexts
    with pytest.raises(ConfigError, match="max_abs_value"):
        encrypt_update(np.array([1.0, 2e3]), secret)
    with pytest.raises(ConfigError, match="max_abs_value"):
        encrypt_update(np.array([1.0, np.nan]), secret)


def test_sum_of_100_sites_precision_and_wire_size(contexts) -> None:
    secret, pub = contexts
    rng = np.random.default_rng(1)
    vecs = [rng.uniform(-10, 10, PARAMS.lanes) for _ in range(100)]  # real and imaginary
    per_site = [encrypt_update(v, secret) for v in vecs]
    bytes_per_value = len(per_site[0][0]) / PARAMS.lanes
    assert bytes_per_value <= 7.42  # 59 bits per residue, 2 values per slot
    sums = _add_all(pub, per_site)
    data, _ = decrypt_sum(sums, secret, n_values=PARAMS.lanes)
    err = np.max(np.abs(data - np.sum(vecs, axis=0)))
    assert err < 1e-6  # measured ~1e-8; FedAvg needs ~1e-4 relative


def test_wire_size_100k_values(contexts) -> None:
    secret, _ = contexts
    vec = np.random.default_rng(2).normal(0, 1, 100_000)
    chunks = encrypt_update(
        vec, secret, layout=SlotLayout(PARAMS.lanes, PARAMS.reserved_lanes, lambda c: np.arange(66))
    )
    assert sum(map(len, chunks)) / vec.size <= 7.9  # 13 chunks, the last one 30 % full


def test_coordinator_refuses_malformed_and_reshaped_ciphertexts(contexts) -> None:
    secret, pub = contexts
    blob = encrypt_update(np.ones(10), secret)[0]
    with pytest.raises(CryptoError, match="not a valid ciphertext"):
        pub.load(blob[: len(blob) // 2])
    ct = pub.load(blob)
    ct.scale = 2.0**30
    with pytest.raises(CryptoError, match="scale"):
        pub.load(pub.dump(ct))


# ------------------------------------------------------------------ wire format


def test_compact_form_round_trips_exactly(contexts) -> None:
    secret, pub = contexts
    fresh = encrypt_update(np.linspace(-1, 1, 100), secret)[0]
    assert fresh[:4] == compact.MAGIC
    bits = [PARAMS.coeff_mod_bit_sizes[0]]  # 59: the prime a ciphertext carries
    seal = compact.expand(fresh, bits)
    assert len(fresh) < 8192 * 59 / 8 + 220 < len(seal)
    assert compact.compact(seal, bits) == fresh
    total = pub.dump(pub.load(fresh))  # unseeded: both polynomials
    assert len(total) < 2 * 8192 * 59 / 8 + 200
    assert compact.compact(compact.expand(total, bits), bits) == total


def test_compact_form_refuses_malformed_bytes(contexts) -> None:
    secret, pub = contexts
    blob = encrypt_update(np.ones(10), secret)[0]
    for bad, why in (
        (b"XXXX" + blob[4:], "bad magic"),
        (blob[:-2000], "truncated"),
        (blob[:30], "malformed prefix"),
        # a declared size far beyond the data is refused before any allocation
        (
            blob[:105]
            + (24 + 8 * 2**40).to_bytes(8, "little")
            + (2**40).to_bytes(8, "little")
            + blob[121:],
            "inconsistent sizes",
        ),
    ):
        with pytest.raises(CryptoError, match="not a valid ciphertext") as err:
            pub.load(bad)
        assert why in str(err.value), (why, str(err.value))
    # a residue >= the prime (all 59 bits set) is refused by SEAL's own validation
    start = 4 + 16 + 4 + 97 + 8
    forged = blob[:start] + b"\xff" * 15 + blob[start + 15 :]
    with pytest.raises(CryptoError, match="not a valid ciphertext"):
        pub.load(forged)


def test_real_slots_and_seal_stream_still_supported() -> None:
    """The format before complex slots and compaction (kept for benchmarks)."""
    params = HEParams(
        coeff_mod_bit_sizes=(60, 60), max_sites=1000, complex_slots=False, compact_wire=False
    )
    secret_bytes = make_secret_context(params)
    secret = load_context(secret_bytes, params)
    pub = load_context(public_context(secret_bytes), params)
    vecs = [np.random.default_rng(i).normal(0, 1, 5000) for i in range(3)]
    per_site = [encrypt_update(v, secret) for v in vecs]
    assert len(per_site[0]) == 2 and 16 < len(per_site[0][0]) / 4096 < 16.3
    data, _ = decrypt_sum(_add_all(pub, per_site), secret, n_values=5000)
    np.testing.assert_allclose(data, np.sum(vecs, axis=0), atol=1e-7)


def test_encrypt_refuses_a_chunk_of_the_wrong_size(contexts) -> None:
    secret, _ = contexts
    with pytest.raises(ConfigError, match="exactly 8192 values"):
        secret.encrypt(np.ones(PARAMS.slots))


# ------------------------------------------------------------------ state dicts


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "logreg": nn.Linear(13, 1),
        "mlp": nn.Sequential(
            nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2)
        ),
        "cnn": _small_cnn(),
    }


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
def test_flatten_encrypt_decrypt_unflatten_small_models(name: str, contexts) -> None:
    secret, pub = contexts
    model = _models()[name]
    state = model.state_dict()
    vec, spec = flatten_state(state)
    assert vec.size == spec.size == sum(p.numel() for p in model.parameters())
    sums = _add_all(pub, [encrypt_update(vec, secret), encrypt_update(2 * vec, secret)])
    data, _ = decrypt_sum(sums, secret, n_values=vec.size)
    back = unflatten(data / 3.0, FlatSpec.from_dict(spec.to_dict()), as_torch=True)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        torch.testing.assert_close(back[k], v, atol=1e-6, rtol=0)
    model.load_state_dict(back)


def _monai_models() -> dict[str, nn.Module]:
    monai_nets = pytest.importorskip("monai.networks.nets")
    return {
        "densenet121": monai_nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=2),
        "resnet18": monai_nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=2),
    }


def test_flatten_unflatten_monai_models_round_trip() -> None:
    for name, model in _monai_models().items():
        state = model.state_dict()
        vec, spec = flatten_state(state)
        n_float = sum(v.numel() for v in state.values() if v.is_floating_point())
        assert vec.size == spec.size == n_float, name
        if name == "densenet121":
            assert 6.5e6 < vec.size < 7.5e6
        skipped = set(spec.skipped)
        assert all(not state[k].is_floating_point() for k in skipped)
        back = unflatten(vec, spec, as_torch=True)
        for k, v in state.items():
            if k in skipped:
                continue
            assert torch.equal(back[k], v), (name, k)
        model.load_state_dict({**state, **back})


def test_unflatten_numpy_and_size_mismatch() -> None:
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, dtype=np.int64)}
    vec, spec = flatten_state(state)
    assert spec.skipped == ("n",)
    back = unflatten(vec, spec)
    assert back["w"].dtype == np.float32
    np.testing.assert_array_equal(back["w"], state["w"])
    with pytest.raises(ConfigError, match="needs 6"):
        unflatten(vec[:-1], spec)
