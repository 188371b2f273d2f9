"""Run an analysis in one process: every site's real site-side code, then the pooling.

The request travels as JSON (``spec.model_dump(mode="json")``) exactly as it would
over the wire, each site answers with :func:`answer_analysis` against its own
profile, ledger and data, and the coordinator pools what came back. The Flower
handlers do the same with messages in between.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.analytics.pooling import pool_analysis
from fedhealth.analytics.site_queries import AnalysisRefused, answer_analysis
from fedhealth.config.analysis import load_analysis_with_sites
from fedhealth.config.site import SiteProfile
from fedhealth.errors import FederationError


def run_analysis_local(
    analysis_path: Path,
    *,
    workspace: Path | None = None,
    noise_seed: int | None = None,
    profiles: list[SiteProfile] | None = None,
) -> dict[str, Any]:
    """Run ``analysis_path`` with every listed site in this process.

    Parameters
    ----------
    analysis_path : Path
        The analysis TOML.
    workspace : Path, optional
        Put every site's ledger and keys under this folder instead of its profile's.
    noise_seed : int, optional
        Seed each site's noise from this (benchmarks and tests); default: the sites'
        secret noise keys.
    profiles : list of SiteProfile, optional
        Use these site profiles instead of loading the analysis's (same order).

    Returns
    -------
    dict
        The pooled result (:func:`~fedhealth.analytics.pooling.pool_analysis`) plus
        ``refused``: site -> rule, for sites that refused.
    """
    cfg, sites = load_analysis_with_sites(Path(analysis_path))
    if profiles is not None:
        sites = list(profiles)
    if workspace is not None:
        sites = [
            s.model_copy(update={"site": s.site.model_copy(update={"workspace": Path(workspace)})})
            for s in sites
        ]
    wire = json.loads(json.dumps(cfg.spec().model_dump(mode="json")))
    releases, refused = [], {}
    for i, profile in enumerate(sites):
        rng = None if noise_seed is None else np.random.default_rng([noise_seed, i])
        try:
            release = answer_analysis(profile, wire, rng=rng)
        except AnalysisRefused as exc:
            refused[profile.name] = {"rule": exc.rule, "message": str(exc)}
            continue
        releases.append(json.loads(json.dumps(release)))
    if len(releases) < cfg.analysis.min_sites:
        why = "; ".join(f"{site}: {r['rule']}" for site, r in refused.items())
        raise FederationError(
            f"analysis {cfg.name!r}: {len(releases)} of {len(sites)} sites answered, fewer "
            f"than min_sites = {cfg.analysis.min_sites} (refused: {why or 'none'})"
        )
    result = pool_analysis(cfg.spec(), releases, min_sites=cfg.analysis.min_sites)
    result["refused"] = refused
    result["description"] = cfg.analysis.description
    return result
