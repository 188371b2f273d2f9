"""The coordinator side of a federated analysis, on a Flower Grid (simulation or SuperLink).

One exchange: the analysis spec goes to every connected site as a ``query.analysis``
message (canonical JSON, :class:`~fedhealth.protocol.AnalysisKey`); each site answers with
its noisy release or a :class:`~fedhealth.protocol.Refusal`. A release for another spec or
with a number that is not finite counts as a refusal (rule ``bad-release``). With at least
``min_sites`` releases the answers are pooled (:mod:`fedhealth.analytics.pooling`) and
recorded as an MLflow run (:mod:`fedhealth.analytics.report`); with fewer, the analysis
stops with a :class:`~fedhealth.errors.FederationError` naming every refusal.

The ServerApp is :mod:`fedhealth.coordinator.server_app`'s: it runs an analysis when its
run config names one (``analysis``, see :mod:`fedhealth.coordinator.runconfig`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedhealth.analytics.pooling import pool_analysis
from fedhealth.analytics.report import log_to_mlflow
from fedhealth.analytics.site_queries import is_finite_release
from fedhealth.config.analysis import AnalysisConfig, load_analysis
from fedhealth.coordinator.exchange import send_and_receive
from fedhealth.coordinator.guard import GuardedGrid
from fedhealth.errors import FederationError
from fedhealth.protocol import (
    PROTOCOL_VERSION,
    AnalysisKey,
    MessageKind,
    Record,
    Refusal,
    SiteKey,
)

#: Seconds to wait for the sites' releases (an analysis reads one table per site).
ANALYSIS_TIMEOUT = 600.0


@dataclass
class AnalysisOutcome:
    """What an analysis produced: the pooled result and where it was recorded.

    Attributes
    ----------
    result : dict
        :func:`~fedhealth.analytics.pooling.pool_analysis` output plus ``refused``
        (site -> rule and message) and ``description``.
    run_id : str
        The MLflow run holding the artifacts.
    tracking_uri : str
        The MLflow store.
    refusals : list of Refusal
        Every site that refused, as it said.
    """

    result: dict[str, Any]
    run_id: str
    tracking_uri: str
    refusals: list[Refusal] = field(default_factory=list)


def analysis_message(cfg: AnalysisConfig, node_id: int) -> Message:
    """The ``query.analysis`` message for one site."""
    record = ConfigRecord(
        {
            AnalysisKey.PROTOCOL_VERSION: PROTOCOL_VERSION,
            AnalysisKey.SPEC: cfg.spec().canonical_bytes().decode("ascii"),
        }
    )
    return Message(
        RecordDict({Record.ANALYSIS: record}),
        dst_node_id=node_id,
        message_type=MessageKind.ANALYSIS,
    )


def _release(msg: Message, spec_hash: str) -> tuple[dict[str, Any] | None, Refusal | None]:
    """A reply's release, or the refusal it stands for."""
    node = f"node {msg.metadata.src_node_id}"
    if msg.has_error():
        return None, Refusal.decode(msg.error.reason, node=node)
    try:
        site = str(msg.content[Record.SITE][SiteKey.NAME])
        release = json.loads(str(msg.content[Record.RELEASE][AnalysisKey.RELEASE]))
        if not isinstance(release, dict):
            raise ValueError("not an object")
    except (KeyError, TypeError, ValueError) as exc:
        return None, Refusal(node, "bad-release", f"the reply carries no readable release ({exc})")
    if release.get("spec_hash") != spec_hash:
        return None, Refusal(site, "bad-release", "the release answers another analysis spec")
    if release.get("site") != site or not is_finite_release(release):
        return None, Refusal(site, "bad-release", "the release is inconsistent or not finite")
    return release, None


def collect_releases(
    grid: Any, cfg: AnalysisConfig, timeout: float = ANALYSIS_TIMEOUT
) -> tuple[list[dict[str, Any]], list[Refusal]]:
    """Send the analysis to every connected site; return the releases and the refusals.

    Parameters
    ----------
    grid : Grid
        The Flower grid (wrapped in a :class:`GuardedGrid` by :func:`run_analysis`).
    cfg : AnalysisConfig
        The analysis.
    timeout : float
        Seconds to wait for the replies.

    Returns
    -------
    (releases, refusals)
        Releases sorted by site (reproducible pooling), and every refusal.
    """
    spec_hash = cfg.spec().spec_hash()
    msgs = [analysis_message(cfg, n) for n in grid.get_node_ids()]
    releases, refusals = [], []
    for reply in send_and_receive(grid, msgs, timeout):
        release, refusal = _release(reply, spec_hash)
        if release is not None:
            releases.append(release)
        elif refusal is not None:
            refusals.append(refusal)
    names = [r["site"] for r in releases]
    if len(set(names)) != len(names):
        raise FederationError(
            f"analysis {cfg.name!r}: two nodes answered as the same site ({sorted(names)}); "
            "each site must run one SuperNode"
        )
    return sorted(releases, key=lambda r: r["site"]), refusals


def run_analysis(
    grid: Any,
    cfg: AnalysisConfig,
    tracking_uri: str,
    tags: dict[str, str] | None = None,
    timeout: float = ANALYSIS_TIMEOUT,
) -> AnalysisOutcome:
    """Run ``cfg`` on ``grid``: collect, require ``min_sites``, pool, record to MLflow.

    Raises
    ------
    FederationError
        Fewer than ``analysis.min_sites`` sites released an answer (each refusal named).
    """
    need = cfg.analysis.min_sites
    guarded = GuardedGrid(grid, need, len(cfg.analysis.sites), timeout)
    releases, refusals = collect_releases(guarded, cfg, timeout)
    refusals = sorted(refusals, key=lambda r: r.site)  # reply order is arrival order
    refused = {r.site: {"rule": r.rule, "message": r.message} for r in refusals}
    if len(releases) < need:
        why = "; ".join(f"{r.site} ({r.rule}): {r.message}" for r in refusals) or "no reply"
        raise FederationError(
            f"analysis {cfg.name!r}: {len(releases)} site(s) answered, fewer than min_sites = "
            f"{need}. {why}"
        )
    result = pool_analysis(cfg.spec(), releases, min_sites=need)
    result["refused"] = refused
    result["description"] = cfg.analysis.description
    run_id = log_to_mlflow(result, tracking_uri, cfg.tracking.experiment, tags=tags)
    return AnalysisOutcome(result, run_id, tracking_uri, refusals)


def run_from_context(grid: Grid, context: Context) -> AnalysisOutcome:
    """Run the analysis named in the ServerApp's run config (``analysis``)."""
    from fedhealth.coordinator.runconfig import analysis_path, tracking_uri
    from fedhealth.registry.retry import configure_mlflow_http
    from fedhealth.registry.store import default_tracking_uri

    configure_mlflow_http()  # before any MLflow call of this coordinator process
    rc = dict(context.run_config)
    cfg = load_analysis(analysis_path(rc))
    uri = tracking_uri(rc, cfg.tracking.uri, default_tracking_uri())
    return run_analysis(grid, cfg, uri, tags={"fedhealth.flwr_run_id": str(context.run_id)})
