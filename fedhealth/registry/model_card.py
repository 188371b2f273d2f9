"""A model card for every registered global model: what it is, from where, how good."""

from __future__ import annotations

from typing import Any


def render_model_card(p: dict[str, Any]) -> str:
    """Markdown model card from a provenance dict (see ``registry.publish``).

    Parameters
    ----------
    p : dict
        Provenance: name, experiment, task, input layout, sites, rounds, strategy,
        metrics, privacy, config hash, fedhealth version.
    """
    lines = [
        f"# {p['registered_model']} — global model",
        "",
        f"Trained by fedhealth {p['fedhealth_version']} in experiment `{p['experiment']}` "
        f"(MLflow run `{p['run_id']}`), config hash `{p['config_hash']}`.",
        "",
        "## Task",
        "",
        f"- kind: {p['task']['kind']}, dataset `{p['task']['dataset']}`, "
        f"{p['task']['num_classes']} classes",
        f"- model: `{p['model']}` ({p['n_parameters']:,} parameters, GroupNorm/LayerNorm only)",
        "",
        "## Input layout",
        "",
        p["input_layout"],
        "",
        "## Federation",
        "",
        f"- sites: {', '.join(p['sites'])}",
        f"- rounds: {p['rounds']}, strategy: `{p['strategy']}`, seed {p['seed']}",
        f"- privacy: {p.get('privacy', 'differential privacy off; encryption off')}",
        "",
        "## Metrics (final round, on each site's held-out test split)",
        "",
        "| site | test examples | accuracy | loss |",
        "|---|---|---|---|",
    ]
    for site, m in sorted(p["site_metrics"].items()):
        lines.append(
            f"| {site} | {int(m.get('num-examples', 0))} | {m.get('accuracy', float('nan')):.4f} "
            f"| {m.get('loss', float('nan')):.4f} |"
        )
    g = p["global_metrics"]
    lines += [
        f"| **all (weighted by examples)** | {int(g.get('num-examples', 0))} | "
        f"{g.get('accuracy', float('nan')):.4f} | {g.get('loss', float('nan')):.4f} |",
        f"| **mean over sites** | | {g.get('accuracy_site_mean', float('nan')):.4f} | |",
        "",
        "Raw data never left the sites: only model updates, counts and metrics did.",
        "",
    ]
    return "\n".join(lines)
