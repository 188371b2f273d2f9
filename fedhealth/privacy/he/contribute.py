"""Site side: encrypt, tag and sign one site's update for one round."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhealth.errors import ConfigError
from fedhealth.privacy.he.binding import Announcement, check_round_ids, round_label
from fedhealth.privacy.he.ckks import encrypt_update
from fedhealth.privacy.he.keys import sign
from fedhealth.privacy.he.records import Contribution, chunks_digest
from fedhealth.privacy.he.tags import TagSchedule

if TYPE_CHECKING:
    from fedhealth.privacy.he.ceremony import SiteKeys

__all__ = ["check_contribution", "make_contribution"]


def check_contribution(
    site_keys: SiteKeys,
    *,
    experiment_id: str,
    round: int,
    nonce: str,
    weight_scale: float = 1000.0,
    cohort: Sequence[str] | None = None,
    spec_digest: str = "",
    global_model: str = "",
    weight_key: str = "",
    min_sites: int = 2,
    experiment: str | None = None,
) -> tuple[str, tuple[str, ...] | None, str]:
    """Check everything about a contribution that does not depend on the update itself.

    A site calls this before it trains (and so before its ledger charges any ε): a round it
    would refuse to contribute to after training costs it nothing. The parameters are those
    of :func:`make_contribution`.

    Returns
    -------
    (token, cohort, announcement)
        The ledger token the contribution will be recorded under, the sorted cohort (or
        ``None``) and the announcement digest it signs.

    Raises
    ------
    ConfigError
        A malformed binding, weight scale or cohort.
    CryptoError
        The site's HE ledger refuses the contribution (see
        :meth:`~fedhealth.privacy.he.ledger.SiteLedger.check_contribution`).
    """
    site = site_keys.site
    where = f"site {site!r}, {round_label(experiment_id, round)}"
    check_round_ids(experiment_id, round, nonce)
    if not weight_scale > 0:
        raise ConfigError(f"{where}: weight_scale ({weight_scale}) must be > 0")
    cohort_t: tuple[str, ...] | None = None
    if cohort is not None:
        cohort_t = tuple(sorted(cohort))
        unknown = [s for s in cohort_t if s not in site_keys.registry.sites]
        if len(set(cohort_t)) != len(cohort_t) or site not in cohort_t or unknown:
            raise ConfigError(
                f"{where}: cohort {list(cohort_t)} must list distinct consortium sites including "
                f"this one (unknown: {unknown})"
            )
    shown = Announcement(
        spec_digest=spec_digest,
        model_hash=global_model,
        weight_scale=float(weight_scale),
        weight_key=weight_key,
        min_sites=int(min_sites),
        cohort=cohort_t,
    ).digest()
    token = json.dumps([nonce, cohort_t, shown])
    site_keys.ledger.check_contribution(
        experiment_id, round, token, experiment=experiment, global_model=global_model
    )
    return token, cohort_t, shown


def make_contribution(
    update: np.ndarray,
    n_examples: float,
    site_keys: SiteKeys,
    *,
    experiment_id: str,
    round: int,
    nonce: str,
    weight_scale: float = 1000.0,
    cohort: Sequence[str] | None = None,
    spec_digest: str = "",
    global_model: str = "",
    weight_key: str = "",
    min_sites: int = 2,
    experiment: str | None = None,
) -> tuple[list[bytes], Contribution]:
    """Encrypt, tag and sign one site's update.

    Parameters
    ----------
    update
        Flat update vector (see ``ckks.flatten_state``).
    n_examples
        The site's example count n (> 0); the site sends ``w * update`` and ``w`` with
        ``w = n / weight_scale``.
    site_keys
        The site's keys (``ceremony.load_site_keys``).
    experiment_id, round, nonce
        The round binding announced by the coordinator.
    weight_scale
        Public, consortium-wide divisor keeping ``w * |update| <= params.max_abs_value``.
    cohort
        Optional list of the sites announced for this round (cohort binding, see module doc).
    spec_digest, global_model, weight_key, min_sites
        The rest of what the site was shown: ``TaskSpec.digest()``, ``binding.model_hash`` of
        the global model received, the weighted-by metric and the experiment's ``min_sites``.
        With ``weight_scale`` and ``cohort`` they make the signed announcement digest
        (:class:`~fedhealth.privacy.he.binding.Announcement`).
    experiment
        The experiment's name (default: the part of ``experiment_id`` before ``:``); the
        ledger allows one contribution per (name, round, global model) under any experiment id.

    Returns
    -------
    (chunks, contribution)
        Ciphertext chunks (seeded, compressed SEAL bytes) and the signed contribution.

    Raises
    ------
    ConfigError
        Bad inputs or values too large for the HE headroom.
    CryptoError
        The site already contributed to this round under another nonce/cohort.
    """
    site = site_keys.site
    params = site_keys.params
    where = f"site {site!r}, {round_label(experiment_id, round)}"
    vec = np.asarray(update, dtype=np.float64).ravel()
    if not np.all(np.isfinite(vec)):
        raise ConfigError(f"{where}: the update contains NaN/inf; fix training before encrypting")
    if not n_examples > 0:  # weight_scale is checked with the binding
        raise ConfigError(f"{where}: n_examples ({n_examples}) must be > 0")
    binding: dict[str, Any] = {"experiment": experiment, "global_model": global_model}
    token, cohort_t, shown = check_contribution(
        site_keys,
        experiment_id=experiment_id,
        round=round,
        nonce=nonce,
        weight_scale=weight_scale,
        cohort=cohort,
        spec_digest=spec_digest,
        weight_key=weight_key,
        min_sites=min_sites,
        **binding,
    )
    ledger = site_keys.ledger

    w = float(n_examples) / float(weight_scale)
    schedule = TagSchedule(site_keys.tag_key, experiment_id, round, nonce, params, shown)
    n_chunks = schedule.layout.n_chunks(vec.size)
    tags = schedule.tags(site, n_chunks)

    def reserved(c: int) -> np.ndarray:
        return np.concatenate(([tags[c, 0], w], tags[c, 1:]))

    try:
        chunks = encrypt_update(
            vec * w, site_keys.secret_context, layout=schedule.layout, reserved_values=reserved
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    contribution = Contribution(
        site=site,
        experiment_id=experiment_id,
        round=round,
        nonce=nonce,
        n_chunks=len(chunks),
        n_values=int(vec.size),
        digest=chunks_digest(chunks),
        cohort=cohort_t,
        announcement=shown,
        weight=w,
    )
    contribution = replace(
        contribution, signature=sign(site_keys.identity, contribution.signed_bytes())
    )
    ledger.record_contribution(experiment_id, round, token, **binding)
    return chunks, contribution
