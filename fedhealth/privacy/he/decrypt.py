"""Site side: check a decryption request from the coordinator and decrypt only a legitimate sum.

The checks and why each is needed are in ``docs/security.md`` ("The cryptographic argument").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedhealth.errors import ConfigError, CryptoError
from fedhealth.privacy.he.binding import HERuleError, round_label
from fedhealth.privacy.he.ckks import unpack
from fedhealth.privacy.he.records import DecryptionRequest, check_round, verify_signed
from fedhealth.privacy.he.tags import TagSchedule

if TYPE_CHECKING:
    from fedhealth.privacy.he.ceremony import SiteKeys

__all__ = ["DEFAULT_MAX_WEIGHT_SHARE", "verify_and_decrypt"]

#: Largest share of the total weight any one claimed contribution may hold (rule
#: ``he-weight-share``): the other sites together carry at least 1 % of the aggregate, so the
#: sum is never one site's update with the others' weights shrunk to nothing. Loose enough
#: for honestly skewed consortia (a site may set a tighter cap in ``[keys]``).
DEFAULT_MAX_WEIGHT_SHARE = 0.99


def verify_and_decrypt(
    request: DecryptionRequest,
    site_keys: SiteKeys,
    *,
    expected_experiment: str,
    expected_round: int,
    expected_nonce: str,
    min_sites: int,
    expected_announcement: str | None = None,
    max_weight_share: float = DEFAULT_MAX_WEIGHT_SHARE,
) -> np.ndarray:
    """Check a decryption request from the coordinator and, if legitimate, decrypt it.

    Parameters
    ----------
    request
        From :meth:`EncryptedSum.decryption_request`.
    site_keys
        This site's keys (secret context, tag key, registry, ledger).
    expected_experiment, expected_round, expected_nonce
        The round this site is taking part in.
    min_sites
        Smallest number of distinct contributions (>= 2) the site will decrypt.
    expected_announcement
        The announcement digest this site signed for the round (default: the one its ledger
        recorded when it contributed to that experiment id, round and nonce): every claimed
        contribution must carry it (rule ``he-same-announcement``).
    max_weight_share
        Largest share of the claimed total weight one contribution may hold, in (0, 1]
        (rule ``he-weight-share``).

    Returns
    -------
    np.ndarray
        ``n_values + 1`` floats: ``sum_i w_i u_i`` followed by ``sum_i w_i``
        (see :func:`split_aggregate`), plus the flooding noise.

    Raises
    ------
    ConfigError
        ``min_sites < 2``.
    CryptoError
        Any rule broken; the message names the rule.
    """
    exp, rnd, nonce = expected_experiment, expected_round, expected_nonce
    where = f"site {site_keys.site!r} refuses the decryption request for {round_label(exp, rnd)}"
    if min_sites < 2:
        raise ConfigError(
            f"min_sites must be >= 2 (got {min_sites}): decrypting one contribution discloses it"
        )
    if not 0 < max_weight_share <= 1:
        raise ConfigError(f"max_weight_share must be in (0, 1] (got {max_weight_share})")
    if (request.experiment_id, request.round, request.nonce) != (exp, rnd, nonce):
        raise CryptoError(
            f"{where}: the request is for experiment {request.experiment_id!r}, round "
            f"{request.round}, nonce {request.nonce!r} (replay or mix-up)"
        )
    if expected_announcement is None:
        expected_announcement = site_keys.ledger.announcement(exp, rnd, nonce)
    registry = site_keys.registry
    seen: set[str] = set()
    for c in request.contributions:
        who = f"{where}: contribution of site {c.site!r}"
        verify_signed(c, registry, who)
        check_round(c, exp, rnd, nonce, who)
        if c.site in seen:
            raise CryptoError(f"{who} is claimed twice; each site may count once")
        seen.add(c.site)
    if expected_announcement is None:
        raise HERuleError(
            f"{where}: this site did not contribute to that round under nonce {nonce!r}, "
            "so it has no announcement to compare the contributions with; it decrypts "
            "only rounds it took part in",
            rule="he-own-round",
        )
    for c in request.contributions:
        who = f"{where}: contribution of site {c.site!r}"
        if c.announcement != expected_announcement:
            raise HERuleError(
                f"{who} signed another announcement of the round than this site was shown "
                f"({c.announcement[:12] or 'none'}... vs {expected_announcement[:12]}...): the "
                "sites were given different specs, global models, weight scales, weight keys, "
                "min_sites or cohorts, which can steer the sum towards one site's update",
                rule="he-same-announcement",
            )
    if len(seen) < min_sites:
        raise CryptoError(
            f"{where}: it claims {len(seen)} contribution(s) {sorted(seen)}, fewer than "
            f"min_sites={min_sites}; an aggregate of so few sites would disclose them"
        )
    if len(seen) > site_keys.params.max_sites:
        raise CryptoError(
            f"{where}: it claims {len(seen)} contributions, more than the HE parameters' "
            f"max_sites={site_keys.params.max_sites}; such a sum can wrap around the modulus"
        )
    first = request.contributions[0]
    if any(
        (c.n_chunks, c.n_values) != (first.n_chunks, first.n_values) for c in request.contributions
    ):
        raise CryptoError(f"{where}: the contributions disagree on their shape")
    cohorts = {c.cohort for c in request.contributions}
    if cohorts != {None} and (len(cohorts) != 1 or set(first.cohort or ()) != seen):
        raise CryptoError(
            f"{where}: the claimed sites {sorted(seen)} are not exactly the cohort the sites "
            f"signed ({sorted(c for c in cohorts if c)}); cohort-bound rounds decrypt only "
            "the full cohort"
        )
    weights_claimed = {c.site: float(c.weight) for c in request.contributions}
    total_claimed = sum(weights_claimed.values())
    if not all(w > 0 for w in weights_claimed.values()):
        raise HERuleError(
            f"{where}: every claimed contribution must sign a positive weight ({weights_claimed})",
            rule="he-weight-share",
        )
    heaviest = max(weights_claimed, key=lambda s: weights_claimed[s])
    share = weights_claimed[heaviest] / total_claimed
    if share > max_weight_share:
        raise HERuleError(
            f"{where}: site {heaviest!r} holds {share:.4g} of the total weight, above the cap "
            f"{max_weight_share:g}; the aggregate would be mostly that one site's update",
            rule="he-weight-share",
        )
    params = site_keys.params
    schedule = TagSchedule(site_keys.tag_key, exp, rnd, nonce, params, expected_announcement)
    layout = schedule.layout
    if (
        len(request.sum_chunks) != first.n_chunks
        or layout.n_chunks(first.n_values) != first.n_chunks
    ):
        raise CryptoError(
            f"{where}: {len(request.sum_chunks)} sum chunks for contributions of "
            f"{first.n_values} values in {first.n_chunks} chunks"
        )
    fingerprint = request.fingerprint()
    ledger = site_keys.ledger
    ledger.check_decryption(exp, rnd, fingerprint)

    ctx = site_keys.secret_context
    arrays = [
        ctx.decrypt(ctx.load(b, what=f"sum chunk {i}")) for i, b in enumerate(request.sum_chunks)
    ]
    data, reserved = unpack(arrays, layout, first.n_values)
    expected = sum(schedule.tags(s, first.n_chunks) for s in sorted(seen))
    observed = np.concatenate((reserved[:, :1], reserved[:, 2:]), axis=1)
    dev = np.abs(observed - expected)
    bad = np.flatnonzero(~(dev <= params.tag_atol).all(axis=1))
    if bad.size:
        worst = float(np.max(np.where(np.isfinite(dev), dev, np.inf)))
        reason = (
            f"membership-tag check failed in {bad.size} of {first.n_chunks} chunk(s) (first "
            f"{bad[:5].tolist()}, max deviation {worst:.3g})"
        )
        ledger.lock(exp, rnd, reason)
        raise CryptoError(
            f"{where}: {reason}. The sum is not exactly one copy of each claimed contribution of "
            f"{sorted(seen)} (a single site's ciphertext, a missing, duplicated or scaled "
            "contribution, mixed chunks, a replayed sum, another key or altered bytes); this "
            "round is now locked at this site"
        )
    weights = reserved[:, 1]
    if not (weights[0] > 0 and np.all(np.abs(weights - weights[0]) <= params.tag_atol)):
        reason = "weight-slot check failed (weights differ between chunks or are not positive)"
        ledger.lock(exp, rnd, reason)
        raise CryptoError(f"{where}: {reason}; this round is now locked at this site")
    if abs(float(np.mean(weights)) - total_claimed) > params.tag_atol * max(1.0, total_claimed):
        reason = (
            f"weight-slot check failed (decrypted total weight {float(np.mean(weights)):.6g}, "
            f"signed weights sum to {total_claimed:.6g})"
        )
        ledger.lock(exp, rnd, reason)
        raise CryptoError(f"{where}: {reason}; this round is now locked at this site")
    out = np.concatenate((data, [float(np.mean(weights))]))
    out = out + schedule.flood(fingerprint, out.size)
    ledger.record_decryption(exp, rnd, fingerprint)
    return out
