"""ROC and calibration of a training run's final global model, from released histograms.

In the run's last round the coordinator asks each site's evaluation for score histograms
per class as well (config key ``score-histograms``, binary tasks only). A site releases them
as its policy releases metrics — exact, or noised and charged to its ledger (``"dp"``), or
not at all (``"withheld"``) — through the same code as an evaluation-only study
(:func:`fedhealth.site.validation.final_histograms`): per-bin counts, never a score. Here the
coordinator derives per site and pooled the figures of
:func:`fedhealth.evaluation.metrics.derive` (AUROC, AUPRC, Brier score, calibration intercept
and slope, each with a 95 % interval), logs them as ``final/<site>/<metric>`` (and
``final/pooled/...``) and everything as the run's artifact ``evaluation/score_histograms.json``
(:class:`~fedhealth.evaluation.result.FinalEvaluation`), from which the run report draws ROC
and calibration curves (:mod:`fedhealth.registry.report`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Message

from fedhealth.evaluation.metrics import derive, flat_metrics
from fedhealth.evaluation.result import (
    FINAL_DIR,
    FINAL_FILE,
    FINAL_THRESHOLD,
    FinalEvaluation,
)
from fedhealth.protocol import Metric, Record, SiteKey, ValidationKey

if TYPE_CHECKING:
    from fedhealth.registry.recorder import RunRecorder

#: Prefix of the logged figures: ``final/<site or pooled>/<metric>[_low|_high]``.
PREFIX = "final/"


def wants_histograms(num_classes: int, round_: int, rounds: int) -> bool:
    """Whether round ``round_``'s evaluation asks the sites for score histograms."""
    return num_classes == 2 and round_ == rounds


def collect(replies: Iterable[Message]) -> tuple[dict[str, dict[str, Any]], dict, list[str]]:
    """The released histograms by site, each site's ε after them, and who released none.

    Parameters
    ----------
    replies : iterable of Message
        The final round's successful evaluation replies.

    Returns
    -------
    tuple
        ``releases`` (site -> histograms), ``epsilon`` (site -> its experiment's ε after the
        release, for sites that released under DP) and ``withheld`` (sites whose reply
        carries no histograms: their policy withholds metrics).
    """
    releases: dict[str, dict[str, Any]] = {}
    epsilon: dict[str, float] = {}
    withheld: list[str] = []
    for msg in replies:
        site = str(msg.content[Record.SITE][SiteKey.NAME])
        record = msg.content.get(Record.VALIDATION)
        if record is None:
            withheld.append(site)
            continue
        releases[site] = json.loads(str(record[ValidationKey.RELEASE]))
        metrics = dict(msg.content.get(Record.METRICS) or {})
        if releases[site].get("noise_std") and Metric.EPSILON in metrics:
            epsilon[site] = float(metrics[Metric.EPSILON])  # type: ignore[arg-type]
    return releases, epsilon, sorted(withheld)


def record_final_evaluation(
    recorder: RunRecorder, round_: int, replies: Iterable[Message]
) -> FinalEvaluation | None:
    """Derive the final figures from the replies' histograms; log them and the histograms.

    Parameters
    ----------
    recorder : RunRecorder
        The run's recorder (metrics at step ``round_``, the artifact
        :data:`~fedhealth.evaluation.result.FINAL_ARTIFACT`).
    round_ : int
        The final round.
    replies : iterable of Message
        Its successful evaluation replies.

    Returns
    -------
    FinalEvaluation or None
        ``None`` when no site released histograms.
    """
    releases, epsilon, withheld = collect(replies)
    if not releases:
        return None
    result = FinalEvaluation(
        round=round_,
        releases=releases,
        metrics=derive(releases, FINAL_THRESHOLD),
        epsilon=epsilon,
        withheld=withheld,
    )
    recorder.log_metrics({PREFIX + k: v for k, v in flat_metrics(result.metrics).items()}, round_)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / FINAL_FILE
        path.write_text(result.to_json())
        recorder.client.log_artifact(recorder.run_id, str(path), artifact_path=FINAL_DIR)
    return result
