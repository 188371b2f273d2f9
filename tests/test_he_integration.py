"""Encrypted aggregation inside the federation: the coordinator never sees one site's update.

Most tests drive the real ClientApp handlers and the real ``Federation`` round loop through an
in-process grid (no Ray): fast, and every message can be inspected or tampered with in
transit. The last tests run real Flower simulations through the CLI (``slow``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedhealth.config.experiment import ExperimentConfig, load_experiment
from fedhealth.coordinator import federation as federation_mod
from fedhealth.coordinator.federation import Federation
from fedhealth.coordinator.strategies import build_strategy
from fedhealth.data.demo import breast_cancer_feature_names, write_breast_cancer_sites
from fedhealth.envelope import open_envelope
from fedhealth.errors import ConfigError, CryptoError, FederationError
from fedhealth.privacy.he.ceremony import init_consortium, load_coordinator_keys, load_site_keys
from fedhealth.privacy.he.contribute import make_contribution
from fedhealth.privacy.he.demo import ensure_consortium
from fedhealth.privacy.he.keys import generate_identity, sign
from fedhealth.privacy.he.ledger import SiteLedger
from fedhealth.privacy.he.records import Contribution, DecryptionRequest
from fedhealth.privacy.he.wire import (
    CONTRIBUTION_RECORD,
    DECRYPT_MESSAGE_TYPE,
    REQUEST_RECORD,
    contribution_record,
    read_contribution,
    request_record,
)
from fedhealth.site.client_app import app as client_app

SITES = ["alpha", "beta", "gamma"]
# Tests of the checks a cohort-bound round makes redundant (subset sums, one aggregate per
# round without a cohort) turn cohort binding (on by default) off.
NO_COHORT = {"quorum = 2": "quorum = 2\nbind_cohort = false"}

EXPERIMENT = """
[experiment]
name = "{name}"
sites = [{sites}]
rounds = 2
min_sites = 2
seed = 7

[task]
dataset = "breast-cancer"
kind = "tabular"
normalisation = "site"

[task.schema]
label = "diagnosis"
label_map = {{ benign = 0, malignant = 1 }}
missing = "error"
numeric = [{features}]

[model]
name = "mlp"
hidden = [8]

[training]
local_epochs = 1
batch_size = 16
learning_rate = 0.1
momentum = 0.5

[strategy]
{strategy}

[privacy.he]
enabled = {he}
keys_dir = "../consortium"
quorum = 2
"""

SITE = """
[site]
name = "{name}"
workspace = "../workspace/sites"

[datasets.breast-cancer]
kind = "tabular"
path = "../data/{name}/breast-cancer.csv"

[privacy]
# Public data, small splits: exact metrics so the encrypted and plaintext runs compare.
release_metrics = "exact"
min_split_records = 1

[keys]
identity = "../consortium/sites/{name}/identity.pem"
he_secret = "../consortium/sites/{name}/he-secret.wrapped"
registry = "../consortium/public/registry.json"
"""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Three sites with real breast-cancer data, their profiles and consortium keys."""
    root = tmp_path_factory.mktemp("he-world")
    write_breast_cancer_sites(root / "data", SITES, seed=3)
    init_consortium(root / "consortium", SITES, "alpha")
    (root / "sites").mkdir()
    for s in SITES:
        (root / "sites" / f"{s}.toml").write_text(SITE.format(name=s))
    (root / "experiments").mkdir()
    return root


def experiment(
    world: Path, *, he: bool = True, strategy: str = 'name = "fedavg"', edits=None, name=None
) -> ExperimentConfig:
    """Write and load an experiment over the world's three sites."""
    name = name or f"toy-{uuid.uuid4().hex[:6]}"
    text = EXPERIMENT.format(
        name=name,
        sites=", ".join(f'"../sites/{s}.toml"' for s in SITES),
        features=", ".join(f'"{f}"' for f in breast_cancer_feature_names()),
        strategy=strategy,
        he=str(he).lower(),
    )
    for old, new in (edits or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = world / "experiments" / f"{name}.toml"
    path.write_text(text)
    return load_experiment(path)


class StubRecorder:
    """Stands in for MLflow in round-level tests."""

    def __init__(self, cfg, uri) -> None:
        self.run_id = "stub-run"
        self.metrics: dict[int, dict] = {}
        self.client = self

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.setdefault(step, {}).update(metrics)

    def log_round(self, round_: int, glob: dict, per_site: dict) -> None:
        pass

    def log_batch(self, *args, **kwargs) -> None:
        pass

    def set_tag(self, *args) -> None:
        pass


Hook = Callable[[str, Message], Message | None]


def _site_reply(msg: Message, context: Context) -> Message:
    """The site's ClientApp's reply, its records opened (they are sealed on the wire) so
    that tests and hooks read them."""
    reply = client_app(msg, context)
    if reply.has_content():
        reply.content = open_envelope(reply.content)
    return reply


class LocalGrid:
    """An in-process Flower Grid: each message goes straight to the site's ClientApp.

    ``on_request(site, msg)`` may replace an instruction before the site sees it (a
    malicious coordinator); ``on_reply(site, reply)`` may replace or drop (``None``) a reply
    in transit (a network attacker or a cheating site). ``log`` keeps every raw reply.
    """

    def __init__(
        self, world: Path, sites=None, on_request=None, on_reply=None, roster=tuple(SITES)
    ):
        # ``roster``: every site of the experiment in its order (the site index seeds training).
        self.nodes = {
            100 + roster.index(s): (s, world / "sites" / f"{s}.toml", roster.index(s))
            for s in (sites or roster)
        }
        self.on_request: Hook | None = on_request
        self.on_reply: Hook | None = on_reply
        self.pull_interval = 0.0
        self.log: list[tuple[str, Message]] = []
        self._out: dict[str, Message] = {}

    def node(self, site: str) -> int:
        return next(n for n, (s, _, _) in self.nodes.items() if s == site)

    def context(self, node: int) -> Context:
        _, path, idx = self.nodes[node]
        cfg = {"profile": str(path), "site-index": idx}
        return Context(run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config={})

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            node = msg.metadata.dst_node_id
            site = self.nodes[node][0]
            if self.on_request is not None:
                msg.content = open_envelope(msg.content)  # the hooks attack the records
                msg = self.on_request(site, msg) or msg
            reply = _site_reply(msg, self.context(node))
            self.log.append((site, reply))
            if self.on_reply is not None:
                reply = self.on_reply(site, reply)
            if reply is not None:
                self._out[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self._out.pop(i) for i in list(ids) if i in self._out]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture(autouse=True)
def flower_identity():
    """Messages outside a Flower process need a run and node identity (as the engine sets)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID


@pytest.fixture
def stub_mlflow(monkeypatch):
    monkeypatch.setattr(federation_mod, "RunRecorder", StubRecorder)


def initial(fed: Federation) -> ArrayRecord:
    return ArrayRecord(fed.initial_model().state_dict())


def flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([arrays[k].numpy().ravel() for k in sorted(arrays)])


def capture(store: dict[str, Message]) -> Hook:
    """A reply hook that keeps each site's first training reply and passes replies on."""

    def hook(site: str, reply: Message) -> Message:
        if reply.has_content() and CONTRIBUTION_RECORD in reply.content:
            store.setdefault(site, reply)
        return reply

    return hook


def is_training_reply(reply: Message) -> bool:
    return reply.has_content() and CONTRIBUTION_RECORD in reply.content


def contribution_of(reply: Message) -> tuple[list[bytes], Contribution]:
    return read_contribution(reply.content[CONTRIBUTION_RECORD], where="test")


def with_contribution(reply: Message, chunks, contribution: Contribution, site=None) -> Message:
    """A copy of ``reply`` carrying other chunks / contribution (and site record)."""
    content = RecordDict(
        {
            CONTRIBUTION_RECORD: contribution_record(chunks, contribution),
            "metrics": reply.content["metrics"],
            "site": ConfigRecord({"name": site or str(reply.content["site"]["name"])}),
        }
    )
    return Message(content=content, metadata=reply.metadata)


@pytest.fixture(autouse=True)
def same_training_with_and_without_he(monkeypatch):
    """Sites seed training with the round nonce too (a replay is never bit-identical), and
    only an encrypted round has a nonce: these tests compare the aggregation alone, so the
    encrypted and the plaintext federations train alike."""
    import fedhealth.site.privacy_guard as guard
    import fedhealth.site.runtime as site_runtime

    seed, binding = site_runtime.training_seed, guard.round_binding
    monkeypatch.setattr(
        site_runtime, "training_seed", lambda s, r, i, run=None, nonce=None: seed(s, r, i, run)
    )
    monkeypatch.setattr(guard, "round_binding", lambda run, nonce: binding(run, None))


# --------------------------------------------------------------------------- the happy path


def test_encrypted_rounds_match_plaintext_and_no_update_leaves_in_clear(world, stub_mlflow):
    he_fed = Federation(experiment(world, he=True), "unused")
    plain_fed = Federation(experiment(world, he=False), "unused")
    grid = LocalGrid(world)
    he_arrays = plain_arrays = initial(he_fed)
    diffs = []
    for r in (1, 2):
        he_arrays = he_fed.train_round(grid, r, he_arrays)
        plain_arrays = plain_fed.train_round(LocalGrid(world), r, plain_arrays)
        diffs.append(float(np.max(np.abs(flat(he_arrays) - flat(plain_arrays)))))
    # CKKS precision: released sums carry flooding noise of std 2^-20, divided by the total
    # weight (~427 examples / weight_scale 1000) in the mean: ~2e-6 per value and round;
    # local training in round 2 carries round 1's difference along.
    assert 0 < diffs[0] < 1e-5 and diffs[1] < 1e-4, diffs
    train_replies = [m for _, m in grid.log if m.has_content() and CONTRIBUTION_RECORD in m.content]
    assert not [m.error.reason for _, m in grid.log if m.has_error()]
    assert len(train_replies) == 6
    for _, m in grid.log:  # nothing a site sent holds plaintext weights
        assert "arrays" not in m.content
    costs = he_fed.recorder.metrics[2]
    assert costs["he/contributions"] == 3 and costs["he/refused_contributions"] == 0
    assert 7 <= costs["he/bytes_per_site"] / 8126 <= 8  # one seeded, compact ciphertext chunk
    assert costs["he/decrypt_seconds"] > 0 and costs["he/encrypt_seconds"] > 0
    prov = he_fed.encryption.provenance()
    assert prov["he"] == "on" and "N=8192" in prov["he_params"]
    assert not he_fed.encryption.keys.public_context.can_decrypt


@pytest.mark.parametrize(
    ("strategy", "weight_scale"),
    [
        ('name = "fedadam"\noptions = { eta = 0.05 }', 1000),
        # Site weights sqrt(n) ~ 10: a matching weight_scale keeps the total weight ~ 1.
        ('name = "strategies/balanced_fedavg.py:BalancedFedAvg"\noptions = { alpha = 0.5 }', 10),
    ],
)
def test_server_optimisers_and_custom_weights_apply_to_the_decrypted_aggregate(
    world, stub_mlflow, root, strategy, weight_scale
):
    shutil.copytree(root / "strategies", world / "strategies", dirs_exist_ok=True)
    scale = {"quorum = 2": f"quorum = 2\nweight_scale = {weight_scale}"}
    he_fed = Federation(experiment(world, he=True, strategy=strategy, edits=scale), "unused")
    plain_fed = Federation(experiment(world, he=False, strategy=strategy), "unused")
    start = initial(he_fed)
    a = he_fed.train_round(LocalGrid(world), 1, start)
    b = plain_fed.train_round(LocalGrid(world), 1, start)
    assert np.max(np.abs(flat(a) - flat(b))) < 1e-4


def test_dp_noise_is_in_the_update_before_encryption(world, stub_mlflow):
    dp_table = "[privacy.dp]\nenabled = true\nnoise_multiplier = 1.0\ndelta = 1e-3\n\n"
    dp = {"[privacy.he]": dp_table + "[privacy.he]"}
    name = f"dp-{uuid.uuid4().hex[:6]}"  # the sites derive their DP noise from the experiment
    he_fed = Federation(experiment(world, he=True, edits=dp, name=name), "unused")
    plain_fed = Federation(experiment(world, he=False, edits=dp, name=name), "unused")
    start = initial(he_fed)
    with_he = he_fed.train_round(LocalGrid(world), 1, start)
    without_he = plain_fed.train_round(LocalGrid(world), 1, start)
    no_dp = Federation(experiment(world, he=False), "unused").train_round(
        LocalGrid(world), 1, start
    )
    # The spec (with its HE parameters) seeds the sites' DP noise, so the two DP runs draw
    # different noise: each is far from the noiseless update, and from each other.
    assert np.max(np.abs(flat(with_he) - flat(no_dp))) > 1e-3
    assert np.max(np.abs(flat(without_he) - flat(no_dp))) > 1e-3
    assert np.max(np.abs(flat(with_he) - flat(without_he))) > 1e-3


# --------------------------------------------------------------------------- bad contributions


def _tamper(reply: Message) -> Message:
    chunks, c = contribution_of(reply)
    bad = bytearray(chunks[0])
    bad[len(bad) // 2] ^= 0x01
    return with_contribution(reply, [bytes(bad), *chunks[1:]], c)


def _unsigned(reply: Message) -> Message:
    chunks, c = contribution_of(reply)
    return with_contribution(reply, chunks, dataclasses.replace(c, signature=b""))


def _wrongly_signed(reply: Message) -> Message:
    chunks, c = contribution_of(reply)
    forged = sign(generate_identity(c.site), c.signed_bytes())
    return with_contribution(reply, chunks, dataclasses.replace(c, signature=forged))


def _plaintext(reply: Message) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}),
            "metrics": reply.content["metrics"],
            "site": reply.content["site"],
        }
    )
    return Message(content=content, metadata=reply.metadata)


@pytest.mark.parametrize(
    ("attack", "says"),
    [
        (_tamper, "do not match the signed digest"),
        (_unsigned, "is unsigned"),
        (_wrongly_signed, "invalid signature"),
        (_plaintext, "plaintext weights are not accepted"),
    ],
)
def test_bad_contribution_is_refused_and_the_round_goes_on_without_it(
    world, stub_mlflow, attack, says
):
    cfg = experiment(world)
    fed = Federation(cfg, "unused")
    grid = LocalGrid(
        world, on_reply=lambda s, m: attack(m) if s == "gamma" and is_training_reply(m) else m
    )
    start = initial(fed)
    got = fed.train_round(grid, 1, start)
    assert [(r.site, r.rule) for r in fed.refusals] == [("gamma", "he-contribution")]
    assert says in fed.refusals[0].message and "round 1" in fed.refusals[0].message
    # The aggregate is exactly the one of the two honest sites.
    plain = Federation(experiment(world, he=False), "unused")
    want = plain.train_round(LocalGrid(world, sites=("alpha", "beta")), 1, start)
    assert np.max(np.abs(flat(got) - flat(want))) < 5e-5  # CKKS precision, 2 sites' weight
    assert fed.recorder.metrics[1]["he/refused_contributions"] == 1


def test_duplicated_and_borrowed_contributions_are_refused(world, stub_mlflow):
    fed = Federation(experiment(world), "unused")
    seen: dict[str, Message] = {}

    def relay(site: str, reply: Message) -> Message:
        if not is_training_reply(reply):
            return reply
        seen[site] = reply
        if site == "gamma":  # gamma resends alpha's contribution as alpha's (a duplicate)
            chunks, c = contribution_of(seen["alpha"])
            return with_contribution(reply, chunks, c, site="alpha")
        return reply

    fed.train_round(LocalGrid(world, on_reply=relay), 1, initial(fed))
    assert fed.refusals[0].site == "alpha" and "duplicate" in fed.refusals[0].message

    fed = Federation(experiment(world), "unused")
    seen.clear()

    def borrow(site: str, reply: Message) -> Message:
        if not is_training_reply(reply):
            return reply
        seen[site] = reply
        if site == "gamma":  # gamma passes alpha's signed contribution off as its own
            return with_contribution(reply, *contribution_of(seen["alpha"]))
        return reply

    fed.train_round(LocalGrid(world, on_reply=borrow), 1, initial(fed))
    assert fed.refusals[0].site == "gamma" and "signed as site 'alpha'" in fed.refusals[0].message


def test_replays_from_an_earlier_round_or_another_experiment_are_refused(world, stub_mlflow):
    old_run = Federation(experiment(world), "unused")
    old: dict[str, Message] = {}
    grid = LocalGrid(world, on_reply=capture(old))
    old_run.train_round(grid, 1, initial(old_run))

    fed = Federation(experiment(world), "unused")
    round1: dict[str, Message] = {}
    arrays = fed.train_round(LocalGrid(world, on_reply=capture(round1)), 1, initial(fed))

    def replay(site: str, reply: Message) -> Message:
        if not is_training_reply(reply):
            return reply
        if site == "beta":
            return with_contribution(reply, *contribution_of(round1["beta"]))
        if site == "gamma":
            return with_contribution(reply, *contribution_of(old["gamma"]))
        return reply

    with pytest.raises(FederationError, match="only 1 site"):
        fed.train_round(LocalGrid(world, on_reply=replay), 2, arrays)
    refusals = {r.site: r.message for r in fed.refusals}
    assert "is a replay" in refusals["beta"] and "round 1" in refusals["beta"]
    assert (
        "is a replay" in refusals["gamma"]
        and old_run.encryption.experiment_id in (refusals["gamma"])
    )


def test_ciphertext_under_another_key_stops_the_round_cleanly(world, stub_mlflow, tmp_path):
    init_consortium(tmp_path / "other", SITES, "beta")
    other = load_site_keys(tmp_path / "other", "gamma")
    fed = Federation(experiment(world, edits=NO_COHORT), "unused")

    def rekey(site: str, reply: Message) -> Message:
        if site != "gamma" or not is_training_reply(reply):
            return reply
        # gamma's real identity signs, but the ciphertext is under another consortium's key.
        own = load_site_keys(world / "consortium", "gamma", ledger_path=tmp_path / "l.json")
        keys = dataclasses.replace(own, secret_context=other.secret_context, tag_key=other.tag_key)
        _, c = contribution_of(reply)
        he = fed.encryption.round
        chunks, c2 = make_contribution(
            np.zeros(c.n_values),
            72.0,
            keys,
            experiment_id=he.experiment_id,
            round=1,
            nonce=he.nonce,
            spec_digest=fed.spec.digest(),
            global_model=fed.encryption.announcement().model_hash,
            weight_key=he.weight_key,
            min_sites=he.min_sites,
        )
        return with_contribution(reply, chunks, c2)

    ledgers = {s: world / "workspace" / "sites" / s / "he-ledger.json" for s in SITES}
    before = {s: json.loads(p.read_text()) for s, p in ledgers.items() if p.is_file()}
    with pytest.raises(FederationError, match="decryption quorum failed: 0 of 2"):
        fed.train_round(LocalGrid(world, on_reply=rekey), 1, initial(fed))
    assert {r.rule for r in fed.refusals} == {"he-decrypt-request"}
    assert all("membership-tag check failed" in r.message for r in fed.refusals)
    # Nothing stored is lost: every site's ledger keeps its earlier rounds; the two asked
    # sites recorded this round as locked (they will decrypt nothing more for it).
    this_round = SiteLedger.key(fed.encryption.experiment_id, 1)
    after = {s: json.loads(p.read_text()) for s, p in ledgers.items()}
    for s, old in before.items():
        assert set(old["contributed"]) <= set(after[s]["contributed"])
    assert sum(this_round in a["locked"] for a in after.values()) == 2


# ------------------------------------------------------------------------ bad decryption requests


def _contributed_round(world: Path, grid: LocalGrid, fed: Federation, round_: int):
    """Run a round's training only: the sites contribute; nothing is decrypted yet."""
    arrays = initial(fed)
    config = fed._config(round_)
    fed.encryption.announce(round_, arrays, config)
    msgs = fed.strategy.configure_train(round_, arrays, config, grid)
    ok = fed._split(round_, fed.receive(grid, round_, msgs))
    raw = {s: contribution_of(m) for s, m in grid.log if CONTRIBUTION_RECORD in m.content}
    return ok, raw


def _ask(grid: LocalGrid, site: str, request: DecryptionRequest) -> Message:
    msg = Message(
        RecordDict({REQUEST_RECORD: request_record(request), "config": ConfigRecord({})}),
        dst_node_id=grid.node(site),
        message_type=DECRYPT_MESSAGE_TYPE,
    )
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return _site_reply(msg, grid.context(grid.node(site)))


def _summed(fed: Federation, raw, sites) -> list[bytes]:
    """What a (malicious) coordinator can compute: the sum of any sites' ciphertexts."""
    ctx = fed.encryption.keys.public_context
    acc = [ctx.load(b) for b in raw[sites[0]][0]]
    for s in sites[1:]:
        for a, b in zip(acc, raw[s][0], strict=True):
            ctx.add_inplace(a, ctx.load(b))
    return [ctx.dump(a) for a in acc]


def _refusal(reply: Message) -> dict:
    assert reply.has_error(), "the site decrypted a forged request"
    return json.loads(reply.error.reason)


def test_sites_refuse_every_forged_decryption_request(world, stub_mlflow):
    fed = Federation(experiment(world, edits=NO_COHORT), "unused")
    grid = LocalGrid(world)
    _, raw = _contributed_round(world, grid, fed, 1)
    he = fed.encryption.round
    c = {s: raw[s][1] for s in SITES}

    def request(claims, chunks, **binding):
        b = {"experiment_id": he.experiment_id, "round": 1, "nonce": he.nonce, **binding}
        return DecryptionRequest(b["experiment_id"], b["round"], b["nonce"], claims, chunks)

    cases = [
        # (asked site, request, words of the refusal)
        ("alpha", request([c["alpha"]], raw["alpha"][0]), "fewer than min_sites=2"),
        (
            "alpha",
            request([c["alpha"], c["alpha"], c["beta"]], _summed(fed, raw, ["alpha", "beta"])),
            "claimed twice",
        ),
        ("alpha", request([c["alpha"], c["beta"]], raw["beta"][0]), "membership-tag check failed"),
        (
            "beta",
            request([c["alpha"], c["beta"], c["gamma"]], _summed(fed, raw, ["alpha", "beta"])),
            "membership-tag check failed",
        ),
        (
            "gamma",
            request([c["alpha"], c["gamma"]], _summed(fed, raw, SITES)),
            "membership-tag check failed",
        ),
        (
            "alpha",
            request([c["alpha"], c["beta"]], raw["beta"][0], round=2),
            "did not contribute to that round",
        ),
        (
            "alpha",
            request([c["alpha"], c["beta"]], raw["beta"][0], experiment_id="other:run:x"),
            "did not contribute to that round",
        ),
    ]
    for site, req, words in cases:
        refusal = _refusal(_ask(grid, site, req))
        assert refusal["site"] == site and refusal["rule"] == "he-decrypt-request"
        assert words in refusal["message"], (words, refusal["message"])
    # A round in which a site refused a forged sum stays locked at that site.
    legit = request([c["alpha"], c["beta"], c["gamma"]], _summed(fed, raw, SITES))
    assert "refused a forged aggregate" in _refusal(_ask(grid, "alpha", legit))["message"]


def test_one_aggregate_per_round_and_identical_answers_to_a_quorum(world, stub_mlflow):
    fed = Federation(experiment(world, edits=NO_COHORT), "unused")
    grid = LocalGrid(world)
    _, raw = _contributed_round(world, grid, fed, 1)
    he = fed.encryption.round
    claims = [raw[s][1] for s in SITES]
    full = DecryptionRequest(he.experiment_id, 1, he.nonce, claims, _summed(fed, raw, SITES))
    answers = [_ask(grid, s, full) for s in ("alpha", "beta")]
    a, b = (m.content["he-aggregate"]["aggregate"].numpy() for m in answers)
    assert np.array_equal(a, b)
    again = _ask(grid, "alpha", full)  # the same request again: the same answer
    assert np.array_equal(again.content["he-aggregate"]["aggregate"].numpy(), a)
    subset = DecryptionRequest(
        he.experiment_id, 1, he.nonce, claims[:2], _summed(fed, raw, SITES[:2])
    )
    refusal = _refusal(_ask(grid, "alpha", subset))  # differencing: refused
    assert "second, different decryption request" in refusal["message"]


def test_a_forged_request_stops_the_round_cleanly(world, stub_mlflow):
    fed = Federation(experiment(world), "unused")
    seen: dict[str, Message] = {}

    def forge(site: str, msg: Message) -> Message:
        if msg.metadata.message_type != DECRYPT_MESSAGE_TYPE:
            return msg
        # The coordinator asks for the "sum" that is really only alpha's ciphertext.
        chunks, _ = contribution_of(seen["alpha"])
        record = msg.content[REQUEST_RECORD]
        record["sum_chunks"] = chunks
        return msg

    grid = LocalGrid(world, on_request=forge, on_reply=capture(seen))
    with pytest.raises(FederationError, match="decryption quorum failed: 0 of 2"):
        fed.train_round(grid, 1, initial(fed))
    assert {r.rule for r in fed.refusals} == {"he-decrypt-request"}


# --------------------------------------------------------------------------- configuration


def test_strategies_needing_individual_updates_are_refused_with_he(world):
    with pytest.raises(ConfigError, match="needs every site's individual update"):
        experiment(world, strategy='name = "krum"')
    experiment(world, he=False, strategy='name = "krum"')  # fine without HE
    custom = world / "median_like.py"
    custom.write_text(
        "from flwr.serverapp.strategy import FedAvg\n\n\n"
        "class MedianLike(FedAvg):\n"
        "    def aggregate_train(self, server_round, replies):\n"
        "        return super().aggregate_train(server_round, replies)\n"
    )
    cfg = experiment(world, strategy=f'name = "{custom}:MedianLike"')
    with pytest.raises(ConfigError, match="MedianLike needs every site's individual update"):
        build_strategy(cfg)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ({'keys_dir = "../consortium"': ""}, "privacy.he.*needs `keys_dir`"),
        ({"quorum = 2": "quorum = 3"}, "quorum is 3 but a round may have only min_sites = 2"),
        ({"min_sites = 2": "min_sites = 1"}, "min_sites >= 2"),
        ({"quorum = 2": "quorum = 2\nweight_scale = 0"}, "weight_scale.*greater than 0"),
    ],
)
def test_he_config_errors_name_the_key(world, edit, says):
    with pytest.raises(ConfigError, match=says):
        experiment(world, edits=edit)


def test_coordinator_refuses_a_context_holding_the_secret_key(world, tmp_path):
    shutil.copytree(world / "consortium" / "coordinator", tmp_path / "coordinator")
    # An operator copies a site's secret material to the coordinator by mistake.
    keys = load_site_keys(world / "consortium", "alpha", ledger_path=tmp_path / "l.json")
    secret = keys.secret_context.ts_context.serialize(save_secret_key=True)
    (tmp_path / "coordinator" / "he-public.ctx").write_bytes(secret)
    with pytest.raises(CryptoError, match="contains a CKKS secret key"):
        load_coordinator_keys(tmp_path)
    assert not load_coordinator_keys(world / "consortium").public_context.can_decrypt


def test_a_site_without_keys_refuses_an_encrypted_round(world, stub_mlflow, tmp_path):
    profile = (world / "sites" / "gamma.toml").read_text()
    (world / "sites" / "gamma.toml").write_text(profile.split("[keys]")[0])
    try:
        from fedhealth.site import client_app as ca

        fed = Federation(experiment(world), "unused")
        fed.train_round(LocalGrid(world), 1, initial(fed))
        assert [(r.site, r.rule) for r in fed.refusals] == [("gamma", "he-keys")]
        assert "no [keys] table" in fed.refusals[0].message
    finally:
        (world / "sites" / "gamma.toml").write_text(profile)
        ca._load_profile.cache_clear()


def test_demo_consortium_is_created_once_and_never_rekeyed(tmp_path):
    reg, created = ensure_consortium(tmp_path / "c", ["a", "b"], "a")
    again, created_again = ensure_consortium(tmp_path / "c", ["a", "b"], "a")
    assert created and not created_again and again.consortium_id == reg.consortium_id
    with pytest.raises(ConfigError, match="add-site"):
        ensure_consortium(tmp_path / "c", ["a", "b", "c"], "a")
    assert oct(os.stat(tmp_path / "c" / "sites" / "a" / "identity.pem").st_mode & 0o777) == "0o600"


# --------------------------------------------------------------------------- real simulations


def _relax_sites(folder: Path) -> None:
    """Let the quickstart's sites take part without DP (to compare encryption alone)."""
    import tomllib

    import tomli_w

    for path in folder.glob("*.toml"):
        doc = tomllib.loads(path.read_text())
        policy = doc.get("privacy", {})
        policy["require_dp"] = False
        for cap in (
            "min_noise_multiplier",
            "max_epsilon_per_experiment",
            "lifetime_epsilon_budget",
        ):
            policy.pop(cap, None)
        path.write_text(tomli_w.dumps(doc))


def _toggle(text: str, table: str, enabled: bool) -> str:
    """Set ``enabled`` of one ``[table]`` of an experiment TOML (other tables untouched)."""
    head, sep, rest = text.partition(f"[{table}]\n")
    if not sep:
        return text
    body, nxt, tail = rest.partition("\n[")
    lines = [ln for ln in body.splitlines() if not ln.startswith("enabled")]
    body = "\n".join([f"enabled = {str(enabled).lower()}", *lines])
    return head + sep + body + nxt + tail


@pytest.mark.slow
def test_simulated_federation_with_he_matches_plaintext_and_a_stopped_run_loses_nothing(
    tmp_path_factory, root, flower_identity
):
    """A real Flower simulation with HE (the quickstart, 2 rounds) against the plaintext run.

    The plaintext run of the same experiment and seed goes through the same ServerApp and
    ClientApp code in-process (``LocalGrid``), which is bit-for-bit what Flower's simulation
    computes and saves a second ~25 s simulation. Then a run whose decryption is forged
    stops cleanly and leaves everything already stored intact.
    """
    import mlflow
    from typer.testing import CliRunner

    from fedhealth.cli.main import app

    runner = CliRunner()
    work = tmp_path_factory.mktemp("he-sim")
    for folder in ("experiments", "sites", "strategies"):
        shutil.copytree(root / folder, work / folder)
    _relax_sites(work / "sites")
    roster = ("st-olav", "karolinska", "charite")  # the quickstart's order
    old = Path.cwd()
    os.chdir(work)
    try:
        result = runner.invoke(app, ["demo-data"])
        assert result.exit_code == 0, result.output
        text = (work / "experiments" / "quickstart.toml").read_text()
        # DP off to compare encryption alone: the sites' DP noise is derived from the global
        # weights they receive, so after round 1 it would differ between the two runs.
        text = _toggle(text.replace("rounds = 5", "rounds = 2"), "privacy.dp", False)
        he_exp, plain_exp = work / "experiments" / "he.toml", work / "experiments" / "plain.toml"
        he_exp.write_text(_toggle(text, "privacy.he", True))
        plain_exp.write_text(_toggle(text, "privacy.he", False))
        result = runner.invoke(app, ["run", str(he_exp)], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "encrypted aggregation on" in result.output
        uri = f"sqlite:///{work / 'workspace' / 'mlflow' / 'mlflow.db'}"
        Federation(load_experiment(plain_exp), uri).run(LocalGrid(work, roster=roster))

        # A run whose decryption request is forged stops cleanly.
        def forge(site: str, msg: Message) -> Message:
            if msg.metadata.message_type == DECRYPT_MESSAGE_TYPE:
                msg.content[REQUEST_RECORD]["round"] = 99
            return msg

        with pytest.raises(FederationError, match="decryption quorum failed"):
            Federation(load_experiment(he_exp), uri).run(
                LocalGrid(work, roster=roster, on_request=forge)
            )
    finally:
        os.chdir(old)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions("name='quickstart-breast-cancer'")
    assert sorted(int(v.version) for v in versions) == [1, 2]  # the stopped run added none
    he_v, plain_v = (client.get_model_version("quickstart-breast-cancer", v) for v in ("1", "2"))
    assert he_v.tags["he"] == "on" and "N=8192" in he_v.tags["he_params"]
    assert plain_v.tags["he"] == "off"
    assert "Encrypted aggregation" in he_v.description
    # Both versions load; their weights differ beyond CKKS precision now that sites seed
    # training with the run id (a second run is never a replay): the aggregate's precision is
    # checked in-process above, where both federations train alike.
    for v in (1, 2):
        mlflow.pyfunc.load_model(f"models:/quickstart-breast-cancer/{v}")
    run = client.get_run(he_v.run_id)
    assert run.data.params["he.poly_modulus_degree"] == "8192"
    per_param = client.get_metric_history(he_v.run_id, "he/bytes_per_param_per_site")
    assert len(per_param) == 2 and per_param[-1].value > 16
    exp = client.get_experiment_by_name("quickstart")
    statuses = [r.info.status for r in client.search_runs([exp.experiment_id])]
    assert sorted(statuses) == ["FAILED", "FINISHED", "FINISHED"]


def test_cohort_binding_blocks_cross_site_differencing(world, stub_mlflow):
    bind = {"quorum = 2": "quorum = 2\nbind_cohort = true"}
    fed = Federation(experiment(world, edits=bind), "unused")
    plain = Federation(experiment(world, he=False), "unused")
    start = initial(fed)
    got = fed.train_round(LocalGrid(world), 1, start)
    want = plain.train_round(LocalGrid(world), 1, start)
    assert np.max(np.abs(flat(got) - flat(want))) < 1e-5
    assert fed.encryption.round.cohort == tuple(sorted(SITES))

    # A coordinator asking one site for A+B+C and another for A+C would learn B by
    # difference; with the cohort signed, the subset request is refused.
    fed = Federation(experiment(world, edits=bind), "unused")
    grid = LocalGrid(world)
    _, raw = _contributed_round(world, grid, fed, 1)
    he = fed.encryption.round
    subset = DecryptionRequest(
        he.experiment_id,
        1,
        he.nonce,
        [raw["alpha"][1], raw["gamma"][1]],
        _summed(fed, raw, ["alpha", "gamma"]),
    )
    refusal = _refusal(_ask(grid, "gamma", subset))
    assert "not exactly the cohort the sites signed" in refusal["message"]

    # A drop-out (gamma's reply lost) leaves the cohort incomplete: the round is announced
    # again to alpha and beta (new cohort, fresh nonce), they contribute again, and the
    # aggregate is theirs.
    quick = {**bind, "min_sites = 2": "min_sites = 2\nround_timeout = 1"}
    fed = Federation(experiment(world, edits=quick), "unused")
    grid = LocalGrid(world, on_reply=lambda s, m: None if s == "gamma" else m)
    got = fed.train_round(grid, 1, start)
    assert fed.encryption.round.cohort == ("alpha", "beta")
    want = plain.train_round(LocalGrid(world, sites=("alpha", "beta")), 1, start)
    assert np.max(np.abs(flat(got) - flat(want))) < 5e-5
    # fewer than min_sites left: the round stops cleanly
    fed = Federation(experiment(world, edits=quick), "unused")
    grid = LocalGrid(world, on_reply=lambda s, m: None if s != "alpha" else m)
    with pytest.raises(FederationError):
        fed.train_round(grid, 1, initial(fed))


def test_a_site_requiring_he_trains_encrypted_rounds_and_refuses_plaintext(world, stub_mlflow):
    from fedhealth.site import client_app as ca

    path = world / "sites" / "gamma.toml"
    profile = path.read_text()
    path.write_text(profile.replace("[privacy]\n", "[privacy]\nrequire_he = true\n", 1))
    try:
        fed = Federation(experiment(world, he=True), "unused")
        fed.train_round(LocalGrid(world), 1, initial(fed))
        assert fed.refusals == []
        plain = Federation(experiment(world, he=False), "unused")
        plain.train_round(LocalGrid(world), 1, initial(plain))
        assert [(r.site, r.rule) for r in plain.refusals] == [("gamma", "require_he")]
    finally:
        path.write_text(profile)
        ca._load_profile.cache_clear()


def test_a_round_the_site_would_not_seal_costs_it_no_epsilon(world, stub_mlflow):
    """A second run of the same experiment from the same global model (a new experiment id)
    is refused under the HE rule ``he-one-contribution-per-model``; the sites refuse before
    training, so the DP ledger holds no charge for the refused round (a hostile coordinator
    cannot drain a site's budget with rounds it will never seal)."""
    from fedhealth.config.site import load_site
    from fedhealth.privacy.dp.ledger import PrivacyLedger

    dp_table = "[privacy.dp]\nenabled = true\nnoise_multiplier = 1.0\ndelta = 1e-3\n\n"
    dp = {"[privacy.he]": dp_table + "[privacy.he]"}
    name = f"drain-{uuid.uuid4().hex[:6]}"
    first = Federation(experiment(world, he=True, edits=dp, name=name), "unused")
    start = initial(first)
    first.train_round(LocalGrid(world), 1, start)
    assert first.refusals == []

    def charges() -> dict[str, int]:
        out = {}
        for s in SITES:
            with PrivacyLedger(load_site(world / "sites" / f"{s}.toml").ledger_path) as led:
                out[s] = sum(1 for e in led.entries("breast-cancer") if e.experiment == name)
        return out

    before = charges()
    assert all(n >= 1 for n in before.values()), before
    second = Federation(experiment(world, he=True, edits=dp, name=name), "unused")
    with pytest.raises(FederationError):
        second.train_round(LocalGrid(world), 1, start)
    assert {r.rule for r in second.refusals} == {"he-one-contribution-per-model"}, [
        (r.site, r.rule, r.message) for r in second.refusals
    ]
    assert charges() == before
