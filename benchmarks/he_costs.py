"""Costs of encrypted aggregation: wire size, encryption throughput, aggregation, decryption.

Runs the full protocol (``fedhealth.privacy.he``: tags, signatures, streaming sum, checked
decryption) for three sites, for a 100 k-parameter vector and for a MONAI DenseNet121
(2-D, 1 channel, 2 classes; ~7 M parameters) state dict, under three CKKS parameter sets side
by side:

* ``fedhealth``: N=8192, primes [59, 60], scale 2^40, symmetric (seeded) encryption, two
  values per slot (real and imaginary part), residues sent in 59 bits - the default
  :class:`~fedhealth.privacy.he.ckks.HEParams`;
* ``before``: N=8192, primes [60, 60], scale 2^40, symmetric, real parts only, SEAL's own
  (zstd) serialisation - the default until 2026-12;
* ``FLARE-like``: N=8192, [60, 40, 40], scale 2^40, public-key encryption, real parts, SEAL's
  serialisation.

Printed per update and parameter set: bytes per parameter a site uploads (``up B/p``) and a
decrypting site downloads (``down B/p``), end-to-end encryption throughput (``enc Mp/s``:
``make_contribution`` - pack, encode, encrypt, serialise, digest, sign - per second of wall
time, and ``Mp/cpu-s`` per second of this process's CPU time: the per-core rate, which
other jobs on a shared machine do not change, and the one the target is checked on), the
coordinator's
add per site, the checked decryption, and the error of the released aggregate against the
plaintext ``sum_i w_i u_i``: ``rel err`` = ||decrypted - plaintext||_2 / ||plaintext||_2 and
``max err`` = max |decrypted - plaintext| (both include the 2^-20 flooding noise).

Everything runs on one core: OMP/MKL/torch threads are set to 1 before importing numpy or
torch, TenSEAL contexts are created with ``n_threads=1`` and the ``tenseal.sealapi`` calls
used here are single-threaded. Each timing is the median of ``--reps`` (>= 3) repetitions:
encryption and aggregation once per site (3 sites, more if ``--reps`` > 3), decryption by
re-sending the identical request (allowed by the one-answer-per-round rule).

Usage::

    python benchmarks/he_costs.py            # full run (a few minutes)
    python benchmarks/he_costs.py --quick    # 100 k vector only
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tenseal as ts  # noqa: E402

from fedhealth.privacy.he.ceremony import (  # noqa: E402
    init_consortium,
    load_coordinator_keys,
    load_site_keys,
)
from fedhealth.privacy.he.ckks import (  # noqa: E402
    HEParams,
    decrypt_sum,
    encrypt_update,
    flatten_state,
    load_context,
    make_secret_context,
    public_context,
)
from fedhealth.privacy.he.contribute import make_contribution  # noqa: E402
from fedhealth.privacy.he.decrypt import verify_and_decrypt  # noqa: E402
from fedhealth.privacy.he.encrypted_sum import EncryptedSum  # noqa: E402

_SEAL_REAL = {"complex_slots": False, "compact_wire": False}
PARAM_SETS: dict[str, HEParams] = {
    "fedhealth [59,60] sym": HEParams(),
    "before: [60,60] real": HEParams(coeff_mod_bit_sizes=(60, 60), max_sites=1000, **_SEAL_REAL),
    "FLARE-like [60,40,40]": HEParams(
        coeff_mod_bit_sizes=(60, 40, 40), symmetric=False, **_SEAL_REAL
    ),
}
TARGET_BYTES, TARGET_RATE, TARGET_REL = 8.0, 2e6, 1e-4
WEIGHT_SCALE = 1000.0


def _densenet_vector() -> np.ndarray:
    import torch
    from monai.networks.nets import DenseNet121

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    vec, _ = flatten_state(model.state_dict())
    return vec


def _run(params: HEParams, vec: np.ndarray, n_sites: int, root: Path) -> dict[str, float]:
    sites = [f"site{i}" for i in range(n_sites)]
    init_consortium(root, sites, sites[0], params)
    keys = {
        s: load_site_keys(
            None,
            s,
            identity_path=root / f"sites/{s}/identity.pem",
            wrapped_path=root / f"sites/{s}/he-secret.wrapped",
            registry_path=root / "public/registry.json",
        )
        for s in sites
    }
    coord = load_coordinator_keys(root)
    total = EncryptedSum(coord.public_context, "bench", 1, "n1", coord.registry)
    rng = np.random.default_rng(0)
    counts = rng.integers(50, 500, n_sites)
    enc_t, enc_cpu, add_t, up_bytes = [], [], [], []
    expected = np.zeros(vec.size)
    for i, s in enumerate(sites):
        update = vec * (1.0 + 0.1 * i)  # distinct updates, same magnitude
        expected += (counts[i] / WEIGHT_SCALE) * update
        t0, c0 = time.perf_counter(), time.process_time()
        chunks, contribution = make_contribution(
            update,
            int(counts[i]),
            keys[s],
            experiment_id="bench",
            round=1,
            nonce="n1",
            weight_scale=WEIGHT_SCALE,
        )
        enc_t.append(time.perf_counter() - t0)
        enc_cpu.append(time.process_time() - c0)
        up_bytes.append(sum(map(len, chunks)))
        t0 = time.perf_counter()
        total.add(chunks, contribution)
        add_t.append(time.perf_counter() - t0)
        del chunks
    request = total.decryption_request()
    down = sum(map(len, request.sum_chunks))
    dec_t = []
    for _ in range(max(3, n_sites)):
        t0 = time.perf_counter()
        out = verify_and_decrypt(
            request,
            keys[sites[-1]],
            expected_experiment="bench",
            expected_round=1,
            expected_nonce="n1",
            min_sites=2,
        )
        dec_t.append(time.perf_counter() - t0)
    return {
        "up": statistics.median(up_bytes) / vec.size,
        "down": down / vec.size,
        "enc": vec.size / statistics.median(enc_t),
        "enc_cpu": vec.size / statistics.median(enc_cpu),
        "add": statistics.median(add_t),
        "dec": statistics.median(dec_t),
        "err": float(np.max(np.abs(out[:-1] - expected))),
        "rel": float(np.linalg.norm(out[:-1] - expected) / np.linalg.norm(expected)),
    }


def _raw_precision(params: HEParams, n_sites: int = 100) -> float:
    """Max abs error of the sum of n_sites vectors uniform in [-10, 10] (no protocol noise)."""
    secret = make_secret_context(params)
    sctx, pctx = load_context(secret, params), load_context(public_context(secret), params)
    rng = np.random.default_rng(1)
    truth = np.zeros(params.lanes)
    acc = None
    for _ in range(n_sites):
        v = rng.uniform(-10, 10, params.lanes)
        truth += v
        ct = pctx.load(encrypt_update(v, sctx)[0])
        if acc is None:
            acc = ct
        else:
            pctx.add_inplace(acc, ct)
    data, _ = decrypt_sum([pctx.dump(acc)], sctx, n_values=params.lanes)
    return float(np.max(np.abs(data - truth)))


def _tenseal_vector_path(vec: np.ndarray, reps: int) -> tuple[float, float]:
    """FLARE's own path: ts.ckks_vector(...).serialize(), N=8192 [60,40,40], 2^40."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40], n_threads=1)
    ctx.global_scale = 2.0**40
    times, size = [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        size = sum(
            len(ts.ckks_vector(ctx, vec[i : i + 4096].tolist()).serialize())
            for i in range(0, vec.size, 4096)
        )
        times.append(time.perf_counter() - t0)
    return size / vec.size, vec.size / statistics.median(times)


def main() -> None:
    """Print the comparison table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="sites = repetitions (>= 3)")
    ap.add_argument("--quick", action="store_true", help="skip the DenseNet121 update")
    args = ap.parse_args()
    n_sites = max(3, args.reps)

    vectors = {"100k vector": np.random.default_rng(0).normal(0, 0.05, 100_000)}
    if not args.quick:
        vectors["DenseNet121 2D"] = _densenet_vector()

    print(
        "fedhealth HE costs - one core (OMP/MKL/torch threads = 1, TenSEAL contexts "
        "n_threads=1, sealapi ops single-threaded)"
    )
    print(
        f"{n_sites} sites; medians of {n_sites} repetitions (encrypt/add: one per site; "
        "decrypt: identical re-requests). Full protocol incl. tags, signatures, digest."
    )
    print(
        "up = site -> coordinator bytes/param; down = summed ciphertext bytes/param sent "
        "to each decrypting site; rel err = ||decrypted - plaintext||_2 / ||plaintext||_2 and "
        "max err = max |decrypted - plaintext| of sum w_i u_i (include the 2^-20 flooding "
        "noise)\n"
    )
    header = (
        f"{'update':<15} {'params':>10}  {'parameter set':<23} {'up B/p':>7} "
        f"{'down B/p':>8} {'enc Mp/s':>8} {'Mp/cpu-s':>8} {'add s/site':>10} {'decrypt s':>9} "
        f"{'rel err':>8} {'max err':>8}"
    )
    print(header)
    print("-" * len(header))
    results = {}
    for vname, vec in vectors.items():
        for pname, params in PARAM_SETS.items():
            with tempfile.TemporaryDirectory() as tmp:
                r = _run(params, vec, n_sites, Path(tmp) / "c")
            results[(vname, pname)] = r
            print(
                f"{vname:<15} {vec.size:>10,}  {pname:<23} {r['up']:>7.2f} {r['down']:>8.2f} "
                f"{r['enc'] / 1e6:>8.2f} {r['enc_cpu'] / 1e6:>8.2f} {r['add']:>10.3f} "
                f"{r['dec']:>9.3f} {r['rel']:>8.1e} "
                f"{r['err']:>8.1e}",
                flush=True,
            )
    v100k = vectors["100k vector"]
    size, rate = _tenseal_vector_path(v100k, n_sites)
    print(
        f"{'100k vector':<15} {v100k.size:>10,}  {'TenSEAL CKKSVector FLARE':<23} {size:>7.2f} "
        f"{'':>8} {rate / 1e6:>8.2f}   (ts.ckks_vector(...).serialize(), no protocol)"
    )

    print(
        "\nraw CKKS precision: sum of 100 sites' vectors uniform in [-10, 10], "
        "max |error| (no flooding)"
    )
    for pname, params in PARAM_SETS.items():
        print(f"  {pname:<23} {_raw_precision(params):.1e}")

    print(
        f"\ntargets: <= {TARGET_BYTES:g} B/param/site up, >= {TARGET_RATE / 1e6:g} M params/s/core "
        f"encryption, relative error <= {TARGET_REL:g}"
    )
    for (vname, pname), r in results.items():
        ok_b = "ok" if r["up"] <= TARGET_BYTES else "MISSED"
        ok_e = "ok" if r["enc_cpu"] >= TARGET_RATE else "MISSED"
        ok_r = "ok" if r["rel"] <= TARGET_REL else "MISSED"
        print(f"  {vname:<15} {pname:<23} size {ok_b:<6} throughput {ok_e:<6} error {ok_r}")


if __name__ == "__main__":
    main()
