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
        "## Train/test split",
        "",
        p.get("split_rule", "not recorded"),
        "",
        "## Federation",
        "",
        f"- sites: {', '.join(p['sites'])}",
        f"- rounds: {p['rounds']}, strategy: `{p['strategy']}`, seed {p['seed']}",
        f"- differential privacy: {p.get('dp_report', {}).get('description', 'off')}",
        f"- encryption: {p.get('he_params', 'on') if p.get('he') == 'on' else 'off'}",
        f"- shared statistics: {p.get('statistics', 'none shared')}",
        "",
        *_privacy_section(p.get("dp_report") or {}),
        *_encryption_section(p),
        "## Metrics (final round, on each site's held-out test split)",
        "",
        "| site | test examples | accuracy | loss |",
        "|---|---|---|---|",
    ]
    for site, m in sorted(p["site_metrics"].items()):
        if "accuracy" not in m:  # the site's policy withheld its metrics
            lines.append(f"| {site} | {int(m.get('num-examples', 0))} | withheld | withheld |")
            continue
        noisy = "±" if "accuracy-noise-std" in m else ""
        lines.append(
            f"| {site} | {int(m.get('num-examples', 0))} | "
            f"{noisy}{m.get('accuracy', float('nan')):.4f} "
            f"| {noisy}{m.get('loss', float('nan')):.4f} |"
        )
    g = p["global_metrics"]
    lines += [
        f"| **all (weighted by examples)** | {int(g.get('num-examples', 0))} | "
        f"{g.get('accuracy', float('nan')):.4f} | {g.get('loss', float('nan')):.4f} |",
        f"| **mean over sites** | | {g.get('accuracy_site_mean', float('nan')):.4f} | |",
        "",
        "Raw data never left the sites: only model updates, counts and metrics did. "
        "± marks a metric a site released with Gaussian noise charged to its privacy ledger "
        "(its policy's `release_metrics`); the global rows average those noisy values.",
        f"- metrics release: {p.get('metrics_release', 'exact')}",
        "",
    ]
    return "\n".join(lines)


def split_rule(task: dict[str, Any]) -> str:
    """How every site split its rows into training and test sets, in words a consumer can
    reproduce (``fedhealth.data.splits.train_test_split_indices``).

    Parameters
    ----------
    task : dict
        The experiment's ``[task]`` section (``test_fraction``, ``split_seed``, ``kind``).
    """
    frac, seed = task["test_fraction"], task["split_seed"]
    rows = (
        "the rows left after the schema's missing-value policy (under `drop`, rows with a "
        "missing value in a used column are removed first), in file order"
        if task["kind"] == "tabular"
        else "the readable labelled images, sorted by file name"
    )
    return (
        f"Each site splits {rows}, on its own: the test set is ceil({frac} × n) rows, drawn "
        f"as scikit-learn's `train_test_split(X, y, test_size={frac}, random_state={seed}, "
        "shuffle=True, stratify=y)` does (the same rows); stratified by label unless a class "
        "has fewer than 3 rows or either set would be smaller than the number of classes, "
        "then a plain shuffle with the same seed. The accuracies below are on each site's "
        "test rows; the model was trained on the rest."
    )


def _eps(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _privacy_section(dp: dict[str, Any]) -> list[str]:
    """The model card's differential-privacy section (empty when nothing was charged)."""
    if dp.get("mode", "off") == "off":
        if not dp.get("sites"):
            return []
        lines = ["## Differential privacy", "", f"{dp['description']}.", ""]
        lines += ["| site | ε (cumulative, this experiment) |", "|---|---|"]
        lines += [f"| {k} | {_eps(v.get('epsilon'))} |" for k, v in sorted(dp["sites"].items())]
        return [*lines, "", _COUNTED, ""]
    lines = [
        "## Differential privacy",
        "",
        f"{dp['description']}.",
        "",
    ]
    if dp["mode"] == "site":
        lines += [
            f"Site-level ε of the released global model (each whole hospital protected, "
            f"accounted by the coordinator): **{_eps(dp.get('site_level_epsilon'))}** at "
            f"δ={dp['delta']:g}. Each site's ε below is what its own ledger charged for its "
            "single noisy update.",
            "",
        ]
    lines += [
        "| site | ε (cumulative, this experiment) | noise multiplier | sample rate | "
        "DP steps | rounds | per-sample-gradient path |",
        "|---|---|---|---|---|---|---|",
    ]
    for site, v in sorted(dp.get("sites", {}).items()):
        lines.append(
            f"| {site} | {_eps(v.get('epsilon'))} | {v.get('noise-multiplier', 0):.4g} | "
            f"{v.get('sample-rate', 0):.4g} | {v.get('dp-steps', 0)} | {v.get('rounds', 0)} | "
            f"{v.get('dp-path') or '-'} |"
        )
    counted = (
        "every local DP-SGD step of every round the site ran (empty Poisson batches included)"
        if dp["mode"] == "record"
        else "every noisy update the site released"
    )
    lines += [
        "",
        f"Each site's ε counts {counted}, composed over every run of this experiment at that "
        "site, and was charged to the site's privacy ledger before its update left the site.",
        "",
        _COUNTED,
        "",
    ]
    return lines


#: What every site's ε in the model card includes, and what it leaves out.
_COUNTED = (
    "The ε per site is the largest the site reported after any release of this experiment, "
    "so it includes every noisy release it charged to its ledger: DP-SGD steps, evaluation "
    'metrics under `release_metrics = "dp"`, consortium statistics and score histograms. '
    'Not covered: what a site\'s policy released exactly (`release_metrics = "exact"`) and '
    "the number of records in each site's splits."
)


def _encryption_section(p: dict[str, Any]) -> list[str]:
    """The model card's encrypted-aggregation section (empty when HE was off)."""
    if p.get("he") != "on":
        return []
    return [
        "## Encrypted aggregation",
        "",
        "Every round's site updates were CKKS-encrypted and signed at the sites "
        f"({p['he_params']}; consortium `{p.get('he_consortium', '?')}`). "
        "The coordinator held no decryption key: "
        "it added ciphertexts, and a quorum of sites decrypted only the weighted sum of at "
        "least `min_sites` sites' updates. No single site's update was ever seen in plaintext "
        "outside that site. See docs/security.md.",
        "",
        *_he_rounds_table(p),
    ]


def _he_rounds_table(p: dict[str, Any]) -> list[str]:
    """Per round: whose encrypted updates the decrypted sum held, and who decrypted it."""
    rounds = p.get("he_rounds") or {}
    if not rounds:
        return []
    lines = [
        f"Round binding `{p.get('he_experiment_id', '?')}`.",
        "",
        "| round | sum of the encrypted updates of | decrypted by |",
        "|---|---|---|",
    ]
    for r, h in sorted(rounds.items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"| {r} | {', '.join(h.get('contributors', []))} | "
            f"{', '.join(h.get('decrypted_by', []))} |"
        )
    return [*lines, ""]


VALIDATION_HEADER = "## External validation"
_SHOWN = (
    ("auroc", "AUROC"),
    ("auprc", "AUPRC"),
    ("accuracy", "accuracy"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("brier", "Brier"),
    ("calibration_intercept", "cal. intercept"),
    ("calibration_slope", "cal. slope"),
)


def _ci(m: dict[str, float]) -> str:
    from fedhealth.evaluation.metrics import format_interval

    return format_interval(m)  # "-" where undefined (e.g. calibration under separation)


def render_validation(index: int, v: dict[str, Any]) -> str:
    """One validation's entry of the model card (appended; earlier entries stay as written).

    Parameters
    ----------
    index : int
        The validation's number (1 for the first of this version).
    v : dict
        ``when`` (ISO time), ``run_id``, ``experiment``, ``split``, ``threshold``,
        ``interval_method``, ``metrics`` (per site and ``pooled``, from
        :func:`fedhealth.evaluation.metrics.derive`), ``epsilon`` (per site, when charged)
        and ``refused`` (site -> rule).
    """
    metrics = v["metrics"]
    sites = [s for s in metrics if s != "pooled"]
    split = "each site's pinned test split" if v["split"] == "test" else "every record"
    lines = [
        f"### Validation {index}: {', '.join(sites)} ({v['when']})",
        "",
        f"Evaluation-only study `{v['experiment']}` (MLflow run `{v['run_id']}`) on {split}. "
        "The sites released score histograms per class (no prediction per patient); the "
        f"figures below are derived from them. Threshold {v['threshold']:g}; 95 % intervals: "
        f"{v['interval_method']}.",
        "",
        "| site | n | positives | " + " | ".join(label for _, label in _SHOWN) + " |",
        "|---|---|---|" + "---|" * len(_SHOWN),
    ]
    for site in [*sorted(sites), "pooled"]:
        m = metrics[site]
        noisy = " (DP)" if m.get("noise_std") else ""
        name = "**pooled**" if site == "pooled" else site
        lines.append(
            f"| {name}{noisy} | {m['n']} | {m['positives']:.0f} | "
            + " | ".join(_ci(m[key]) for key, _ in _SHOWN)
            + " |"
        )
    eps = v.get("epsilon") or {}
    if eps:
        lines += [
            "",
            "(DP): released with Gaussian noise charged to the site's ledger; ε of the study "
            "after it: " + ", ".join(f"{s} {e:.3g}" for s, e in sorted(eps.items())) + ".",
        ]
    refused = v.get("refused") or {}
    if refused:
        lines += ["", "Refused: " + ", ".join(f"{s} ({r})" for s, r in sorted(refused.items()))]
    return "\n".join([*lines, ""])


def append_validation(card: str, entry: str) -> str:
    """The card with ``entry`` appended under its External validation section."""
    card = card.rstrip("\n")
    if VALIDATION_HEADER not in card:
        card += f"\n\n{VALIDATION_HEADER}\n"
    return f"{card}\n\n{entry}"
