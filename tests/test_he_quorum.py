"""The anti-abuse protocol: signed contributions, membership tags and checked decryption.

Every way an honest-but-curious coordinator could try to make a site decrypt something
other than the legitimate aggregate must be refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from fedhealth.errors import ConfigError, CryptoError
from fedhealth.privacy.he.answers import answers_agree, split_aggregate
from fedhealth.privacy.he.ceremony import (
    SiteKeys,
    add_site,
    init_consortium,
    load_coordinator_keys,
    load_site_keys,
)
from fedhealth.privacy.he.ckks import CKKSContext, HEParams
from fedhealth.privacy.he.contribute import make_contribution
from fedhealth.privacy.he.decrypt import verify_and_decrypt
from fedhealth.privacy.he.encrypted_sum import EncryptedSum
from fedhealth.privacy.he.keys import generate_identity, sign
from fedhealth.privacy.he.ledger import SiteLedger
from fedhealth.privacy.he.records import Contribution, DecryptionRequest, chunks_digest

SITES = ["alpha", "beta", "gamma"]
N_VALUES = 10_000  # two chunks (8,126 values each)
EXP, RND, NONCE = "exp-1", 4, "nonce-4"
COUNTS = {"alpha": 120, "beta": 300, "gamma": 80}
WS = 1000.0


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("he") / "consortium"
    init_consortium(root, SITES, "alpha")
    return root


@pytest.fixture(scope="module")
def other_consortium(tmp_path_factory) -> Path:
    """Same parameters and site names, different keys."""
    root = tmp_path_factory.mktemp("he-other") / "consortium"
    init_consortium(root, SITES, "beta")
    return root


def _keys(root: Path) -> dict[str, SiteKeys]:
    """Fresh site keys with in-memory ledgers."""
    return {
        s: load_site_keys(
            None,
            s,
            identity_path=root / f"sites/{s}/identity.pem",
            wrapped_path=root / f"sites/{s}/he-secret.wrapped",
            registry_path=root / "public/registry.json",
        )
        for s in SITES
    }


@pytest.fixture
def keys(consortium) -> dict[str, SiteKeys]:
    return _keys(consortium)


@pytest.fixture
def coord(consortium):
    return load_coordinator_keys(consortium)


UPDATES = {s: np.random.default_rng(i).normal(0, 1, N_VALUES) for i, s in enumerate(SITES)}


def _contribute(keys, exp=EXP, rnd=RND, nonce=NONCE, sites=SITES, cohort=None):
    return {
        s: make_contribution(
            UPDATES[s],
            COUNTS[s],
            keys[s],
            experiment_id=exp,
            round=rnd,
            nonce=nonce,
            weight_scale=WS,
            cohort=cohort,
        )
        for s in sites
    }


def _sum(coord, replies, exp=EXP, rnd=RND, nonce=NONCE) -> EncryptedSum:
    total = EncryptedSum(coord.public_context, exp, rnd, nonce, coord.registry)
    for chunks, contribution in replies.values():
        total.add(chunks, contribution)
    return total


def _raw_sum(coord, chunk_lists: list[list[bytes]]) -> list[bytes]:
    """What a cheating coordinator can compute: any sum of ciphertexts it holds."""
    ctx = coord.public_context
    acc = [ctx.load(b) for b in chunk_lists[0]]
    for chunks in chunk_lists[1:]:
        for a, b in zip(acc, chunks, strict=True):
            ctx.add_inplace(a, ctx.load(b))
    return [ctx.dump(a) for a in acc]


def _decrypt(request, site_keys, min_sites=2, exp=EXP, rnd=RND, nonce=NONCE, **kw):
    return verify_and_decrypt(
        request,
        site_keys,
        expected_experiment=exp,
        expected_round=rnd,
        expected_nonce=nonce,
        min_sites=min_sites,
        **kw,
    )


def _request(contributions, sum_chunks, exp=EXP, rnd=RND, nonce=NONCE) -> DecryptionRequest:
    return DecryptionRequest(exp, rnd, nonce, list(contributions), list(sum_chunks))


def _legit(keys, coord):
    replies = _contribute(keys)
    return replies, _sum(coord, replies).decryption_request()


# ------------------------------------------------------------------ the honest path


def test_encrypted_sum_equals_weighted_plaintext_sum(keys, coord) -> None:
    replies, request = _legit(keys, coord)
    assert [c.n_chunks for _, c in replies.values()] == [2, 2, 2]
    out = _decrypt(request, keys["gamma"], min_sites=3)
    weighted, total = split_aggregate(out, WS)
    expected = sum(COUNTS[s] * UPDATES[s] for s in SITES)
    assert total == pytest.approx(sum(COUNTS.values()), abs=1e-2)
    np.testing.assert_allclose(weighted, expected, atol=1e-2)  # in example units (x1000)
    # FedAvg to ~1e-5 of the update scale (flooding noise 2^-20 on each released value)
    fedavg = weighted / total
    np.testing.assert_allclose(fedavg, expected / sum(COUNTS.values()), atol=5e-5)


def test_sites_agree_and_repeat_request_is_answered_identically(keys, coord) -> None:
    _, request = _legit(keys, coord)
    answers = {s: _decrypt(request, keys[s]) for s in SITES}
    answers_agree(answers, atol=1e-9)
    np.testing.assert_array_equal(_decrypt(request, keys["alpha"]), answers["alpha"])


def test_answers_agree_names_the_odd_site() -> None:
    a = np.zeros(4)
    with pytest.raises(CryptoError, match=r"\['gamma'\] differ"):
        answers_agree({"alpha": a, "beta": a.copy(), "gamma": a + 1}, atol=1e-6)
    with pytest.raises(CryptoError, match="no majority"):
        answers_agree({"alpha": a, "beta": a + 1}, atol=1e-6)


def test_messages_round_trip_as_dicts(keys, coord) -> None:
    _, request = _legit(keys, coord)
    c = request.contributions[0]
    assert Contribution.from_dict(c.to_dict()) == c
    back = DecryptionRequest.from_dict(request.to_dict())
    assert back == request and back.fingerprint() == request.fingerprint()


# ------------------------------------------------------------------ refusals at the site


def test_refuse_single_site_ciphertext_presented_as_sum(keys, coord) -> None:
    replies, request = _legit(keys, coord)
    forged = dataclasses.replace(request, sum_chunks=replies["beta"][0])
    with pytest.raises(CryptoError, match="membership-tag check failed in 2 of 2"):
        _decrypt(forged, keys["alpha"])


def test_refuse_single_contribution_below_min_sites(keys, coord) -> None:
    replies = _contribute(keys)
    chunks, c = replies["beta"]
    with pytest.raises(CryptoError, match="fewer than min_sites=2"):
        _decrypt(_request([c], _raw_sum(coord, [chunks])), keys["alpha"])
    with pytest.raises(ConfigError, match="min_sites must be >= 2"):
        _decrypt(_request([c], chunks), keys["alpha"], min_sites=1)


def test_refuse_sum_omitting_a_claimed_contribution(keys, coord) -> None:
    replies = _contribute(keys)
    partial = _raw_sum(coord, [replies["alpha"][0], replies["beta"][0]])
    claimed = [c for _, c in replies.values()]
    with pytest.raises(CryptoError, match="membership-tag check failed"):
        _decrypt(_request(claimed, partial), keys["alpha"])


def test_refuse_duplicated_contribution(keys, coord) -> None:
    replies = _contribute(keys)
    a, b, g = (replies[s] for s in SITES)
    # claimed twice in the list
    with pytest.raises(CryptoError, match="claimed twice"):
        _decrypt(_request([a[1], a[1], b[1]], _raw_sum(coord, [a[0], a[0], b[0]])), keys["gamma"])
    # counted twice in the sum, claimed once
    doubled = _raw_sum(coord, [a[0], a[0], b[0], g[0]])
    with pytest.raises(CryptoError, match="membership-tag check failed"):
        _decrypt(_request([a[1], b[1], g[1]], doubled), keys["beta"])
    # the coordinator's own sum refuses a second reply from one site
    total = _sum(coord, {"alpha": a})
    with pytest.raises(CryptoError, match="duplicate"):
        total.add(*a)


def test_refuse_scaled_sum(keys, coord) -> None:
    _, request = _legit(keys, coord)
    twice = _raw_sum(coord, [request.sum_chunks, request.sum_chunks])
    with pytest.raises(CryptoError, match="membership-tag check failed"):
        _decrypt(dataclasses.replace(request, sum_chunks=twice), keys["alpha"])


def test_refuse_chunks_mixed_from_different_subsets(keys, coord) -> None:
    replies = _contribute(keys)
    full = _raw_sum(coord, [r[0] for r in replies.values()])
    partial = _raw_sum(coord, [replies["alpha"][0], replies["beta"][0]])
    mixed = [full[0], partial[1]]
    with pytest.raises(CryptoError, match=r"failed in 1 of 2 chunk\(s\) \(first \[1\]"):
        _decrypt(_request([c for _, c in replies.values()], mixed), keys["alpha"])


def test_refuse_sum_altered_after_adding(keys, coord) -> None:
    _, request = _legit(keys, coord)
    chunks = list(request.sum_chunks)
    flipped = bytearray(chunks[1])
    flipped[5000] ^= 0x01  # one bit of one coefficient
    chunks[1] = bytes(flipped)
    with pytest.raises(CryptoError, match="membership-tag check failed"):
        _decrypt(dataclasses.replace(request, sum_chunks=chunks), keys["alpha"])


def test_refuse_slot_masking_attack(keys, coord) -> None:
    """Keep the tag/weight slots of the sum, take the other slots from beta's ciphertext."""
    replies, request = _legit(keys, coord)
    ctx = coord.public_context
    slots = ctx.params.slots
    keep = np.zeros(slots)
    keep[:2] = 1.0
    forged = []
    for sum_b, beta_b in zip(request.sum_chunks, replies["beta"][0], strict=True):
        parts = []
        for blob, mask in ((sum_b, keep), (beta_b, 1.0 - keep)):
            ct = ctx.load(blob)
            pt = sealapi.Plaintext()
            ctx.encoder.encode(mask.tolist(), 2.0**10, pt)
            ctx.evaluator.multiply_plain_inplace(ct, pt)
            parts.append(ct)
        ctx.add_inplace(parts[0], parts[1])
        forged.append(parts[0])
    honest_scale = [ctx.dump(ct) for ct in forged]
    with pytest.raises(CryptoError, match="scale"):
        _decrypt(dataclasses.replace(request, sum_chunks=honest_scale), keys["alpha"])
    for ct in forged:
        ct.scale = ctx.params.scale  # lie about the scale
    lying = [ctx.dump(ct) for ct in forged]
    with pytest.raises(CryptoError, match="membership-tag check failed"):
        _decrypt(dataclasses.replace(request, sum_chunks=lying), keys["gamma"])


def test_refuse_replay_from_earlier_round_or_other_experiment(keys, coord) -> None:
    old = _contribute(keys, rnd=RND - 1, nonce="nonce-3")
    old_request = _sum(coord, old, rnd=RND - 1, nonce="nonce-3").decryption_request()
    # the old request as such, in the current round
    with pytest.raises(CryptoError, match="round 3"):
        _decrypt(old_request, keys["alpha"])
    # old contributions relabelled as current: the signatures name the old round
    relabelled = dataclasses.replace(old_request, round=RND, nonce=NONCE)
    with pytest.raises(CryptoError, match="is a replay"):
        _decrypt(relabelled, keys["alpha"])
    # current, signed contributions with the old round's sum: the tags differ
    current = _contribute(keys)
    stale = _request([c for _, c in current.values()], old_request.sum_chunks)
    with pytest.raises(CryptoError, match="membership-tag check failed"):
        _decrypt(stale, keys["beta"])
    # another experiment, same round and nonce
    other = _contribute(_keys_fresh(keys), exp="exp-2")
    mixed = _request(
        [c for _, c in other.values()], _raw_sum(coord, [r[0] for r in other.values()])
    )
    with pytest.raises(CryptoError, match="is a replay"):
        _decrypt(mixed, keys["gamma"])
    # and the coordinator refuses them when adding
    total = EncryptedSum(coord.public_context, EXP, RND, NONCE, coord.registry)
    with pytest.raises(CryptoError, match="is a replay"):
        total.add(*old["alpha"])


def _keys_fresh(keys: dict[str, SiteKeys]) -> dict[str, SiteKeys]:
    return {s: dataclasses.replace(k, ledger=SiteLedger()) for s, k in keys.items()}


def test_refuse_ciphertext_under_another_key(keys, coord, other_consortium) -> None:
    replies = _contribute(keys)
    strangers = _contribute(_keys(other_consortium))
    # coordinator: their signatures do not verify against our registry
    total = EncryptedSum(coord.public_context, EXP, RND, NONCE, coord.registry)
    with pytest.raises(CryptoError, match="invalid signature"):
        total.add(*strangers["alpha"])
    # site: our valid contributions claimed, a sum computed under the other key delivered
    foreign = _raw_sum(coord, [r[0] for r in strangers.values()])
    with pytest.raises(CryptoError, match="membership-tag check failed in 2 of 2"):
        _decrypt(_request([c for _, c in replies.values()], foreign), keys["alpha"])


def test_refuse_unsigned_wrongly_signed_and_unknown(keys, coord) -> None:
    replies = _contribute(keys)
    (a_chunks, a), (b_chunks, b), (g_chunks, g) = (replies[s] for s in SITES)
    unsigned = dataclasses.replace(a, signature=b"")
    by_beta = dataclasses.replace(a, signature=sign(keys["beta"].identity, a.signed_bytes()))
    mallory = generate_identity("mallory")
    unknown = dataclasses.replace(a, site="mallory")
    unknown = dataclasses.replace(unknown, signature=sign(mallory, unknown.signed_bytes()))
    total = EncryptedSum(coord.public_context, EXP, RND, NONCE, coord.registry)
    for bad, match in (
        (unsigned, "unsigned"),
        (by_beta, "invalid signature"),
        (unknown, "not a consortium site"),
    ):
        with pytest.raises(CryptoError, match=match):
            total.add(a_chunks, bad)
    assert total.sites == []
    legit_sum = _raw_sum(coord, [a_chunks, b_chunks, g_chunks])
    for bad, match in (
        (unsigned, "unsigned"),
        (by_beta, "invalid signature"),
        (unknown, "not a consortium site"),
    ):
        with pytest.raises(CryptoError, match=match):
            _decrypt(_request([bad, b, g], legit_sum), keys["gamma"])


def test_coordinator_refuses_tampered_chunk_and_keeps_its_sum(keys, coord) -> None:
    replies = _contribute(keys)
    total = EncryptedSum(coord.public_context, EXP, RND, NONCE, coord.registry)
    total.add(*replies["alpha"])
    chunks, c = replies["beta"]
    flipped = bytearray(chunks[0])
    flipped[-7] ^= 0x80
    with pytest.raises(CryptoError, match=r"site 'beta'.*do not match the signed digest"):
        total.add([bytes(flipped), chunks[1]], c)
    with pytest.raises(CryptoError, match="declares 2 chunks"):
        total.add(chunks[:1], c)
    total.add(*replies["gamma"])
    assert total.sites == ["alpha", "gamma"]
    out = _decrypt(total.decryption_request(), keys["beta"])
    expected = (COUNTS["alpha"] * UPDATES["alpha"] + COUNTS["gamma"] * UPDATES["gamma"]) / WS
    np.testing.assert_allclose(out[:-1], expected, atol=1e-5)


def test_coordinator_rolls_back_a_half_added_reply(keys, coord) -> None:
    """A validly signed reply whose second chunk is garbage leaves the sum untouched."""
    replies = _contribute(keys)
    total = _sum(coord, {"alpha": replies["alpha"]})
    chunks, c = replies["beta"]
    bad_chunks = [chunks[0], b"\x00" * 64]
    resigned = dataclasses.replace(c, digest=chunks_digest(bad_chunks))
    resigned = dataclasses.replace(
        resigned, signature=sign(keys["beta"].identity, resigned.signed_bytes())
    )
    with pytest.raises(CryptoError, match="chunk 1 is not a valid ciphertext"):
        total.add(bad_chunks, resigned)
    total.add(*replies["beta"])
    total.add(*replies["gamma"])
    out = _decrypt(total.decryption_request(), keys["alpha"], min_sites=3)
    expected = sum(COUNTS[s] * UPDATES[s] for s in SITES) / WS
    np.testing.assert_allclose(out[:-1], expected, atol=1e-5)


# ------------------------------------------------------------------ one answer per round


def test_refuse_second_different_request_in_same_round(keys, coord) -> None:
    replies, request = _legit(keys, coord)
    _decrypt(request, keys["alpha"])
    subset = {s: replies[s] for s in ("alpha", "beta")}
    second = _sum(coord, subset).decryption_request()
    with pytest.raises(CryptoError, match="second, different decryption request"):
        _decrypt(second, keys["alpha"])
    # a site that has not answered yet may (without cohort binding) answer the subset
    _decrypt(second, keys["beta"])


def test_failed_tag_check_locks_the_round(keys, coord) -> None:
    replies, request = _legit(keys, coord)
    with pytest.raises(CryptoError, match="membership-tag"):
        _decrypt(dataclasses.replace(request, sum_chunks=replies["beta"][0]), keys["alpha"])
    with pytest.raises(CryptoError, match="refused a forged aggregate"):
        _decrypt(request, keys["alpha"])
    _decrypt(request, keys["beta"])  # other sites are unaffected


def test_ledger_persists_across_restarts(consortium, coord, tmp_path) -> None:
    ledger = tmp_path / "alpha-ledger.json"

    def alpha() -> SiteKeys:
        return load_site_keys(consortium, "alpha", ledger_path=ledger)

    keys = {**_keys(consortium), "alpha": alpha()}
    replies, request = _legit(keys, coord)
    _decrypt(request, keys["alpha"])
    second = _sum(coord, {s: replies[s] for s in ("alpha", "beta")}).decryption_request()
    with pytest.raises(CryptoError, match="second, different"):
        _decrypt(second, alpha())
    assert oct(ledger.stat().st_mode & 0o777) == "0o600"


# ------------------------------------------------------------------ cohort binding


def test_cohort_binding_blocks_cross_site_differencing(keys, coord) -> None:
    replies = _contribute(keys, cohort=SITES)
    full = _sum(coord, replies).decryption_request()
    subset = _request(
        [replies[s][1] for s in ("alpha", "beta")],
        _raw_sum(coord, [replies["alpha"][0], replies["beta"][0]]),
    )
    with pytest.raises(CryptoError, match="not exactly the cohort"):
        _decrypt(subset, keys["beta"])
    _decrypt(full, keys["alpha"])
    # the coordinator cannot complete a smaller re-run cohort: alpha, who decrypted, refuses
    # it (beta, who did not, accepts a re-announcement after a drop-out, but the cohort
    # {alpha, beta} never completes)
    with pytest.raises(CryptoError, match="contribute again"):
        _contribute(keys, sites=["alpha"], cohort=["alpha", "beta"])
    with pytest.raises(CryptoError, match="already decrypted"):
        _contribute(keys, sites=["alpha"], nonce="another-nonce", cohort=["alpha", "beta"])
    _contribute(keys, sites=["beta"], nonce="another-nonce", cohort=["alpha", "beta"])
    # and its own sum refuses to build an incomplete cohort request
    with pytest.raises(CryptoError, match="incomplete"):
        _sum(coord, {"alpha": replies["alpha"]}).decryption_request()


def test_values_beyond_headroom_refused_with_site_and_round(keys) -> None:
    with pytest.raises(
        ConfigError, match=r"site 'alpha', experiment 'exp-1', round 4.*weight_scale"
    ):
        make_contribution(
            np.full(10, 50.0),
            5000,
            keys["alpha"],
            experiment_id=EXP,
            round=RND,
            nonce=NONCE,
            weight_scale=WS,
        )


# ------------------------------------------------------------------ slot-selective attack


def _lll(basis: np.ndarray, delta: float = 0.99) -> np.ndarray:
    """Textbook LLL (floating point; fine for the ~12 dimensions used here)."""
    b = basis.astype(float).copy()
    n = len(b)

    def gram_schmidt() -> tuple[np.ndarray, np.ndarray]:
        bs, mu = np.zeros_like(b), np.zeros((n, n))
        for i in range(n):
            bs[i] = b[i]
            for j in range(i):
                mu[i, j] = b[i] @ bs[j] / (bs[j] @ bs[j])
                bs[i] -= mu[i, j] * bs[j]
        return bs, mu

    bs, mu = gram_schmidt()
    k = 1
    while k < n:
        for j in range(k - 1, -1, -1):
            q = round(mu[k, j])
            if q:
                b[k] -= q * b[j]
                bs, mu = gram_schmidt()
        if bs[k] @ bs[k] >= (delta - mu[k, k - 1] ** 2) * (bs[k - 1] @ bs[k - 1]):
            k += 1
        else:
            b[[k, k - 1]] = b[[k - 1, k]]
            bs, mu = gram_schmidt()
            k = max(k - 1, 1)
    return b


def _selective_multiplier(n: int, slots: int) -> np.ndarray:
    """Slot values m(zeta_j) of a small integer polynomial m with m ~ 0 at slots 0 and 1.

    SEAL's slot j is the evaluation at zeta^(3^j), zeta = exp(i pi / N). With complex slots
    the imaginary part of slots 0 and 1 carries data, so m must vanish there as a complex
    number (real and imaginary part), not only in its real part. Lattice reduction over 16
    random monomials finds m with small coefficients, |m| < ~1e-7 on the tag and weight
    slots and |m| of order 100 on almost every other slot.
    """
    zeta = np.exp(1j * np.pi * np.array([pow(3, j, 2 * n) for j in range(slots)]) / n)
    k = 16
    exps = np.random.default_rng(0).choice(n, k, replace=False)
    basis = np.zeros((k, k + 4))
    basis[:, :k] = np.eye(k)
    for col, (slot, part) in enumerate([(0, np.real), (0, np.imag), (1, np.real), (1, np.imag)]):
        basis[:, k + col] = 2.0**32 * part(zeta[slot] ** exps)
    coeffs = np.round(_lll(basis)[0, :k]).astype(int)
    return sum(int(a) * zeta ** int(e) for a, e in zip(coeffs, exps, strict=True))


def _selective_attack(coord, request, victim_chunks, m=None) -> list[bytes]:
    """Legitimate sum + m * (victim's ciphertext): scale stays 2^40, shape stays fresh."""
    ctx = coord.public_context
    if m is None:
        m = _selective_multiplier(ctx.params.poly_modulus_degree, ctx.params.slots)
    pt = sealapi.Plaintext()
    ctx.encoder.encode(m.tolist(), 1.0, pt)  # exactly the integer polynomial m
    out = []
    for sum_b, victim_b in zip(request.sum_chunks, victim_chunks, strict=True):
        acc, ct = ctx.load(sum_b), ctx.load(victim_b)
        ctx.evaluator.multiply_plain_inplace(ct, pt)
        ctx.add_inplace(acc, ct)
        out.append(ctx.dump(acc))
    return out, m


def test_hidden_tags_stop_slot_selective_attack_that_breaks_fixed_slot_tags(
    tmp_path, keys, coord
) -> None:
    # The bare protocol (tag only in fixed slot 0): the attack passes and leaks beta's update.
    bare_root = tmp_path / "bare"
    init_consortium(bare_root, SITES, "alpha", HEParams(hidden_tags=0))
    bare_keys, bare_coord = _keys(bare_root), load_coordinator_keys(bare_root)
    replies, request = _legit(bare_keys, bare_coord)
    forged, m = _selective_attack(bare_coord, request, replies["beta"][0])
    leaked = _decrypt(dataclasses.replace(request, sum_chunks=forged), bare_keys["alpha"])
    # chunk 0's data lanes: real parts of slots 2.., then imaginary parts of slots 2..
    slots = bare_keys["alpha"].params.slots
    data_slots = np.arange(2, slots)
    decrypted = leaked[: slots - 2] + 1j * leaked[slots - 2 : 2 * slots - 4]
    strong = np.abs(m[data_slots]) > 20
    estimate = np.real(decrypted[strong] / m[data_slots][strong])  # the attacker knows m
    truth = (COUNTS["beta"] / WS) * UPDATES["beta"][: data_slots.size][strong]
    assert strong.mean() > 0.5
    assert np.corrcoef(estimate, truth)[0, 1] > 0.99  # beta's update, disclosed

    # With hidden tag slots (the default) the same attack is refused.
    replies, request = _legit(keys, coord)
    forged, _ = _selective_attack(coord, request, replies["beta"][0])
    with pytest.raises(CryptoError, match="membership-tag check failed in 2 of 2"):
        _decrypt(dataclasses.replace(request, sum_chunks=forged), keys["alpha"])


def test_paired_tags_stop_a_purely_imaginary_multiplier(keys, coord) -> None:
    """q = X^k - X^-k is purely imaginary in every slot: q * z swaps the real and imaginary
    parts of z (times Im q). A tag alone in its slot, beside a zero of a sparse update, would
    not see it (0 * tag + Im q * 0 = 0), and the victim's values would land in released
    lanes. With a tag in both parts of every reserved slot the swap moves a tag: refused."""
    n, slots = coord.public_context.params.poly_modulus_degree, coord.public_context.params.slots
    sparse = np.zeros(N_VALUES)
    sparse[np.random.default_rng(7).choice(N_VALUES, 20, replace=False)] = 1.0
    replies = {
        s: make_contribution(
            sparse if s == "beta" else UPDATES[s],
            COUNTS[s],
            keys[s],
            experiment_id=EXP,
            round=RND,
            nonce=NONCE,
            weight_scale=WS,
        )
        for s in SITES
    }
    request = _sum(coord, replies).decryption_request()
    zeta = np.exp(1j * np.pi * np.array([pow(3, j, 2 * n) for j in range(slots)]) / n)
    q = zeta**5 - zeta ** (2 * n - 5)  # X^5 - X^-5, as X^(2N) = 1
    assert np.max(np.abs(q.real)) < 1e-9 and np.max(np.abs(q.imag)) > 1.9
    forged, _ = _selective_attack(coord, request, replies["beta"][0], m=q)
    with pytest.raises(CryptoError, match="membership-tag check failed in 2 of 2"):
        _decrypt(dataclasses.replace(request, sum_chunks=forged), keys["alpha"])


# ------------------------------------------------------------------ a round re-run after a crash


def test_round_rerun_accepted_before_any_decryption(keys, coord) -> None:
    """A coordinator that crashed mid-round re-runs it under a new nonce; the sites accept
    because nothing of that round was decrypted, and only the new sum is decryptable."""
    first = _contribute(keys)
    lost = _sum(coord, first).decryption_request()
    rerun = _contribute(keys, nonce="nonce-4-rerun")
    request = _sum(coord, rerun, nonce="nonce-4-rerun").decryption_request()
    out = _decrypt(request, keys["alpha"], nonce="nonce-4-rerun")
    expected = sum(COUNTS[s] * UPDATES[s] for s in SITES) / WS
    np.testing.assert_allclose(out[:-1], expected, atol=1e-5)
    # the superseded sum is dead: a site decrypts only under the nonce it contributed last
    with pytest.raises(CryptoError):
        _decrypt(lost, keys["beta"], nonce="nonce-4-rerun")


def test_round_rerun_refused_after_a_decryption(keys, coord) -> None:
    _, request = _legit(keys, coord)
    _decrypt(request, keys["alpha"])
    with pytest.raises(CryptoError, match="already decrypted"):
        _contribute(keys, sites=["alpha"], nonce="nonce-4-rerun")
    # a site that did not decrypt may re-contribute, but the decryptor's refusal means the
    # re-run sum never reaches min_sites with a site that could difference it
    _contribute(keys, sites=["beta"], nonce="nonce-4-rerun")


def test_round_rerun_under_cohort_binding_keeps_the_binding(keys, coord) -> None:
    """A re-announced cohort-bound round may lose sites (a drop-out) and gain them (a resume
    that brings a crashed site back), but not switch cohort binding off."""
    _contribute(keys, sites=["alpha", "beta"], cohort=["alpha", "beta"])
    with pytest.raises(CryptoError, match=r"rule he-rerun-cohort"):
        _contribute(keys, sites=["beta"], nonce="nonce-4-rerun")  # binding off
    _contribute(keys, sites=["beta"], nonce="nonce-4-rerun", cohort=["beta", "gamma"])
    _contribute(keys, sites=["beta"], nonce="nonce-4-rerun2", cohort=["beta"])


def test_resumed_round_with_a_returning_site_decrypts_only_the_new_sum(keys, coord) -> None:
    """A crashed coordinator's round of two sites is re-run after a resume with the third site
    back: the larger cohort contributes and decrypts; the lost two-site sum is undecryptable
    at every site, and a site that decrypted the new sum refuses any further re-run."""
    two = ["alpha", "beta"]
    first = _contribute(keys, sites=two, cohort=two)
    lost = _sum(coord, first).decryption_request()
    rerun = _contribute(keys, nonce="nonce-4-rerun", cohort=SITES)
    request = _sum(coord, rerun, nonce="nonce-4-rerun").decryption_request()
    out = _decrypt(request, keys["alpha"], nonce="nonce-4-rerun")
    expected = sum(COUNTS[s] * UPDATES[s] for s in SITES) / WS
    np.testing.assert_allclose(out[:-1], expected, atol=1e-5)
    for site in SITES:  # under its own nonce too: every site has moved on to the re-run's
        with pytest.raises(CryptoError, match="did not contribute to that round under nonce"):
            _decrypt(lost, keys[site])
    with pytest.raises(CryptoError, match="already decrypted"):
        _contribute(keys, sites=["alpha"], nonce="nonce-4-again", cohort=two)


# ------------------------------------------------------------------ the sum's headroom


def test_consortium_beyond_max_sites_refused(tmp_path) -> None:
    small = HEParams(max_sites=2)
    with pytest.raises(ConfigError, match=r"3 sites exceeds .* max_sites 2"):
        init_consortium(tmp_path / "a", SITES, "alpha", small)
    init_consortium(tmp_path / "b", SITES[:2], "alpha", small)
    with pytest.raises(ConfigError, match=r"3 sites exceeds .* max_sites 2"):
        add_site(tmp_path / "b", "gamma", "alpha")


def test_sum_and_decryption_refuse_more_than_max_sites(keys, coord) -> None:
    """Even with a registry larger than max_sites, no sum can exceed the headroom."""
    tight = dataclasses.replace(coord.public_context.params, max_sites=2)
    ctx = CKKSContext(coord.public_context.ts_context, tight)
    total = EncryptedSum(ctx, EXP, RND, NONCE, coord.registry)
    replies = _contribute(keys)
    total.add(*replies["alpha"])
    total.add(*replies["beta"])
    with pytest.raises(CryptoError, match="already holds max_sites=2"):
        total.add(*replies["gamma"])
    request = _sum(coord, replies).decryption_request()
    tight_keys = dataclasses.replace(
        keys["alpha"], registry=dataclasses.replace(keys["alpha"].registry, params=tight)
    )
    with pytest.raises(CryptoError, match="more than the HE parameters' max_sites=2"):
        _decrypt(request, tight_keys)


# ------------------------------------------------------------------ what each site was shown


def _shown(keys, shown: dict[str, dict], counts=COUNTS, exp=EXP, nonce=NONCE):
    """Contributions of the sites in ``shown``, each made from what it alone was shown."""
    base = {"spec_digest": "spec-a", "global_model": "model-a", "weight_key": "num-examples"}
    return {
        s: make_contribution(
            UPDATES[s],
            counts[s],
            keys[s],
            experiment_id=exp,
            round=RND,
            nonce=nonce,
            **{"weight_scale": WS, **base, **extra},
        )
        for s, extra in shown.items()
    }


def test_sites_shown_different_weight_scales_or_specs_are_refused(keys, coord) -> None:
    """The steering attack: two sites told a huge weight scale (their weights vanish) and the
    third a small one, so the sum is the third site's update; or two sites told
    learning_rate = 0 (another spec). Each site signs what it was shown; a decrypting site
    refuses contributions that signed another announcement than its own."""
    steered = _shown(
        keys, {"alpha": {"weight_scale": 1e9}, "beta": {"weight_scale": 1e9}, "gamma": {}}
    )
    request = _sum(coord, steered).decryption_request()  # the coordinator can still sum them
    for site in SITES:
        with pytest.raises(CryptoError, match="rule he-same-announcement"):
            _decrypt(request, keys[site])
    lr0 = _shown(
        _keys_fresh(keys),
        {"alpha": {"spec_digest": "lr-0"}, "beta": {"spec_digest": "lr-0"}, "gamma": {}},
    )
    with pytest.raises(CryptoError, match="rule he-same-announcement"):
        _decrypt(_sum(coord, lr0).decryption_request(), keys["gamma"])
    # another global model, min_sites or weight key each change the announcement too
    for extra in ({"global_model": "model-b"}, {"min_sites": 3}, {"weight_key": "w"}):
        fresh = _keys_fresh(keys)
        mixed = _shown(fresh, {"alpha": extra, "beta": {}, "gamma": {}})
        with pytest.raises(CryptoError, match="rule he-same-announcement"):
            _decrypt(_sum(coord, mixed).decryption_request(), fresh["beta"])
    # the same announcement everywhere decrypts
    fresh = _keys_fresh(keys)
    honest = _shown(fresh, {s: {} for s in SITES})
    out = _decrypt(_sum(coord, honest).decryption_request(), fresh["alpha"])
    np.testing.assert_allclose(out[-1], sum(COUNTS.values()) / WS, atol=1e-5)


def test_forged_sum_of_another_announcement_fails_the_tags(keys, coord) -> None:
    """Even a contribution that a site signed for another announcement of the same round
    draws its tags from that announcement: relabelled, it fails the tag check."""
    fresh = _keys_fresh(keys)
    other = _shown(fresh, {"alpha": {"weight_scale": 1e9}, "beta": {}, "gamma": {}})
    honest = _shown(_keys_fresh(keys), {s: {} for s in SITES})
    forged = _request(
        [c for _, c in honest.values()],
        _raw_sum(coord, [other["alpha"][0], honest["beta"][0], honest["gamma"][0]]),
    )
    with pytest.raises(CryptoError, match="membership-tag check failed"):
        _decrypt(forged, fresh["beta"])


def test_one_site_holding_most_of_the_weight_is_refused(keys, coord) -> None:
    """With honest, equal announcements, a sum where one site holds more than the cap
    (default 0.99) of the total weight is refused: it would be that site's update."""
    skewed = {"alpha": 99_500, "beta": 300, "gamma": 200}
    scale = {"weight_scale": 10_000.0}  # the same for every site: the announcements agree
    fresh = _keys_fresh(keys)
    replies = _shown(fresh, {s: scale for s in SITES}, skewed)
    request = _sum(coord, replies).decryption_request()
    with pytest.raises(CryptoError, match=r"'alpha' holds 0\.995 of the total.*weight-share"):
        _decrypt(request, fresh["beta"])
    # a site sets its own cap: a tighter one refuses an honest skew, a looser one accepts
    _decrypt(request, fresh["gamma"], max_weight_share=1.0)
    fresh = _keys_fresh(keys)
    request = _sum(coord, _shown(fresh, {s: {} for s in SITES})).decryption_request()
    with pytest.raises(CryptoError, match=r"'beta' holds 0\.6 of the total"):
        _decrypt(request, fresh["alpha"], max_weight_share=0.5)
    _decrypt(request, fresh["beta"])  # beta holds 0.6 under the default cap


def test_second_experiment_id_from_the_same_global_model_is_refused(
    consortium, coord, tmp_path
) -> None:
    """A new run (new experiment id) of the same experiment, round and global model would
    give a second sum of nearly the same updates: refused under any experiment id, even by
    a site that did not decrypt, and across restarts (persisted ledger)."""
    ledger = tmp_path / "alpha-ledger.json"
    keys = {**_keys(consortium), "alpha": load_site_keys(consortium, "alpha", ledger_path=ledger)}
    shown = {s: {} for s in SITES}
    first = _shown(keys, shown, exp="study:run-1:aa")
    request = _sum(coord, first, exp="study:run-1:aa").decryption_request()
    _decrypt(request, keys["beta"], exp="study:run-1:aa")
    restarted = {**keys, "alpha": load_site_keys(consortium, "alpha", ledger_path=ledger)}
    for site in SITES:
        with pytest.raises(CryptoError, match="rule he-one-contribution-per-model"):
            _shown(restarted, {site: {}}, exp="study:run-2:bb", nonce="n-2")
    # another global model (the next round's, or another seed) is a new contribution
    _shown(restarted, {"alpha": {"global_model": "model-b"}}, exp="study:run-2:bb", nonce="n-2")
    # the same experiment id re-runs a crashed round before any decryption (resume)
    _shown(restarted, {"alpha": {}, "gamma": {}}, exp="study:run-1:aa", nonce="n-rerun")
