"""The site runtime as a Flower ClientApp: ``fedhealth.site.client_app:app``.

A site learns who it is from its node config (``profile = "path/to/site.toml"``,
as a SuperNode is started in a real deployment) or, in simulation, from the
run config's list of site profiles indexed by the node's partition id.

A refusal or a data problem is answered with an error reply whose reason is a
JSON object ``{"site", "rule", "message"}``: the coordinator reports it and
carries on with the other sites; the site process never crashes on bad input.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedhealth.config.site import SiteProfile, load_site
from fedhealth.deploy.audit import audited
from fedhealth.errors import ConfigError, FedHealthError, PolicyError
from fedhealth.privacy.he.wire import (
    ANSWER_ARRAY,
    ANSWER_RECORD,
    CONTRIBUTION_RECORD,
    DECRYPT_ACTION,
    IDENTIFY_ACTION,
    REQUEST_RECORD,
)
from fedhealth.site.encrypted_reply import decrypt_aggregate, seal_update
from fedhealth.site.runtime import RoundRequest, SiteRuntime

app = ClientApp()

SIM_ROSTER_ENV = "FEDHEALTH_SIM_SITE_PROFILES"  # set by the simulation engine
REFUSAL_CODE = 4100  # error code of a site's deliberate refusal (policy, data)


@lru_cache(maxsize=64)
def _profile(path: str) -> SiteProfile:
    return load_site(Path(path))


def site_profile(context: Context) -> tuple[SiteProfile, int]:
    """The profile of the site this ClientApp runs for, and its index in the consortium."""
    path = context.node_config.get("profile")
    if path:
        return _profile(str(path)), int(context.node_config.get("site-index", 0))
    roster = context.run_config.get("site-profiles") or os.environ.get(SIM_ROSTER_ENV)
    if not roster:
        raise ConfigError(
            "this node has no site profile: start it with --node-config 'profile=\"PATH\"'"
        )
    profiles = json.loads(str(roster))
    idx = int(context.node_config["partition-id"])
    return _profile(profiles[idx]), idx


def _audit_site(context: Context) -> tuple[str, Path]:
    """Name and workspace of this node's site, for its audit log."""
    profile, _ = site_profile(context)
    return profile.name, profile.workspace


def _refuse(msg: Message, site: str, exc: Exception) -> Message:
    rule = getattr(exc, "rule", type(exc).__name__)
    reason = json.dumps({"site": site, "rule": rule, "message": str(exc)})
    return Message(Error(code=REFUSAL_CODE, reason=reason), reply_to=msg)


def _arrays(msg: Message) -> dict:
    return {k: v.numpy() for k, v in msg.content["arrays"].items()}


def _site_record(profile: SiteProfile, runtime: SiteRuntime | None = None) -> ConfigRecord:
    record: dict = {"name": profile.name}
    if runtime is not None and runtime.guard.grad_sample_mode:
        record["dp-path"] = runtime.guard.grad_sample_mode  # which per-sample-gradient path ran
    return ConfigRecord(record)


@app.train()
@audited(_audit_site)
def train(msg: Message, context: Context) -> Message:
    """Train on local data from the global model; reply with the update and counts.

    With DP on, the round's ε is committed to the site's ledger inside
    ``SiteRuntime.train``, before this reply is built; a policy refusal is an
    error reply naming the rule.
    """
    profile, idx = site_profile(context)
    try:
        request = RoundRequest.from_config(dict(msg.content["config"]))
        runtime = SiteRuntime(profile, request)
        arrays, metrics = runtime.train(_arrays(msg), idx)
        # An encrypted round: the update leaves the site only as signed CKKS ciphertexts.
        sealed = seal_update(
            msg.content["config"],
            profile,
            experiment=request.experiment,
            round_=request.round,
            global_arrays=_arrays(msg),
            new_arrays=arrays,
            metrics=metrics,
        )
    except (FedHealthError, PolicyError) as exc:
        return _refuse(msg, profile.name, exc)
    update = (
        {CONTRIBUTION_RECORD: sealed}
        if sealed is not None
        else {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()})}
    )
    content = RecordDict(
        {
            **update,
            "metrics": MetricRecord(metrics),
            "site": _site_record(profile, runtime),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
@audited(_audit_site)
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's test split; reply with metrics only."""
    profile, _ = site_profile(context)
    try:
        request = RoundRequest.from_config(dict(msg.content["config"]))
        metrics = SiteRuntime(profile, request).evaluate(_arrays(msg))
    except FedHealthError as exc:
        return _refuse(msg, profile.name, exc)
    content = RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(profile)})
    return Message(content, reply_to=msg)


@app.query()
@audited(_audit_site)
def query(msg: Message, context: Context) -> Message:
    """Answer a statistics query: sizes and per-feature sums, never rows."""
    profile, _ = site_profile(context)
    try:
        request = RoundRequest.from_config(dict(msg.content["config"]))
        runtime = SiteRuntime(profile, request)
        stats = runtime.moments()
        counts = runtime.data.counts()
    except FedHealthError as exc:
        return _refuse(msg, profile.name, exc)
    content = RecordDict(
        {
            "stats": ConfigRecord({"moments": json.dumps(stats)}),
            "metrics": MetricRecord(counts),
            "site": _site_record(profile),
        }
    )
    return Message(content, reply_to=msg)


@app.query(DECRYPT_ACTION)
@audited(_audit_site)
def decrypt(msg: Message, context: Context) -> Message:
    """Decrypt the round's encrypted *sum* if every check passes; otherwise refuse.

    The coordinator sends the sum with the signed contributions it claims to contain
    (message type ``query.decrypt``); see ``fedhealth.site.encrypted_reply``.
    """
    profile, _ = site_profile(context)
    try:
        aggregate, seconds = decrypt_aggregate(
            profile, msg.content.get(REQUEST_RECORD), msg.content.get("config")
        )
    except FedHealthError as exc:
        return _refuse(msg, profile.name, exc)
    content = RecordDict(
        {
            ANSWER_RECORD: ArrayRecord({ANSWER_ARRAY: Array(aggregate)}),
            "metrics": MetricRecord({"he-decrypt-seconds": seconds}),
            "site": _site_record(profile),
        }
    )
    return Message(content, reply_to=msg)


@app.query(IDENTIFY_ACTION)
def identify(msg: Message, context: Context) -> Message:
    """Say which site this node is (for encrypted rounds bound to a named cohort)."""
    profile, _ = site_profile(context)
    return Message(RecordDict({"site": _site_record(profile)}), reply_to=msg)
