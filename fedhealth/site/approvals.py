"""Study approvals at a site: pending requests, signed decisions, and the gate every request passes.

A study is identified by :func:`fedhealth.study.study_hash`. The site's policy
(``[privacy] approval``) either pre-approves studies (``"rules"``: the policy's rules
decide round by round, as before; or a hash pinned in ``approved_studies``) or holds an
unknown study for a person (``"manual"``): its first request writes a *pending request*
(everything the study asks for, in words a person can check) into the site's store and
is refused with rule ``study-pending``. The operator then decides with
``fedhealth site approve|deny PROFILE STUDY_HASH`` (or the site console, issue 13):
:func:`decide` signs the decision with the site's Ed25519 key and writes it to the store
and the site's audit log. A decision whose signature does not verify with the site's own
key counts as no decision. The coordinator only ever learns ``study-pending`` or
``study-declined``, never why.

The store is a folder ``<workspace>/studies/``: ``<hash>.request.json`` (created once,
atomically, never overwritten) and ``<hash>.decision.json`` (replaced atomically by each
decision). Everything here is a plain function of a :class:`SiteProfile`, for the CLI,
the ClientApp and a web console alike.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fedhealth.config.site import SiteProfile
from fedhealth.errors import ConfigError, CryptoError, FedHealthError, PolicyError
from fedhealth.jsonlines import append
from fedhealth.protocol import HERound, TaskSpec
from fedhealth.study import (
    analysis_study_document,
    analysis_study_hash,
    columns_read,
    normalise_hash,
    study_document,
    study_hash,
)

if TYPE_CHECKING:
    from fedhealth.config.analysis import AnalysisSpec

__all__ = [
    "APPROVAL_KEY",
    "STUDIES_DIR",
    "Decision",
    "StudyRefused",
    "StudyStatus",
    "admit_analysis",
    "admit_study",
    "check_round",
    "decide",
    "describe_analysis",
    "describe_spec",
    "list_studies",
    "resolve_study",
    "signing_identity",
    "study_status",
]

STUDIES_DIR = "studies"
APPROVAL_KEY = "approval-key.pem"  # the site's signing key when its profile has no [keys]
_PURPOSE = "fedhealth/study-decision/v1"

Verdict = Literal["approved", "declined"]
StudyStatus = Literal["approved", "declined", "pending", "unknown"]


class StudyRefused(PolicyError):
    """A request refused by the study gate; ``rule`` is ``study-pending``,
    ``study-declined`` or ``study-mismatch``."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


# -- the store ---------------------------------------------------------------------------------


def _studies(profile: SiteProfile) -> Path:
    return profile.workspace / STUDIES_DIR


def _request_path(profile: SiteProfile, study: str) -> Path:
    return _studies(profile) / f"{study}.request.json"


def _decision_path(profile: SiteProfile, study: str) -> Path:
    return _studies(profile) / f"{study}.decision.json"


def _tmp(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def _create_once(path: Path, data: dict[str, Any]) -> bool:
    """Write ``path`` atomically unless it exists; True if this call created it."""
    tmp = _tmp(path, data)
    try:
        os.link(tmp, path)  # atomic, and fails if another process created it first
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _replace(path: Path, data: dict[str, Any]) -> None:
    os.replace(_tmp(path, data), path)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- signed decisions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """A person's signed decision on one study.

    Attributes
    ----------
    study : str
        The study hash (64 hex digits).
    site : str
        The deciding site.
    decision : {"approved", "declined"}
    by : str
        Who decided (``--by``, default the operating-system user).
    at : str
        When (ISO 8601, UTC).
    signer : str
        The site's Ed25519 public key (base64).
    signature : str
        Ed25519 signature (base64) over :meth:`signed_bytes`.
    """

    study: str
    site: str
    decision: Verdict
    by: str
    at: str
    signer: str = ""
    signature: str = ""

    def signed_bytes(self) -> bytes:
        """Canonical JSON of purpose, study, site, decision, who and when."""
        body = {
            "purpose": _PURPOSE,
            "study": self.study,
            "site": self.site,
            "decision": self.decision,
            "by": self.by,
            "at": self.at,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def signing_identity(profile: SiteProfile, *, create: bool = False):
    """The site's signing key: ``[keys] identity``, else ``<workspace>/approval-key.pem``.

    Parameters
    ----------
    profile : SiteProfile
    create : bool
        Create the workspace key (mode 0600) if the profile has no ``[keys]`` and none
        exists yet.

    Returns
    -------
    SiteIdentity or None
        None if there is no key and ``create`` is false.
    """
    from fedhealth.privacy.he.keys import generate_identity, load_private

    if profile.keys is not None:
        return load_private(profile.keys.identity, site=profile.name)
    path = profile.workspace / APPROVAL_KEY
    if path.is_file():
        return load_private(path, site=profile.name)
    if not create:
        return None
    identity = generate_identity(profile.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    identity.save_private(path)
    return identity


def _verified(profile: SiteProfile, study: str) -> tuple[Decision | None, str]:
    """The study's decision if its signature verifies with the site's key; else why not."""
    from fedhealth.privacy.he.keys import b64d, b64e, verify

    data = _load(_decision_path(profile, study))
    if data is None:
        return None, "no decision" if not _decision_path(profile, study).exists() else "unreadable"
    try:
        decision = Decision(**{k: str(data[k]) for k in Decision.__dataclass_fields__})  # type: ignore[arg-type]
    except (KeyError, TypeError):
        return None, "malformed decision file"
    if decision.study != study or decision.site != profile.name:
        return None, "decision for another study or site"
    if decision.decision not in ("approved", "declined"):
        return None, "unknown decision"
    try:
        identity = signing_identity(profile)
        if identity is None:
            return None, "the site has no signing key"
        if decision.signer != b64e(identity.signing_public):
            return None, "signed by a key that is not the site's"
        verify(
            identity.signing_public,
            decision.signed_bytes(),
            b64d(decision.signature, what="decision signature"),
            what=f"decision on study {study}",
        )
    except CryptoError as exc:
        return None, str(exc)
    return decision, ""


def study_status(profile: SiteProfile, study: str) -> tuple[StudyStatus, Decision | None]:
    """Where a study stands at the site.

    A signed decision counts first (a decline beats a pinned hash); then a hash pinned in
    ``approved_studies``; then ``approval = "rules"`` approves; else the study is pending
    (a request is stored) or unknown.

    Returns
    -------
    (status, decision)
        The decision is the verified one, if any.
    """
    decision, _ = _verified(profile, study)
    if decision is not None and decision.decision == "declined":
        return "declined", decision
    if decision is not None or study in profile.privacy.approved_studies:
        return "approved", decision
    if profile.privacy.approval == "rules":
        return "approved", None
    return ("pending" if _request_path(profile, study).exists() else "unknown"), None


def _audit(profile: SiteProfile, record: dict[str, Any]) -> None:
    from fedhealth.site.audit import audit_path

    append(audit_path(profile.workspace), {"ts": time.time(), "site": profile.name, **record})


def resolve_study(profile: SiteProfile, text: str) -> str:
    """A full study hash from what a person typed: the hash, or a unique prefix (8+ digits)
    of a study the site has seen.

    Raises
    ------
    ConfigError
        Not a hash, or a prefix that matches no or several studies.
    """
    text = normalise_hash(text)
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text
    if len(text) < 8 or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(
            f"{text!r} is not a study hash: give the 64 hex digits, or at least 8 of its first "
            "digits, as `fedhealth site requests PROFILE` lists them"
        )
    known = sorted({r["study"] for r in list_studies(profile) if r["study"].startswith(text)})
    if len(known) != 1:
        raise ConfigError(
            f"study {text!r}: {'no' if not known else len(known)} known studies of site "
            f"{profile.name!r} start with it; run `fedhealth site requests PROFILE`"
        )
    return known[0]


def decide(profile: SiteProfile, study: str, verdict: Verdict, by: str | None = None) -> Decision:
    """Approve or decline a study: sign the decision, store it, log it in the audit log.

    Parameters
    ----------
    profile : SiteProfile
    study : str
        The study hash, or a unique prefix of a known one (:func:`resolve_study`).
    verdict : {"approved", "declined"}
    by : str, optional
        Who decides (default: the operating-system user).

    Returns
    -------
    Decision
    """
    from fedhealth.privacy.he.keys import b64e, sign

    if verdict not in ("approved", "declined"):
        raise ConfigError(f"a decision is 'approved' or 'declined', not {verdict!r}")
    study = resolve_study(profile, study)
    identity = signing_identity(profile, create=True)
    unsigned = Decision(
        study=study,
        site=profile.name,
        decision=verdict,
        by=(by or getpass.getuser()).strip() or "unknown",
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        signer=b64e(identity.signing_public),
    )
    signature = b64e(sign(identity, unsigned.signed_bytes()))
    decision = Decision(**{**asdict(unsigned), "signature": signature})
    _replace(_decision_path(profile, study), asdict(decision))
    request = _load(_request_path(profile, study)) or {}
    _audit(
        profile,
        {
            "event": f"study-{verdict}",
            "study": study,
            "experiment": request.get("experiment"),
            "by": decision.by,
            "at": decision.at,
            "signer": decision.signer,
            "signature": signature,
        },
    )
    return decision


def list_studies(profile: SiteProfile) -> list[dict[str, Any]]:
    """Every study the site has seen or decided, newest first, with its status.

    Returns
    -------
    list of dict
        The stored request (``study``, ``experiment``, ``first_seen``, ``asks``: the
        human-readable summary of :func:`describe_spec`) plus ``status`` and
        ``decision`` (the verified decision as a dict, or None) and ``decision_problem``
        (why a decision file present did not count, else "").
    """
    folder = _studies(profile)
    names = {
        p.name.split(".", 1)[0]
        for p in (folder.glob("*.json") if folder.is_dir() else [])
        if not p.name.startswith(".")
    }
    out = []
    for study in names:
        record = _load(_request_path(profile, study)) or {"study": study}
        status, decision = study_status(profile, study)
        _, problem = _verified(profile, study)
        present = _decision_path(profile, study).exists()
        record.update(
            study=study,
            status=status,
            decision=asdict(decision) if decision else None,
            decision_problem=problem if present and decision is None else "",
        )
        out.append(record)
    return sorted(out, key=lambda r: r.get("first_seen", 0), reverse=True)


# -- what a study asks for ---------------------------------------------------------------------


def _projection(profile: SiteProfile, spec: TaskSpec) -> dict[str, Any]:
    """The ε the study would spend at this site if it ran every planned round, and the caps.

    Reads the site's own data (record count) and ledger; stays at the site.
    """
    policy = profile.privacy
    caps = {
        "max_epsilon_per_experiment": policy.max_epsilon_per_experiment,
        "lifetime_epsilon_budget": policy.lifetime_epsilon_budget,
    }
    if not spec.dp.enabled:
        return {"dp": "off", "epsilon": "unbounded (no differential privacy)", **caps}
    out: dict[str, Any] = {"dp": spec.dp.mode, "delta": spec.dp.delta, **caps}
    try:
        from fedhealth.privacy.dp.plan import plan_for_site
        from fedhealth.site.dataset import load_site_data

        n_train = load_site_data(profile, spec.task).n_train
        plan = plan_for_site(spec.dp, spec.training, spec.rounds, n_train, profile.name)
        out.update(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.planned_steps,
            epsilon=plan.planned_epsilon(),
        )
        if profile.ledger_path.is_file():
            from fedhealth.privacy.dp.ledger import PrivacyLedger

            with PrivacyLedger(profile.ledger_path) as ledger:
                ds = spec.task.dataset
                out["spent_on_dataset"] = ledger.spent(ds, "record") + ledger.spent(ds, "site")
    except (FedHealthError, OSError, TypeError, ValueError) as exc:
        out["epsilon"] = f"not projected: {exc}"
    return out


def describe_spec(spec: TaskSpec) -> dict[str, Any]:
    """What a study asks of a site, as a person reads it (no site data in it).

    Returns
    -------
    dict
        ``experiment``, ``dataset``, ``columns``, ``model`` (name and options),
        ``training``, ``strategy`` (name, code SHA-256, options), ``dp``, ``he``,
        ``rounds``, ``seed``, ``task`` (split, normalisation), ``fedhealth_version``.
    """
    doc = study_document(spec)
    return {
        "experiment": spec.experiment,
        "dataset": spec.task.dataset,
        "columns": columns_read(spec),
        "model": {"name": spec.model.name, **spec.model.options()},
        "training": spec.training.model_dump(mode="json"),
        "strategy": doc["strategy"] or {"name": "(not declared by the coordinator)"},
        "dp": spec.dp.model_dump(mode="json", exclude_none=True),
        "he": spec.he.model_dump(mode="json") if spec.he is not None else "off",
        "rounds": spec.rounds,
        "seed": spec.seed,
        "task": spec.task.model_dump(mode="json", exclude={"schema_"}),
        "fedhealth_version": doc["fedhealth_version"],
    }


# -- the gate ----------------------------------------------------------------------------------


def _hold(profile: SiteProfile, spec: TaskSpec, study: str) -> None:
    """Store the pending request of a study seen for the first time (once)."""
    record = {
        "study": study,
        "site": profile.name,
        "experiment": spec.experiment,
        "first_seen": time.time(),
        "asks": describe_spec(spec),
        "privacy": _projection(profile, spec),
        "document": study_document(spec),
        "spec": json.loads(spec.canonical_bytes()),
    }
    if _create_once(_request_path(profile, study), record):
        _audit(profile, {"event": "study-requested", "study": study, "experiment": spec.experiment})


def _gate(profile: SiteProfile, study: str, experiment: str, hold) -> str:
    """Approved: the study hash. Declined or pending: :class:`StudyRefused` (``hold()``
    stores the request the first time a study is seen)."""
    status, _ = study_status(profile, study)
    if status == "approved":
        return study
    if status == "declined":
        raise StudyRefused(
            f"site {profile.name!r} declined study {study} (experiment {experiment!r})",
            rule="study-declined",
        )
    if status == "unknown":
        hold()
    raise StudyRefused(
        f"site {profile.name!r} has not approved study {study} (experiment "
        f"{experiment!r}) yet: its operator reviews it with `fedhealth site requests` "
        "and decides with `fedhealth site approve` or `deny`",
        rule="study-pending",
    )


def admit_study(profile: SiteProfile, spec: TaskSpec) -> str:
    """The gate of every train, evaluate and statistics request: is this study approved here?

    Parameters
    ----------
    profile : SiteProfile
    spec : TaskSpec
        The request's spec.

    Returns
    -------
    str
        The study hash, when approved.

    Raises
    ------
    StudyRefused
        ``study-declined`` (the operator said no; never why) or ``study-pending`` (a
        request is stored for the operator, on first sight).
    """
    study = study_hash(spec)
    return _gate(profile, study, spec.experiment, lambda: _hold(profile, spec, study))


# -- analyses ----------------------------------------------------------------------------------


def describe_analysis(spec: AnalysisSpec) -> dict[str, Any]:
    """What an analysis asks of a site, as a person reads it (no site data in it).

    Returns
    -------
    dict
        ``kind`` ("analysis"), ``experiment`` (the ledger's name ``analysis:<name>``),
        ``dataset``, ``columns`` (with their declared type and bounds), ``cohort``,
        ``queries`` (name: kind and columns), ``epsilon``, ``delta``, ``fedhealth_version``.
    """
    doc = analysis_study_document(spec)
    queries = {
        name: q.model_dump(mode="json", exclude_none=True)
        for name, q in zip(spec.query_names(), spec.queries, strict=True)
    }
    return {
        "kind": "analysis",
        "experiment": f"analysis:{spec.name}",
        "dataset": spec.dataset,
        "columns": {k: v.model_dump(mode="json") for k, v in sorted(spec.columns.items())},
        "cohort": spec.cohort.model_dump(mode="json"),
        "queries": queries,
        "epsilon": spec.privacy.epsilon,
        "delta": spec.privacy.delta,
        "fedhealth_version": doc["fedhealth_version"],
    }


def _analysis_projection(profile: SiteProfile, spec: AnalysisSpec) -> dict[str, Any]:
    """The ε the analysis would charge at this site (planned, before min-cell withholding),
    the site's caps and what its ledger has spent on the dataset."""
    policy = profile.privacy
    out: dict[str, Any] = {
        "dp": "analysis",
        "delta": spec.privacy.delta,
        "max_epsilon_per_experiment": policy.max_epsilon_per_experiment,
        "lifetime_epsilon_budget": policy.lifetime_epsilon_budget,
    }
    try:
        from fedhealth.analytics.mechanism import analysis_epsilon, plan_noise

        sigmas = plan_noise(spec.queries, spec.privacy)
        out["epsilon"] = analysis_epsilon(sigmas, spec.privacy.delta)
        if profile.ledger_path.is_file():
            from fedhealth.privacy.dp.ledger import PrivacyLedger

            with PrivacyLedger(profile.ledger_path) as ledger:
                out["spent_on_dataset"] = ledger.spent(spec.dataset)
    except (FedHealthError, OSError, TypeError, ValueError) as exc:
        out["epsilon"] = f"not projected: {exc}"
    return out


def admit_analysis(profile: SiteProfile, spec: AnalysisSpec) -> str:
    """The study gate of an analysis request: the same approval as a training study.

    Parameters
    ----------
    profile : SiteProfile
    spec : AnalysisSpec
        The validated request.

    Returns
    -------
    str
        The analysis's study hash (:func:`fedhealth.study.analysis_study_hash`).

    Raises
    ------
    StudyRefused
        ``study-declined`` or ``study-pending`` (the request stored on first sight).
    """
    study = analysis_study_hash(spec)
    experiment = f"analysis:{spec.name}"

    def hold() -> None:
        record = {
            "study": study,
            "site": profile.name,
            "experiment": experiment,
            "first_seen": time.time(),
            "asks": describe_analysis(spec),
            "privacy": _analysis_projection(profile, spec),
            "document": analysis_study_document(spec),
            "spec": json.loads(spec.canonical_bytes()),
        }
        if _create_once(_request_path(profile, study), record):
            _audit(profile, {"event": "study-requested", "study": study, "experiment": experiment})

    return _gate(profile, study, experiment, hold)


def check_round(profile: SiteProfile, spec: TaskSpec, he: HERound | None) -> None:
    """An encrypted round must announce the study's encryption parameters.

    Raises
    ------
    StudyRefused
        Rule ``study-mismatch``: the study is encrypted but the round is not, or the
        round's weight scale, min_sites or cohort binding differ from the study's.
    """
    want = spec.he
    if want is None:
        return  # a plaintext study; an encrypted round only releases less
    problem = ""
    if he is None:
        problem = "the study is encrypted but this round asks for a plaintext update"
    elif he.weight_scale != want.weight_scale:
        problem = "the round's weight scale differs from the study's"
    elif he.min_sites != want.min_sites:
        problem = "the round's min_sites differs from the study's"
    elif (he.cohort is not None) != want.bind_cohort:
        problem = "the round's cohort binding differs from the study's"
    if problem:
        raise StudyRefused(
            f"site {profile.name!r}, experiment {spec.experiment!r}: {problem}",
            rule="study-mismatch",
        )
