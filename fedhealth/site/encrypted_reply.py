"""A site's side of encrypted aggregation: encrypt its update, decrypt only aggregates.

When a round is encrypted (the coordinator's training config carries the ``he-*``
announcement, see ``fedhealth.privacy.he.wire``), the site replies with its update
``new - global`` (after any DP noise, which the training step already added to ``new``),
weighted by its aggregation weight, packed into CKKS ciphertexts and signed - never with
plaintext weights. Later in the round the coordinator may ask it to decrypt the *sum* of
the round's contributions (message type ``query.decrypt``); the site checks the request
(``verify_and_decrypt``: signatures, round binding, at least ``min_sites`` distinct
contributions, membership tags, one aggregate per round) and otherwise refuses, naming the
rule.

The site's keys come from the ``[keys]`` table of its profile (``docs/key-ceremony.md``).
The long-term keys are cached per process; the per-round ledger is re-read from disk for
every message, so several worker processes of one site never overwrite each other's record.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.config.site import SiteProfile
from fedhealth.errors import ConfigError, CryptoError
from fedhealth.privacy.he.binding import model_hash
from fedhealth.privacy.he.ceremony import SiteKeys, load_site_keys
from fedhealth.privacy.he.ckks import flatten_state
from fedhealth.privacy.he.contribute import check_contribution, make_contribution
from fedhealth.privacy.he.decrypt import DEFAULT_MAX_WEIGHT_SHARE, verify_and_decrypt
from fedhealth.privacy.he.ledger import SiteLedger
from fedhealth.privacy.he.wire import (
    HERound,
    contribution_record,
    read_request,
)
from fedhealth.protocol import ConfigKey, Metric
from fedhealth.site.timing import phase

__all__ = [
    "HERefusal",
    "decrypt_aggregate",
    "encrypt_update",
    "ledger_path",
    "seal_update",
    "site_keys",
]


class HERefusal(CryptoError):
    """A site refuses an encrypted-aggregation step; ``rule`` names the check that refused.

    Parameters
    ----------
    message
        What was wrong and what to do.
    rule
        ``"he-keys"``, ``"he-round"``, ``"he-encrypt"`` or ``"he-decrypt-request"``.
    """

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


def ledger_path(profile: SiteProfile) -> Path:
    """Where the site's HE ledger lives (``[keys].he_ledger`` or its workspace)."""
    keys = profile.keys
    if keys is not None and keys.he_ledger is not None:
        return keys.he_ledger
    return profile.workspace / "he-ledger.json"


@lru_cache(maxsize=16)
def _cached_keys(site: str, identity: Path, secret: Path, registry: Path, stamp: tuple) -> SiteKeys:
    return load_site_keys(
        None, site, identity_path=identity, wrapped_path=secret, registry_path=registry
    )


def _stamp(*paths: Path) -> tuple:
    return tuple(p.stat().st_mtime_ns if p.is_file() else None for p in paths)


def site_keys(profile: SiteProfile) -> SiteKeys:
    """This site's HE keys with a ledger freshly read from disk.

    Raises
    ------
    HERefusal
        The profile has no ``[keys]`` table, or the key files are missing, wrongly
        permissioned or do not belong to this site (rule ``he-keys``).
    """
    keys = profile.keys
    if keys is None:
        raise HERefusal(
            f"site {profile.name!r} has no [keys] table in its profile, so it cannot take part "
            "in encrypted aggregation; add the paths from `fedhealth consortium init` "
            "(docs/key-ceremony.md)",
            rule="he-keys",
        )
    paths = (keys.identity, keys.he_secret, keys.registry)
    try:
        cached = _cached_keys(profile.name, *paths, _stamp(*paths))
        return replace(cached, ledger=SiteLedger(ledger_path(profile)))
    except (ConfigError, CryptoError) as exc:
        raise HERefusal(f"site {profile.name!r}: {exc}", rule="he-keys") from None


def _check_round(profile: SiteProfile, he: HERound, experiment: str, round_: int) -> None:
    if he.experiment != experiment or he.round != round_:
        raise HERefusal(
            f"site {profile.name!r}: the encryption binding names experiment "
            f"{he.experiment_id!r}, round {he.round}, but the round is experiment "
            f"{experiment!r}, round {round_}; refusing a mixed-up request",
            rule="he-round",
        )


def _announced(
    he: HERound, experiment: str, global_arrays: dict[str, np.ndarray], spec_digest: str
) -> dict[str, Any]:
    """The keywords of ``check_contribution``/``make_contribution``: what the site was shown."""
    return {
        "experiment_id": he.experiment_id,
        "round": he.round,
        "nonce": he.nonce,
        "weight_scale": he.weight_scale,
        "cohort": he.cohort,
        "spec_digest": spec_digest,
        "global_model": model_hash(global_arrays),
        "weight_key": he.weight_key,
        "min_sites": he.min_sites,
        "experiment": experiment,
    }


def encrypt_update(
    profile: SiteProfile,
    he: HERound,
    *,
    experiment: str,
    round_: int,
    global_arrays: dict[str, np.ndarray],
    new_arrays: dict[str, np.ndarray],
    metrics: dict[str, Any],
    spec_digest: str = "",
) -> tuple[Any, dict[str, float]]:
    """Encrypt and sign this site's update for an encrypted round.

    Parameters
    ----------
    profile
        The site's profile (``[keys]``).
    he
        The round's announcement.
    experiment, round_
        The experiment and round of the training request (must match ``he``).
    global_arrays, new_arrays
        The global weights received and the locally trained weights (after DP noise).
    metrics
        The reply's plaintext metrics; ``metrics[he.weight_key]`` weights the update.
    spec_digest
        ``TaskSpec.digest()`` of the request's spec: with the global model's hash and the
        announcement it makes the digest the contribution signs.

    Returns
    -------
    (record, costs)
        The ``"he-contribution"`` ``ConfigRecord`` and ``{"he-encrypt-seconds",
        "he-bytes"}`` for the reply's metrics.

    Raises
    ------
    HERefusal
        Missing keys, mismatched binding, a missing weight, or an update too large for the
        HE headroom (rule ``he-encrypt``: clip it or raise ``weight_scale``).
    """
    _check_round(profile, he, experiment, round_)
    keys = site_keys(profile)
    weight = metrics.get(he.weight_key)
    if not isinstance(weight, (int, float)) or not weight > 0:
        raise HERefusal(
            f"site {profile.name!r}, round {round_}: no positive aggregation weight "
            f"{he.weight_key!r} in the reply metrics ({weight!r})",
            rule="he-encrypt",
        )
    t0 = time.perf_counter()
    names = sorted(global_arrays)
    if set(names) != set(new_arrays):
        raise HERefusal(
            f"site {profile.name!r}, round {round_}: the trained model's tensors differ from "
            "the global model's",
            rule="he-encrypt",
        )
    old, _ = flatten_state({k: global_arrays[k] for k in names})
    new, _ = flatten_state({k: new_arrays[k] for k in names})
    try:
        chunks, contribution = make_contribution(
            new - old,
            float(weight),
            keys,
            **_announced(he, experiment, global_arrays, spec_digest),
        )
    except (ConfigError, CryptoError) as exc:
        raise HERefusal(str(exc), rule=getattr(exc, "rule", "he-encrypt")) from None
    costs = {
        Metric.HE_ENCRYPT_SECONDS: time.perf_counter() - t0,
        Metric.HE_BYTES: float(sum(map(len, chunks))),
    }
    with phase("serialise"):  # the audit log's timing; the rest of this call is "encrypt"
        record = contribution_record(chunks, contribution)
    return record, costs


def check_before_training(
    he: HERound,
    profile: SiteProfile,
    *,
    experiment: str,
    round_: int,
    global_arrays: dict[str, np.ndarray],
    spec_digest: str = "",
) -> None:
    """Refuse an encrypted round before training, where the refusal does not depend on the
    trained update: the binding, the site's keys, the cohort and its HE ledger's rules (a
    re-run after a decryption, one contribution per global model).

    Called before the DP-SGD step charges the site's ledger, so a round the site would not
    seal costs it no ε. Raises :class:`HERefusal` naming the rule, as :func:`encrypt_update`.
    """
    _check_round(profile, he, experiment, round_)
    keys = site_keys(profile)
    try:
        check_contribution(keys, **_announced(he, experiment, global_arrays, spec_digest))
    except (ConfigError, CryptoError) as exc:
        raise HERefusal(str(exc), rule=getattr(exc, "rule", "he-encrypt")) from None


def seal_update(
    he: HERound,
    profile: SiteProfile,
    *,
    experiment: str,
    round_: int,
    global_arrays: dict[str, np.ndarray],
    new_arrays: dict[str, np.ndarray],
    metrics: dict[str, Any],
    spec_digest: str = "",
) -> Any:
    """The train reply's encrypted update for the round announced by ``he``.

    ``he`` is the request's announcement, parsed once with the request
    (:class:`fedhealth.site.request.SiteRequest`). Adds the encryption costs to
    ``metrics``. See :func:`encrypt_update` for the parameters and the refusals.
    """
    record, costs = encrypt_update(
        profile,
        he,
        experiment=experiment,
        round_=round_,
        global_arrays=global_arrays,
        new_arrays=new_arrays,
        metrics=metrics,
        spec_digest=spec_digest,
    )
    metrics.update(costs)
    return record


def _contributed(keys: SiteKeys, experiment_id: str, round_: int) -> tuple[str, str]:
    """The nonce and the announcement digest this site contributed under (its ledger)."""
    token = keys.ledger.contributed.get(SiteLedger.key(experiment_id, round_))
    if token is None:
        raise HERefusal(
            f"site {keys.site!r} refuses to decrypt for experiment {experiment_id!r}, round "
            f"{round_}: it did not contribute to that round, and decrypts only rounds it took "
            "part in",
            rule="he-decrypt-request",
        )
    entry = json.loads(token)
    return str(entry[0]), str(entry[2]) if len(entry) > 2 else ""


def decrypt_aggregate(profile: SiteProfile, record: Any, config: Any) -> tuple[np.ndarray, float]:
    """Check a decryption request from the coordinator and, if legitimate, decrypt it.

    Parameters
    ----------
    profile
        The site's profile.
    record
        The ``"he-request"`` record of the query.
    config
        The query's ``"config"`` record (or ``None``): ``he-min-sites`` is the experiment's
        ``min_sites``; the site requires at least that, its own ``[keys].min_decrypt_sites``
        and never fewer than 2 contributions.

    Returns
    -------
    (aggregate, seconds)
        ``[sum_i w_i u_i..., sum_i w_i]`` and the time spent checking and decrypting.

    Raises
    ------
    HERefusal
        Any rule broken (rule ``he-decrypt-request``; the message names the check).
    """
    t0 = time.perf_counter()
    keys = site_keys(profile)
    try:
        request = read_request(record)
        nonce, _ = _contributed(keys, request.experiment_id, request.round)
        floor = profile.keys.min_decrypt_sites if profile.keys is not None else 2
        announced = int((config or {}).get(ConfigKey.HE_MIN_SITES, 2))
        out = verify_and_decrypt(
            request,
            keys,
            expected_experiment=request.experiment_id,
            expected_round=request.round,
            expected_nonce=nonce,
            min_sites=max(2, floor, announced),
            max_weight_share=(
                profile.keys.max_weight_share
                if profile.keys is not None
                else DEFAULT_MAX_WEIGHT_SHARE
            ),
        )
    except HERefusal:
        raise
    except (ConfigError, CryptoError, TypeError, ValueError) as exc:
        raise HERefusal(str(exc), rule=getattr(exc, "rule", "he-decrypt-request")) from None
    return out, time.perf_counter() - t0
