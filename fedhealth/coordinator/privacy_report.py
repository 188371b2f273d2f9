"""The coordinator's account of an experiment's differential privacy.

Record mode: each site accounts its own ε (it alone knows its data size and
what it ran) and reports it with every update; the coordinator records what the
sites report, per round and cumulative, and never needs their data.

Site mode: the coordinator runs the site-level accountant. Each round the
aggregate carries the noise shares of the ``m`` sites that replied, i.e. noise
multiplier ``σ·sqrt(m/k)`` for ``k`` expected sites
(:func:`~fedhealth.privacy.dp.site_level.effective_noise_multiplier`); rounds
compose with sample rate 1 (no amplification by sampling is claimed: Flower's
site sampling is neither independent nor secret). This ε protects each whole
hospital in the released global models; while updates travel in the clear the
coordinator itself sees each site's single noise share, which each site
accounts for in its own ledger (and reports as its ``epsilon``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from flwr.app import Message

from fedhealth.config.experiment import ExperimentConfig
from fedhealth.privacy.dp.accounting import epsilon_for_history
from fedhealth.privacy.dp.site_level import effective_noise_multiplier
from fedhealth.protocol import Metric, Record, SiteKey

#: Privacy metrics a site adds to its training reply (``PrivacyGuard.charge``).
REPLY_METRICS = (
    Metric.EPSILON,
    Metric.EPSILON_ROUND,
    Metric.DP_STEPS,
    Metric.NOISE_MULTIPLIER,
    Metric.SAMPLE_RATE,
    Metric.DELTA,
)


class PrivacyReport:
    """Per-site ε as the sites report it, and the site-level ε the coordinator accounts.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (its ``[privacy.dp]`` section).
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.dp = cfg.dp_spec().model_dump(mode="json")
        self.sites: dict[str, dict[str, Any]] = {}
        self.site_level_history: list[tuple[float, float, int]] = []
        self.site_level_epsilon: float | None = None
        # The largest cumulative ε each site reported in any reply (training, evaluation,
        # statistics, final histograms): what its ledger charged this experiment in all.
        self.charged: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        """Whether the experiment trains with DP."""
        return bool(self.dp["enabled"])

    @staticmethod
    def training_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
        """A reply's metrics without the privacy ones (those are logged on their own)."""
        return {k: v for k, v in metrics.items() if k not in REPLY_METRICS}

    def observe_charges(self, replies: Iterable[Message]) -> None:
        """Record the cumulative ε each reply reports (any message kind).

        A site reports its experiment's ε after every charged release, so the largest value
        seen is everything its ledger charged for this experiment: DP-SGD, noisy metrics,
        statistics and score histograms.
        """
        for msg in replies:
            if Record.METRICS not in msg.content.metric_records:
                continue
            eps = msg.content.metric_records[Record.METRICS].get(Metric.EPSILON)
            if isinstance(eps, (int, float)) and eps == eps:  # not NaN
                site = str(msg.content[Record.SITE][SiteKey.NAME])
                self.charged[site] = max(self.charged.get(site, 0.0), float(eps))

    def observe(self, round_: int, replies: Iterable[Message]) -> dict[str, float]:
        """Record one round's training replies; return the MLflow metrics to log.

        Parameters
        ----------
        round_ : int
            The round.
        replies : iterable of Message
            The round's successful training replies.

        Returns
        -------
        dict
            ``site/<name>/epsilon`` (cumulative for the experiment at that site),
            ``site/<name>/epsilon-round``, ``site/<name>/dp-steps``,
            ``site/<name>/noise-multiplier`` and, in site mode,
            ``global/site_level_epsilon``.
        """
        out: dict[str, float] = {}
        replies = list(replies)
        self.observe_charges(replies)
        if not self.enabled:
            return out
        reporting = 0
        for msg in replies:
            m: dict[str, Any] = dict(msg.content[Record.METRICS])
            if Metric.EPSILON not in m:
                continue
            reporting += 1
            site = str(msg.content[Record.SITE][SiteKey.NAME])
            s = self.sites.setdefault(site, {Metric.DP_STEPS: 0, "rounds": 0})
            s["rounds"] += 1
            s[Metric.DP_STEPS] += int(m[Metric.DP_STEPS])
            s["last-round"] = round_
            for key in (Metric.EPSILON, Metric.NOISE_MULTIPLIER, Metric.SAMPLE_RATE, Metric.DELTA):
                s[key] = float(m[key])
            s[SiteKey.DP_PATH] = str(msg.content[Record.SITE].get(SiteKey.DP_PATH, ""))
            for key in REPLY_METRICS[:4]:  # epsilon, epsilon-round, dp-steps, noise-multiplier
                out[f"site/{site}/{key}"] = float(m[key])
        if self.dp["mode"] == "site":
            sigma = effective_noise_multiplier(
                float(self.dp["site_noise_multiplier"]), int(self.dp["expected_sites"]), reporting
            )
            self.site_level_history.append((sigma, 1.0, 1))
            self.site_level_epsilon = epsilon_for_history(
                self.site_level_history, float(self.dp["delta"]), str(self.dp["accountant"])
            )
            out["global/site_level_epsilon"] = self.site_level_epsilon
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: each site's reported spend and the site-level history.

        JSON-serialisable; saved with every round checkpoint
        (:mod:`fedhealth.coordinator.checkpoint`).
        """
        return {
            "sites": {k: dict(v) for k, v in self.sites.items()},
            "site_level_history": [list(h) for h in self.site_level_history],
            "charged": dict(self.charged),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and recompute the site-level ε from the history.

        The site-level ε is recomputed by the accountant over the restored history rather
        than read back, so a resumed run reports what the accountant says of the rounds
        that were released, not a stored number.
        """
        self.sites = {k: dict(v) for k, v in state.get("sites", {}).items()}
        self.charged = {k: float(v) for k, v in state.get("charged", {}).items()}
        self.site_level_history = [
            (float(s), float(q), int(n)) for s, q, n in state.get("site_level_history", [])
        ]
        self.site_level_epsilon = (
            epsilon_for_history(
                self.site_level_history, float(self.dp["delta"]), str(self.dp["accountant"])
            )
            if self.site_level_history
            else None
        )

    def describe(self) -> str:
        """One line for model cards and summaries."""
        if not self.enabled:
            if self.charged:
                return (
                    "no DP-SGD in training; the sites' noisy releases (metrics, statistics, "
                    "score histograms) were charged to their ledgers"
                )
            return "differential privacy off"
        d = self.dp
        if d["mode"] == "record":
            noise = (
                f"noise multiplier {d['noise_multiplier']:g}"
                if d["noise_multiplier"] is not None
                else f"noise calibrated per site to ε={d['target_epsilon']:g} over the plan"
            )
            return (
                f"record-level DP-SGD (Opacus, Poisson sampling), {noise}, per-sample clipping "
                f"norm {d['max_grad_norm']:g}, δ={d['delta']:g}, {d['accountant']} accountant"
            )
        eps = (
            ""
            if self.site_level_epsilon is None
            else f", site-level ε={self.site_level_epsilon:.4g}"
        )
        return (
            f"site-level DP: each site clips its update to norm {d['clip_norm']:g} and adds its "
            f"share of noise multiplier {d['site_noise_multiplier']:g} over "
            f"{d['expected_sites']} expected sites, δ={d['delta']:g}, {d['accountant']} "
            f"accountant{eps}"
        )

    def summary(self) -> dict[str, Any]:
        """What the run spent: mode, accountant, δ and each site's final ε.

        Returns
        -------
        dict
            ``mode`` ("off", "record" or "site"), ``description``, ``accountant``,
            ``delta``, ``sites`` (name -> epsilon, noise-multiplier, sample-rate,
            dp-steps, rounds, dp-path) and ``site_level_epsilon`` (site mode).
        """
        sites: dict[str, dict[str, Any]] = {k: dict(v) for k, v in sorted(self.sites.items())}
        for site, eps in self.charged.items():
            entry = sites.setdefault(site, {})
            entry[Metric.EPSILON] = max(float(entry.get(Metric.EPSILON, 0.0)), eps)
        if not self.enabled:
            return {
                "mode": "off",
                "description": self.describe(),
                "sites": dict(sorted(sites.items())),
                "delta": float(self.dp["delta"]),
            }
        return {
            "mode": self.dp["mode"],
            "description": self.describe(),
            "accountant": self.dp["accountant"],
            "delta": float(self.dp["delta"]),
            "max_grad_norm": self.dp["max_grad_norm"] if self.dp["mode"] == "record" else None,
            "sites": dict(sorted(sites.items())),
            "site_level_epsilon": self.site_level_epsilon,
        }

    def provenance(self) -> dict[str, Any]:
        """Provenance entries of the registered model version (tags and model card)."""
        summary = self.summary()
        return {"dp": summary["mode"], "dp_report": summary, "dp_tags": self.tags()}

    def tags(self) -> dict[str, str]:
        """Registered-model-version tags: DP mode, accountant, δ, noise, each site's ε."""
        s = self.summary()
        if s["mode"] == "off":
            charged = {f"epsilon/{k}": f"{v['epsilon']:.4g}" for k, v in s["sites"].items()}
            return {"dp": "off", **charged}
        tags = {
            "dp": s["mode"],
            "dp_accountant": s["accountant"],
            "dp_delta": f"{s['delta']:g}",
        }
        sites = s["sites"]
        noises = sorted({f"{v['noise-multiplier']:.4g}" for v in sites.values()})
        tags["dp_noise_multiplier"] = (
            ",".join(f"{k}={v['noise-multiplier']:.4g}" for k, v in sites.items())
            if len(noises) > 1
            else (noises[0] if noises else "")
        )
        if s["mode"] == "record":
            tags["dp_max_grad_norm"] = f"{s['max_grad_norm']:g}"
        else:
            tags["dp_clip_norm"] = f"{self.dp['clip_norm']:g}"
            tags["dp_site_noise_multiplier"] = f"{self.dp['site_noise_multiplier']:g}"
            if s["site_level_epsilon"] is not None:
                tags["epsilon_site_level"] = f"{s['site_level_epsilon']:.4g}"
        for site, v in sites.items():
            tags[f"epsilon/{site}"] = f"{v['epsilon']:.4g}"
        if sites:
            tags["epsilon_max"] = f"{max(v['epsilon'] for v in sites.values()):.4g}"
        return tags


def format_epsilon(eps: float | None) -> str:
    """ε for tables: 4 significant digits, ``-`` when unknown, ``∞`` when unbounded."""
    if eps is None:
        return "-"
    return "∞" if math.isinf(eps) else f"{eps:.4g}"
