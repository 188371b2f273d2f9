"""Results of an analysis: a terminal table (Rich) and an MLflow run with artifacts.

Artifacts: ``result.json`` (everything pooled, per-site values, ε per site), one CSV
per query, and PNG plots -- histograms (with 95 % bars), survival curves with their
bands, and a per-site missingness chart. Per-site ε of the analysis (and the
dataset's lifetime ε after it, from each site's ledger) are logged as metrics.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


def _cell_labels(res: dict[str, Any]) -> list[str]:
    labels = res["labels"]
    kind = res["kind"]
    if kind == "count":
        if not labels["by"]:
            return ["all"]
        combos = np.array(np.meshgrid(*labels["levels"], indexing="ij"), dtype=object)
        combos = combos.reshape(len(labels["by"]), -1).T
        return [", ".join(f"{c}={v}" for c, v in zip(labels["by"], row, strict=True))
                for row in combos]  # fmt: skip
    if kind in ("histogram", "quantiles"):
        e = labels["edges"]
        return [f"[{e[i]:g}, {e[i + 1]:g})" for i in range(len(e) - 1)]
    if kind == "missingness":
        return list(labels["columns"])
    return []


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per released number: query, item, estimate, 95 % bounds, interval kind."""
    out = []
    for name, res in result["queries"].items():
        if "suppressed" in res:
            out.append({"query": name, "item": "(withheld)", "estimate": None,
                        "lower": None, "upper": None, "interval": res["suppressed"]})  # fmt: skip
            continue
        kind = res["kind"]
        items: Iterable[tuple[str, Any, Any, Any]]
        if kind in ("count", "histogram", "missingness"):
            items = zip(_cell_labels(res), res["estimate"], res["lower"], res["upper"], strict=True)
        elif kind == "quantiles":
            items = zip([f"q{p:g}" for p in res["probs"]], res["estimate"], res["lower"],
                        res["upper"], strict=True)  # fmt: skip
        elif kind == "mean":
            est = res["estimate"]
            items = [("mean", est["mean"], res["lower"]["mean"], res["upper"]["mean"]),
                     ("std", est["std"], res["lower"]["std"], res["upper"]["std"])]  # fmt: skip
        else:
            items = [
                (f"{g} S(t={t:g})", s, lo, hi)
                for g, ss, ll, hh in zip(res["groups"], res["estimate"], res["lower"],
                                         res["upper"], strict=True)
                for t, s, lo, hi in zip(res["grid"], ss, ll, hh, strict=True)
            ]  # fmt: skip
        for item, est, lo, hi in items:
            out.append({"query": name, "item": item, "estimate": est, "lower": lo, "upper": hi,
                        "interval": res["interval"]})  # fmt: skip
    return out


def render(result: dict[str, Any], console: Console | None = None) -> None:
    """Print the consortium answers and the per-site ε as Rich tables.

    Parameters
    ----------
    result : dict
        :func:`~fedhealth.analytics.pooling.pool_analysis` output.
    console : rich.console.Console, optional
    """
    console = console or Console()
    t = Table(title=escape(f"analysis {result['analysis']} on {result['dataset']}"))
    for col in ("query", "item", "estimate", "95 % interval", "covers"):
        t.add_column(col)
    for r in rows(result):
        digits = 3 if r["query"].startswith(("km", "missingness")) or "S(t=" in r["item"] else 1
        if r["estimate"] is None:
            t.add_row(escape(r["query"]), r["item"], "", "", escape(r["interval"]))
            continue
        t.add_row(
            escape(r["query"]),
            escape(str(r["item"])),
            _fmt(r["estimate"], digits),
            f"{_fmt(r['lower'], digits)} – {_fmt(r['upper'], digits)}",
            escape(r["interval"]),
        )
    console.print(t)
    s = Table(title=f"privacy per site (δ = {result['delta']:g} each)")
    for col in ("site", "ε this analysis", "ε analysis, all runs", "ε dataset lifetime"):
        s.add_column(col)
    for site, eps in result["epsilon_per_site"].items():
        s.add_row(
            escape(site),
            f"{eps:.3f}",
            f"{result['epsilon_analysis_total_per_site'][site]:.3f}",
            f"{result['epsilon_dataset_lifetime_per_site'][site]:.3f}",
        )
    for site, why in result.get("refused", {}).items():
        s.add_row(escape(site), "refused", escape(why["rule"]), "")
    console.print(s)


def write_artifacts(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``result.json``, one CSV per query and the PNG plots into ``out_dir``.

    Returns
    -------
    list of Path
        The files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "result.json"]
    written[0].write_text(json.dumps(result, indent=2, sort_keys=True))
    table = rows(result)
    for name in result["queries"]:
        path = out_dir / f"{name}.csv"
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, ["query", "item", "estimate", "lower", "upper", "interval"])
            w.writeheader()
            w.writerows(r for r in table if r["query"] == name)
        written.append(path)
    for name, res in result["queries"].items():
        if "suppressed" in res:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        if res["kind"] in ("histogram", "quantiles"):
            e = np.asarray(res["labels"]["edges"])
            counts = (
                np.asarray(res["estimate"])
                if res["kind"] == "histogram"
                else np.maximum(np.sum(list(res["per_site"].values()), axis=0), 0)
            )
            ax.bar(e[:-1], counts, width=np.diff(e), align="edge", alpha=0.7, edgecolor="k")
            if res["kind"] == "histogram":
                mid = (e[:-1] + e[1:]) / 2
                lo, hi = np.asarray(res["lower"]), np.asarray(res["upper"])
                ax.errorbar(mid, counts, yerr=[counts - lo, hi - counts], fmt="none", c="k")
            else:
                for p, q in zip(res["probs"], res["estimate"], strict=True):
                    ax.axvline(q, ls="--", c="C3")
                    ax.text(q, ax.get_ylim()[1] * 0.9, f"q{p:g}", color="C3")
            ax.set_ylabel("records (noisy, pooled)")
            ax.set_xlabel(name.split("-", 1)[-1])
        elif res["kind"] == "kaplan_meier":
            grid = [0.0, *res["grid"]]
            for g, s, lo, hi in zip(res["groups"], res["estimate"], res["lower"], res["upper"],
                                    strict=True):  # fmt: skip
                line = ax.step(grid, [1.0, *s], where="post", label=str(g))[0]
                ax.fill_between(grid, [1.0, *lo], [1.0, *hi], step="post", alpha=0.2,
                                color=line.get_color())  # fmt: skip
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("time")
            ax.set_ylabel("survival (95 % band: Greenwood + noise)")
            ax.legend()
        elif res["kind"] == "missingness":
            cols = res["labels"]["columns"]
            sites = list(res["per_site"])
            width = 0.8 / max(len(sites), 1)
            for i, site in enumerate(sites):
                v = np.asarray(res["per_site"][site])
                share = np.clip(np.maximum(v[1:], 0) / max(v[0], 1.0), 0, 1)
                ax.bar(np.arange(len(cols)) + i * width, share, width, label=site)
            ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, cols)
            ax.set_ylabel("share missing (noisy, per site)")
            ax.legend(fontsize="small")
        else:
            plt.close(fig)
            continue
        ax.set_title(name)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def log_to_mlflow(result: dict[str, Any], tracking_uri: str | None = None,
                  experiment: str | None = None,
                  tags: dict[str, str] | None = None) -> str:  # fmt: skip
    """Record the analysis as an MLflow run: params, per-site ε metrics, artifacts.

    Parameters
    ----------
    result : dict
        The pooled result.
    tracking_uri : str, optional
        Default: the project's SQLite store in ``./workspace/mlflow``.
    experiment : str, optional
        MLflow experiment; default: the analysis name.
    tags : dict, optional
        Extra run tags (a deployed run: ``fedhealth.flwr_run_id``, so that the submitting
        command finds the run).

    Returns
    -------
    str
        The run id.
    """
    import mlflow

    from fedhealth.registry.store import default_tracking_uri, ensure_experiment, use_store

    uri = tracking_uri or default_tracking_uri()
    client = use_store(uri)
    exp_id = ensure_experiment(client, experiment or result["analysis"], uri)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"analysis-{result['analysis']}") as run:
        mlflow.set_tags({"fedhealth.kind": "analysis", "fedhealth.spec_hash": result["spec_hash"],
                         **(tags or {})})  # fmt: skip
        mlflow.log_params({
            "analysis": result["analysis"],
            "dataset": result["dataset"],
            "delta": result["delta"],
            "min_sites": result["min_sites"],
            "sites": ",".join(result["sites"]),
            "refused": ",".join(result.get("refused", {})) or "none",
        })  # fmt: skip
        for site, eps in result["epsilon_per_site"].items():
            mlflow.log_metric(f"epsilon.{site}", eps)
            mlflow.log_metric(
                f"epsilon_dataset_lifetime.{site}",
                result["epsilon_dataset_lifetime_per_site"][site],
            )
        with tempfile.TemporaryDirectory() as tmp:
            write_artifacts(result, Path(tmp))
            mlflow.log_artifacts(tmp)
        return run.info.run_id
