"""Plots and a single-page HTML report of a run, built from what the run itself logged.

:func:`build_run_report` reads a training run's metric histories back from MLflow
(``global/*`` and ``site/<name>/*`` per round), draws accuracy and loss per round, ε per
site over rounds and the encrypted-aggregation bytes and seconds per round (matplotlib,
Agg backend); from the score histograms the sites released in the final round (the artifact
``evaluation/score_histograms.json``, :mod:`fedhealth.coordinator.final_evaluation`) it draws
ROC and calibration curves per site and pooled and tabulates AUROC, AUPRC, Brier score and
calibration with their intervals. Each plot is logged under ``plots/`` and a ``report.html``
with the images embedded as base64 (no CDN, no script: it opens from the MLflow UI's artifact
view or a file). :func:`validation_plots` draws the same ROC and calibration curves for an
evaluation-only study.
"""

from __future__ import annotations

import base64
import html
import io
import re
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # no display: plots are files
import matplotlib.pyplot as plt
import numpy as np

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from fedhealth.evaluation.result import FinalEvaluation, ValidationResult

REPORT_FILE = "report.html"
ROC_TITLE = "ROC per site (final round, from released score histograms)"
CALIBRATION_TITLE = "calibration per site (final round, from released score histograms)"
_SITE_KEY = re.compile(r"^site/(?P<site>[^/]+)/(?P<metric>.+)$")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _series(
    client: MlflowClient, run_id: str, key: str, cumulative: bool = False
) -> tuple[list[int], list[float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    steps: dict[int, float] = {}
    for p in points:
        if cumulative and p.step in steps:
            # ε of a round is reported after training and again after the round's metric
            # releases (evaluation, final histograms): the round ends at the largest.
            steps[p.step] = max(steps[p.step], p.value)
        else:
            steps.setdefault(p.step, p.value)  # the first value of a step (a resume keeps it)
    return list(steps), list(steps.values())


def run_plots(client: MlflowClient, run_id: str) -> dict[str, bytes]:
    """PNG plots of a run's logged metrics, by title (only those the run has data for)."""
    keys = sorted(client.get_run(run_id).data.metrics)
    per_site: dict[str, dict[str, str]] = defaultdict(dict)
    for key in keys:
        m = _SITE_KEY.match(key)
        if m:
            per_site[m["metric"]][m["site"]] = key
    plots: dict[str, bytes] = {}
    for metric, label in (("accuracy", "accuracy"), ("loss", "loss")):
        lines = {f"site {s}": k for s, k in sorted(per_site.get(metric, {}).items())}
        if f"global/{metric}" in keys:
            lines = {"global (weighted)": f"global/{metric}", **lines}
        if lines:
            plots[f"{label} per round"] = _lines(client, run_id, lines, label)
    eps = {f"site {s}": k for s, k in sorted(per_site.get("epsilon", {}).items())}
    if eps:
        plots["ε per site over rounds"] = _lines(
            client, run_id, eps, "ε (cumulative)", cumulative=True
        )
    he_bytes = {k.removeprefix("he/"): k for k in keys if k == "he/bytes_per_site"}
    if he_bytes:
        plots["encrypted aggregation: bytes per site per round"] = _lines(
            client, run_id, he_bytes, "bytes"
        )
    he_time = {
        k.removeprefix("he/"): k
        for k in keys
        if k.startswith("he/") and k.endswith("_seconds") and "roundtrip" not in k
    }
    if he_time:
        plots["encrypted aggregation: seconds per round"] = _lines(
            client, run_id, he_time, "seconds"
        )
    return plots


def _lines(
    client: MlflowClient,
    run_id: str,
    lines: dict[str, str],
    ylabel: str,
    cumulative: bool = False,
) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, key in lines.items():
        x, y = _series(client, run_id, key, cumulative)
        style: dict[str, Any] = (
            {"linewidth": 2.5, "color": "black"} if label.startswith("global") else {}
        )
        ax.plot(x, y, marker="o", markersize=3, label=label, **style)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def render_html(
    title: str,
    summary: list[tuple[str, str]],
    plots: dict[str, bytes],
    tables: list[tuple[str, str, list[str], list[list[str]]]] | None = None,
) -> str:
    """A self-contained HTML page: a summary table, more tables and the plots inline (PNG).

    Parameters
    ----------
    title : str
        The page's title and heading.
    summary : list of (str, str)
        Rows of the summary table.
    plots : dict
        PNG bytes by title (the figure's caption and the image's ``alt``).
    tables : list, optional
        ``(heading, note, column names, rows)`` of further tables, after the summary.
    """
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary
    )
    more = "".join(
        f"<h2>{html.escape(heading)}</h2><p>{html.escape(note)}</p><table><thead><tr>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        + "</tr></thead><tbody>"
        + "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
        )
        + "</tbody></table>"
        for heading, note, columns, body in tables or []
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{html.escape(t)}</figcaption>'
        "</figure>"
        for t, png in plots.items()
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;"
        "max-width:60em;margin:2em auto}table{border-collapse:collapse}th,td{text-align:"
        "left;padding:.2em .8em;border-bottom:1px solid #ddd}figure{display:inline-block;"
        "margin:1em}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table>{rows}</table>{more}{figures}</body></html>"
    )


def build_run_report(client: MlflowClient, run_id: str) -> str:
    """Log a run's plots and its HTML report as artifacts; returns the report's URI."""
    run = client.get_run(run_id)
    plots = run_plots(client, run_id)
    summary = [
        ("experiment", run.data.tags.get("mlflow.runName", run.info.run_name or "")),
        ("MLflow run", run_id),
        ("registered version", run.data.tags.get("fedhealth.registered_version", "none")),
    ]
    summary += [
        (k, f"{v:.4g}") for k, v in sorted(run.data.metrics.items()) if k.startswith("global/")
    ]
    tables = []
    final = final_evaluation(client, run_id)
    if final is not None:
        pngs = roc_calibration_plots(final.releases, final.metrics)
        plots[ROC_TITLE], plots[CALIBRATION_TITLE] = pngs["roc"], pngs["calibration"]
        tables.append(final_table(final))
    page = render_html(f"fedhealth run {run.info.run_name or run_id}", summary, plots, tables)
    with tempfile.TemporaryDirectory() as tmp:
        for title, png in plots.items():
            path = Path(tmp) / (re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") + ".png")
            path.write_bytes(png)
            client.log_artifact(run_id, str(path), artifact_path="plots")
        report = Path(tmp) / REPORT_FILE
        report.write_text(page, encoding="utf-8")
        client.log_artifact(run_id, str(report))
    return f"{run.info.artifact_uri.rstrip('/')}/{REPORT_FILE}"


def report_ui_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """Where an MLflow tracking server's web UI shows the run's report (None: no server)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    base = tracking_uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{REPORT_FILE}"


def final_evaluation(client: MlflowClient, run_id: str) -> FinalEvaluation | None:
    """The run's final-evaluation artifact (score histograms and figures), if it has one."""
    from fedhealth.evaluation.result import FINAL_ARTIFACT, FINAL_DIR, FinalEvaluation

    if not any(a.path == FINAL_ARTIFACT for a in client.list_artifacts(run_id, FINAL_DIR)):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, FINAL_ARTIFACT, tmp)
        return FinalEvaluation.from_json(Path(path).read_text(encoding="utf-8"))


_FIGURES = ("auroc", "auprc", "brier", "calibration_intercept", "calibration_slope")


def final_table(final: FinalEvaluation) -> tuple[str, str, list[str], list[list[str]]]:
    """The report's table of the final round's discrimination and calibration, per site."""
    from fedhealth.evaluation.metrics import format_interval

    columns = ["site", "test records", "AUROC", "AUPRC", "Brier score",
               "calibration intercept", "calibration slope", "release"]  # fmt: skip
    rows = []
    for site in [*sorted(final.releases), "pooled"]:
        m = final.metrics[site]
        std = float(m.get("noise_std", 0.0))
        if site == "pooled":
            how = "sum of the sites' histograms"
        elif std > 0:
            eps = final.epsilon.get(site)
            how = f"DP (noise std {std:.3g} per bin" + (f", ε={eps:.3g})" if eps else ")")
        else:
            how = "exact"
        rows.append(
            [site, str(int(m.get("n", 0))), *(format_interval(m[k]) for k in _FIGURES), how]
        )
    rows += [
        [site, "", "-", "-", "-", "-", "-", "none (metrics withheld)"] for site in final.withheld
    ]
    heading = f"Final round ({final.round}): discrimination and calibration"
    note = (
        "From the score histograms each site released (counts per bin and class, never a "
        "score), as its policy releases metrics. Intervals: 95 %, "
        f"{final.interval_method}. Threshold of the accuracy: {final.threshold:g}."
    )
    return heading, note, columns, rows


def _roc_points(r: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    pos = np.clip(np.asarray(r["pos"], float), 0, None)
    neg = np.clip(np.asarray(r["neg"], float), 0, None)
    tp = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])
    fp = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])
    return fp / max(neg.sum(), 1e-9), tp / max(pos.sum(), 1e-9)


def _calibration_points(r: Mapping[str, Any], groups: int = 10) -> tuple[np.ndarray, np.ndarray]:
    pos = np.clip(np.asarray(r["pos"], float), 0, None)
    neg = np.clip(np.asarray(r["neg"], float), 0, None)
    centre = (np.arange(pos.size) + 0.5) / pos.size
    idx = np.minimum(np.arange(pos.size) * groups // pos.size, groups - 1)
    p, n, s = (np.bincount(idx, w, minlength=groups) for w in (pos, neg, (pos + neg) * centre))
    keep = p + n >= 1
    return s[keep] / (p + n)[keep], p[keep] / (p + n)[keep]


def roc_calibration_plots(
    releases: Mapping[str, Mapping[str, Any]],
    metrics: Mapping[str, Mapping[str, Any]],
    *,
    pooled: bool = True,
    labels: Mapping[str, str] | None = None,
    titles: Mapping[str, str] | None = None,
) -> dict[str, bytes]:
    """ROC and calibration curves per site and pooled, from released score histograms.

    Parameters
    ----------
    releases : mapping
        Site -> its released histograms (:func:`fedhealth.evaluation.histograms.release`).
        The curves of several studies can share a figure: pass each study's site under
        its own key (e.g. the held-out centre of each leave-one-centre-out fold).
    metrics : mapping
        :func:`fedhealth.evaluation.metrics.derive` of them, by the same keys (the AUROC in
        the ROC legend; ``"pooled"`` only when ``pooled``).
    pooled : bool
        Also draw the curve of the sites' summed histograms (thick, black). Leave it out
        when the curves belong to different models, where a pooled curve means nothing.
    labels : mapping, optional
        Legend label by key (default: the key); the ROC legend adds the AUROC.
    titles : mapping, optional
        Figure title under ``"roc"`` and/or ``"calibration"`` (default: none).

    Returns
    -------
    dict
        PNG bytes under ``"roc"`` and ``"calibration"``. The pooled curve sums the sites'
        histograms on their common grid (:func:`~fedhealth.evaluation.metrics.pooled_bins`).
    """
    from fedhealth.evaluation.metrics import pooled_histograms

    curves: dict[str, Mapping[str, Any]] = dict(sorted(releases.items()))
    if pooled:
        curves["pooled"] = pooled_histograms(releases)
    names = dict(labels or {})
    out = {}
    for kind, draw, xl, yl in (
        ("roc", _roc_points, "1 - specificity", "sensitivity"),
        ("calibration", _calibration_points, "mean predicted probability", "observed"),
    ):
        fig, ax = plt.subplots(figsize=(4.8, 4.8))
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
        for site, r in curves.items():
            x, y = draw(r)
            label = names.get(site, site)
            if kind == "roc":
                label += f" (AUROC {metrics[site]['auroc']['value']:.3f})"
            style: dict[str, Any] = {"linewidth": 2.5, "color": "black"} if site == "pooled" else {}
            ax.plot(x, y, marker="." if kind != "roc" else None, label=label, **style)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        if titles and kind in titles:
            ax.set_title(titles[kind], fontsize=9)
        ax.legend(fontsize=8)
        out[kind] = _png(fig)
    return out


def validation_plots(result: ValidationResult, folder: Path) -> list[Path]:
    """ROC and calibration curves per site and pooled, from the released histograms."""
    out = []
    for kind, png in roc_calibration_plots(result.releases, result.metrics).items():
        path = folder / f"{kind}.png"
        path.write_bytes(png)
        out.append(path)
    return out
