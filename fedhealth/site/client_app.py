"""The site runtime as a Flower ClientApp: ``fedhealth.site.client_app:app``.

A site learns who it is from its node config (``profile = "path/to/site.toml"``,
as a SuperNode is started in a real deployment) or, in simulation, from the
run config's list of site profiles indexed by the node's partition id.

The request's config is parsed once (:class:`~fedhealth.site.request.SiteRequest`, by the
audit decorator) and the same object flows to the runtime and the encrypted reply. A
refusal, a data problem or a malformed request (the field named) is answered with an error
reply carrying a :class:`~fedhealth.protocol.Refusal`: the coordinator reports it and
carries on with the other sites; the site process never crashes on bad input.

This module imports only Flower, the site profile and the audit log; each handler imports
what its message needs, timed as its ``import`` phase in the audit log: torch and the
dataset's reader for training, evaluation and statistics, Opacus only when the experiment
uses DP, TenSEAL only for an encrypted round or a decryption query. A deployed site's app
process (``fedhealth.deploy.site_exec``) imports all of that once at its start and then
serves every message, so there the phase is empty; a simulated site's worker imports on
first use. The site never imports MLflow.
"""

from __future__ import annotations

import importlib
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedhealth import settings
from fedhealth.catalogue import READERS
from fedhealth.config.site import SiteProfile, load_site
from fedhealth.envelope import envelope_mod
from fedhealth.errors import ConfigError, DataError, FedHealthError, PolicyError
from fedhealth.protocol import (
    REFUSAL_CODE,
    AnalysisKey,
    HEKey,
    MessageKind,
    Metric,
    ProtocolError,
    Record,
    Refusal,
    SiteKey,
    StatsKey,
    StudyKey,
    ValidationKey,
)
from fedhealth.site.approvals import admit_analysis, admit_study, check_round
from fedhealth.site.audit import audited, record_refusal
from fedhealth.site.refusals import DATA_RULE, public_message
from fedhealth.site.request import AnalysisRequest, SiteRequest
from fedhealth.site.timing import phase

if TYPE_CHECKING:
    from fedhealth.site.runtime import SiteRuntime


def _refuse_unopened(msg: Message, context: Context, exc: ProtocolError) -> Message:
    """The refusal of a request whose sealed content does not open, audited."""
    try:
        site, workspace = _audit_site(context)
    except Exception:  # noqa: BLE001 - a bad profile: refuse unaudited, as the handlers do
        site, workspace = "?", None
    reply = _refuse(msg, site, exc)
    if workspace is not None:
        record_refusal(workspace, site, msg, Refusal.decode(reply.error.reason, node=site))
    return reply


def _envelope(msg: Message, context: Context, call_next: Any) -> Message:
    return envelope_mod(msg, context, call_next, refuse=_refuse_unopened)


# Every request's sealed content is opened before its handler runs, and every reply's
# content sealed after (fedhealth.envelope): fewer objects for Flower to move.
app = ClientApp(mods=[_envelope])

SIM_ROSTER_ENV = settings.SIM_SITE_PROFILES.name  # set by the simulation engine


@lru_cache(maxsize=64)
def _load_profile(path: str, stamp: tuple[int, int]) -> SiteProfile:
    return load_site(Path(path))


def _profile(path: str) -> SiteProfile:
    """The site profile at ``path``, read again whenever the file changes (a deployed
    site's app process serves every message: an operator's edit applies to the next one)."""
    try:
        st = Path(path).stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (0, 0)  # load_site names the missing file
    return _load_profile(path, stamp)


def site_profile(context: Context) -> tuple[SiteProfile, int]:
    """The profile of the site this ClientApp runs for, and its index in the consortium."""
    path = context.node_config.get("profile")
    if path:
        return _profile(str(path)), int(context.node_config.get("site-index", 0))
    roster = context.run_config.get("site-profiles") or settings.SIM_SITE_PROFILES.get()
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


def _refuse(msg: Message, site: str, exc: Exception, round_: int = 0) -> Message:
    """The error reply of a refusal: ``exc.rule`` (or the error's type) names the check."""
    rule = getattr(exc, "rule", None) or (
        DATA_RULE if isinstance(exc, DataError) else type(exc).__name__
    )
    # The rule and a value-free message only: a data error's rows and values stay at the site.
    refusal = Refusal(site=site, rule=str(rule), message=public_message(site, exc), round=round_)
    return Message(Error(code=REFUSAL_CODE, reason=refusal.encode()), reply_to=msg)


def _arrays(msg: Message) -> dict:
    with phase("serialise"):
        record = cast("ArrayRecord | None", msg.content.get(Record.ARRAYS))
        if record is None:
            raise ProtocolError("the request carries no global model (`arrays` record)")
        return {k: v.numpy() for k, v in record.items()}


def modules_for(profile: SiteProfile, request: SiteRequest, training: bool) -> list[str]:
    """The modules a train, evaluate or statistics request needs.

    Parameters
    ----------
    profile : SiteProfile
        The site's profile (which kind of dataset the task reads).
    request : SiteRequest
        The request (DP on, round encrypted).
    training : bool
        A training request (the others need neither Opacus nor TenSEAL).

    Returns
    -------
    list of str
        The site runtime (torch, the models, the data readers), the dataset's image
        reader, Opacus when a training request uses DP, and the encrypted-reply code
        (TenSEAL) when the round is encrypted.
    """
    mods = ["fedhealth.site.runtime"]
    source = profile.datasets.get(request.spec.task.dataset)
    if source is not None:
        mods += READERS.get(source.kind).imports  # what its reader imports beyond runtime
    if training and request.dp_enabled:
        mods.append("opacus")
    if training and request.he_enabled:
        mods.append("fedhealth.site.encrypted_reply")
    return mods


def _import(modules: list[str]) -> None:
    """Import ``modules`` (what this message needs), timed as the handler's imports."""
    with phase("import"):
        for name in modules:
            importlib.import_module(name)


def _admit(profile: SiteProfile, request: SiteRequest, training: bool) -> None:
    """The site's own gate, before it reads data, builds a model or spends ε: the study
    is approved here (fedhealth.site.approvals), an encrypted round announces the study's
    parameters, and the request fits the site's resource caps (fedhealth.site.limits)."""
    admit_study(profile, request.spec)
    if training:
        check_round(profile, request.spec, request.he)
    _import(modules_for(profile, request, training=training))
    from fedhealth.site.limits import check_spec

    check_spec(profile, request.spec, training=training)


def _site_record(profile: SiteProfile, runtime: SiteRuntime | None = None) -> ConfigRecord:
    record: dict = {SiteKey.NAME: profile.name}
    if runtime is not None and runtime.guard.grad_sample_mode:
        # Which per-sample-gradient path ran.
        record[SiteKey.DP_PATH] = runtime.guard.grad_sample_mode
    return ConfigRecord(record)


@app.train()
@audited(_audit_site, SiteRequest.from_message, _refuse)
def train(msg: Message, context: Context, request: SiteRequest) -> Message:
    """Train on local data from the global model; reply with the update and counts.

    With DP on, the round's ε is committed to the site's ledger inside
    ``SiteRuntime.train``, before this reply is built; a policy refusal is an
    error reply naming the rule.
    """
    profile, idx = site_profile(context)
    try:
        _admit(profile, request, training=True)
        from fedhealth.site.limits import check_global_model, check_local_steps
        from fedhealth.site.runtime import SiteRuntime

        runtime = SiteRuntime(profile, request)
        global_arrays = _arrays(msg)
        check_global_model(profile, global_arrays, request.round)  # before training or ε
        check_local_steps(profile, request.spec, runtime.data.n_train)
        if request.he is not None:
            from fedhealth.site.encrypted_reply import check_before_training

            # A round this site would not seal must not cost it ε: refuse before training.
            check_before_training(
                request.he,
                profile,
                experiment=request.experiment,
                round_=request.round,
                global_arrays=global_arrays,
                spec_digest=request.spec.digest(),
            )
        arrays, metrics = runtime.train(global_arrays, idx)
        sealed = None
        if request.he is not None:
            from fedhealth.site.encrypted_reply import seal_update

            # An encrypted round: the update leaves the site only as signed CKKS ciphertexts.
            with phase("encrypt"):
                sealed = seal_update(
                    request.he,
                    profile,
                    experiment=request.experiment,
                    round_=request.round,
                    global_arrays=global_arrays,
                    new_arrays=arrays,
                    metrics=metrics,
                    spec_digest=request.spec.digest(),
                )
    except (FedHealthError, PolicyError, ProtocolError) as exc:
        return _refuse(msg, profile.name, exc, request.round)
    with phase("serialise"):
        update = (
            {Record.HE_CONTRIBUTION: sealed}
            if sealed is not None
            else {Record.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()})}
        )
        content = RecordDict(
            {
                **update,
                Record.METRICS: MetricRecord(metrics),
                Record.SITE: _site_record(profile, runtime),
            }
        )
    return Message(content, reply_to=msg)


@app.evaluate()
@audited(_audit_site, SiteRequest.from_message, _refuse)
def evaluate(msg: Message, context: Context, request: SiteRequest) -> Message:
    """Evaluate the global model on the site's test split; reply with metrics only.

    In a run's final round the coordinator also asks for score histograms per class
    (``score-histograms``): counts only, exact or noised and charged as the site's policy
    releases metrics (``fedhealth.site.validation.final_histograms``), never a score.
    """
    profile, _ = site_profile(context)
    try:
        _admit(profile, request, training=False)
        from fedhealth.site.limits import check_global_model
        from fedhealth.site.runtime import SiteRuntime

        runtime = SiteRuntime(profile, request)
        global_arrays = _arrays(msg)
        check_global_model(profile, global_arrays, request.round)
        metrics = runtime.evaluate(global_arrays)
        released = None
        if request.score_histograms:
            from fedhealth.site.validation import final_histograms

            released = final_histograms(runtime, global_arrays, metrics)
    except (FedHealthError, ProtocolError) as exc:
        return _refuse(msg, profile.name, exc, request.round)
    with phase("serialise"):
        records: dict[str, Any] = {
            Record.METRICS: MetricRecord(metrics),
            Record.SITE: _site_record(profile),
        }
        if released is not None:
            records[Record.VALIDATION] = ConfigRecord({ValidationKey.RELEASE: json.dumps(released)})
        content = RecordDict(records)
    return Message(content, reply_to=msg)


@app.query()
@audited(_audit_site, SiteRequest.from_message, _refuse)
def query(msg: Message, context: Context, request: SiteRequest) -> Message:
    """Answer a statistics query: sizes and per-feature sums, never rows."""
    profile, _ = site_profile(context)
    try:
        _admit(profile, request, training=False)
        from fedhealth.site.runtime import SiteRuntime

        runtime = SiteRuntime(profile, request)
        with phase("load"):
            # Noisy sums charged to the ledger before the reply is built; the split sizes
            # (public, as every round's num-examples) but no label counts.
            stats = runtime.moments()
            counts = {"n-train": runtime.data.n_train}
    except (FedHealthError, ProtocolError) as exc:
        return _refuse(msg, profile.name, exc, request.round)
    with phase("serialise"):
        content = RecordDict(
            {
                Record.STATS: ConfigRecord(
                    {
                        StatsKey.MOMENTS: json.dumps(
                            {k: stats[k] for k in ("count", "sum", "sumsq")}
                        ),
                        StatsKey.DP: json.dumps(stats["dp"]),
                    }
                ),
                Record.METRICS: MetricRecord(
                    {**counts, Metric.EPSILON: float(stats["dp"]["epsilon"])}
                ),
                Record.SITE: _site_record(profile),
            }
        )
    return Message(content, reply_to=msg)


@app.query(MessageKind.DECRYPT_ACTION)
@audited(_audit_site)
def decrypt(msg: Message, context: Context) -> Message:
    """Decrypt the round's encrypted *sum* if every check passes; otherwise refuse.

    The coordinator sends the sum with the signed contributions it claims to contain
    (message type ``query.decrypt``); see ``fedhealth.site.encrypted_reply``.
    """
    profile, _ = site_profile(context)
    try:
        _import(["fedhealth.site.encrypted_reply"])
        from fedhealth.site.encrypted_reply import decrypt_aggregate

        with phase("decrypt"):
            aggregate, seconds = decrypt_aggregate(
                profile, msg.content.get(Record.HE_REQUEST), msg.content.get(Record.CONFIG)
            )
    except FedHealthError as exc:
        return _refuse(msg, profile.name, exc)
    with phase("serialise"):
        content = RecordDict(
            {
                Record.HE_ANSWER: ArrayRecord({HEKey.ANSWER_ARRAY: Array(aggregate)}),
                Record.METRICS: MetricRecord({Metric.HE_DECRYPT_SECONDS: seconds}),
                Record.SITE: _site_record(profile),
            }
        )
    return Message(content, reply_to=msg)


@app.query(MessageKind.IDENTIFY_ACTION)
def identify(msg: Message, context: Context) -> Message:
    """Say which site this node is (for encrypted rounds bound to a named cohort)."""
    profile, _ = site_profile(context)
    return Message(RecordDict({Record.SITE: _site_record(profile)}), reply_to=msg)


@app.query(MessageKind.STUDY_ACTION)
@audited(_audit_site, SiteRequest.from_message, _refuse)
def study(msg: Message, context: Context, request: SiteRequest) -> Message:
    """Say whether this site has approved the request's study (``query.study``).

    Approved: a reply with the study hash. Otherwise the refusal ``study-pending`` (the
    first time, the request is stored for the site operator) or ``study-declined``. Reads
    no data and spends nothing.
    """
    profile, _ = site_profile(context)
    try:
        digest = admit_study(profile, request.spec)
    except FedHealthError as exc:
        return _refuse(msg, profile.name, exc, request.round)
    record = ConfigRecord({StudyKey.HASH: digest, StudyKey.STATUS: "approved"})
    content = RecordDict({Record.STUDY: record, Record.SITE: _site_record(profile)})
    return Message(content, reply_to=msg)


@app.query(MessageKind.VALIDATE_ACTION)
@audited(_audit_site, SiteRequest.from_message, _refuse)
def validate(msg: Message, context: Context, request: SiteRequest) -> Message:
    """Evaluate a registered model for an evaluation-only study (``query.validate``).

    Admitted like any study; the reply holds score histograms per class and the number of
    records, never a prediction per patient (``fedhealth.site.validation``).
    """
    profile, _ = site_profile(context)
    try:
        _admit(profile, request, training=False)
        from fedhealth.site.limits import check_global_model
        from fedhealth.site.runtime import SiteRuntime
        from fedhealth.site.validation import validation_release

        arrays = _arrays(msg)
        check_global_model(profile, arrays, request.round)
        asked = cast(ConfigRecord, msg.content.get(Record.VALIDATION) or ConfigRecord())
        split = str(asked.get(ValidationKey.SPLIT, "test"))
        released, metrics = validation_release(SiteRuntime(profile, request), arrays, split)
    except (FedHealthError, PolicyError, ProtocolError) as exc:
        return _refuse(msg, profile.name, exc, request.round)
    with phase("serialise"):
        content = RecordDict(
            {
                Record.VALIDATION: ConfigRecord({ValidationKey.RELEASE: json.dumps(released)}),
                Record.METRICS: MetricRecord(cast(dict[str, MetricRecordValues], metrics)),
                Record.SITE: _site_record(profile),
            }
        )
    return Message(content, reply_to=msg)


@app.query(MessageKind.ANALYSIS_ACTION)
@audited(_audit_site, AnalysisRequest.from_message, _refuse)
def analysis(msg: Message, context: Context, request: AnalysisRequest) -> Message:
    """Answer a federated analysis (``query.analysis``) with noisy statistics, never rows.

    The spec is validated as a file would be, the analysis passes the study gate like a
    training study (a manual-approval site answers ``study-pending``), and
    ``fedhealth.analytics.site_queries.answer_analysis`` applies the site's policy, caps
    and minimum cell count and charges the ledger before any noisy number is built.
    """
    profile, _ = site_profile(context)
    try:
        _import(["fedhealth.analytics.site_queries"])
        from fedhealth.analytics.site_queries import answer_analysis, parse_spec

        spec = parse_spec(profile.name, request.spec)
        study_hash = admit_analysis(profile, spec)
        with phase("load"):
            release = answer_analysis(profile, spec)
    except FedHealthError as exc:
        return _refuse(msg, profile.name, exc)
    with phase("serialise"):
        record = {AnalysisKey.RELEASE: json.dumps(release), AnalysisKey.STUDY: study_hash}
        content = RecordDict(
            {
                Record.RELEASE: ConfigRecord(cast(dict[str, Any], record)),
                Record.METRICS: MetricRecord({Metric.EPSILON: float(release["epsilon"])}),
                Record.SITE: _site_record(profile),
            }
        )
    return Message(content, reply_to=msg)
