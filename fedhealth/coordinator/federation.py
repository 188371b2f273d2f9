"""The coordinator's round loop, readable top to bottom.

Each round: the strategy samples sites and configures training; sites reply
with an update or a refusal; refusals are reported and the round goes on while
``min_sites`` replies hold; the replies are *prepared* for aggregation (the
plaintext path passes them through; encrypted aggregation replaces this step
with a ciphertext sum and a quorum decryption that yields one aggregate reply);
the strategy aggregates (FedAvg, FedAdam on the aggregate, ...); sites evaluate
the new global model; the round is logged to MLflow. At the end the global
model is registered as a new model version with its provenance.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedhealth import __version__
from fedhealth.config.experiment import ExperimentConfig
from fedhealth.coordinator.approvals import StudyGate
from fedhealth.coordinator.checkpoint import (
    ResumePoint,
    resume_point,
    save_evaluation,
    save_round,
)
from fedhealth.coordinator.encrypted_aggregation import EncryptedAggregation
from fedhealth.coordinator.exchange import send_and_receive
from fedhealth.coordinator.final_evaluation import (
    FinalEvaluation,
    record_final_evaluation,
    wants_histograms,
)
from fedhealth.coordinator.privacy_report import PrivacyReport
from fedhealth.coordinator.progress import Observer, notify
from fedhealth.coordinator.strategies import (
    build_strategy,
    load_strategy_state,
    strategy_state,
)
from fedhealth.errors import FederationError, FedHealthError
from fedhealth.models import build_model
from fedhealth.protocol import (
    SHARE_STATISTICS_RULE,
    Metric,
    NormStats,
    Record,
    Refusal,
    RoundConfig,
    SiteKey,
    StatsKey,
)
from fedhealth.registry.model_card import split_rule
from fedhealth.registry.recorder import RunRecorder
from fedhealth.registry.report import report_ui_url
from fedhealth.study import study_hash

if TYPE_CHECKING:
    from mlflow import MlflowClient


@dataclass
class RunSummary:
    """What a finished run produced, for the CLI's closing table."""

    experiment: str
    run_id: str | None
    registered_model: str | None
    version: str | None
    tracking_uri: str
    rounds: int
    global_metrics: dict[str, float] = field(default_factory=dict)
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    seconds: float = 0.0
    privacy: dict[str, Any] = field(default_factory=dict)  # PrivacyReport.summary()
    report: str | None = None  # URI of the run's HTML report artifact
    # Sites that declined the optional statistics query of a site-normalised run (their
    # policy does not share sums): not a refusal of the study, a note on the registered model.
    statistics_declined: list[str] = field(default_factory=list)
    report_url: str | None = None  # where a tracking server's web UI shows it
    # AUROC {"value", "low", "high"} per site and "pooled", from the final histograms.
    final_auroc: dict[str, dict[str, float]] = field(default_factory=dict)


def input_dim(cfg: ExperimentConfig) -> int:
    """Model input width: encoded feature count (tabular) or image channels."""
    if cfg.task.kind == "tabular":
        assert cfg.task.schema_ is not None  # validated: a tabular task has a schema
        return len(cfg.task.schema_.feature_names())
    return 1


def input_layout(cfg: ExperimentConfig, statistics: bool = True) -> str:
    """Documented input of the registered model's pyfunc (also in its model card).

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    statistics : bool
        Whether the registered model holds standardisation statistics.
    """
    task = cfg.task
    out = (
        f"Output: a DataFrame of class probabilities, one column per class "
        f"({task.num_classes}), rows summing to 1."
    )
    if task.normalisation == "none":
        norm = "none: the network takes the encoded values as they are."
    elif not statistics:
        norm = (
            f"{task.normalisation!r}, but too few sites shared their sums, so the model holds "
            'no statistics: pass params={\'statistics\': \'{"mean": [...], "std": '
            "[...]}'} (one value per encoded feature or channel) or predict refuses."
        )
    elif task.normalisation == "consortium":
        norm = "built in: the pooled mean/std of the sites' training splits (training used them)."
    else:
        norm = (
            "built in: the pooled mean/std of the sites' training splits. Sites trained on "
            "z-scores of their own training split; a consumer has no site, so the registered "
            "model standardises with the pooled statistics, and the accuracies below were "
            "measured by each site with exactly these statistics."
        )
    if task.kind == "tabular":
        schema = task.schema_
        assert schema is not None  # validated: a tabular task has a schema
        names = schema.feature_names()
        cats = "; ".join(f"{c}: {', '.join(map(str, v))}" for c, v in schema.categorical.items())
        missing = {
            "drop": "a row with a missing value gets NaN probabilities (the sites dropped "
            "such rows before splitting)",
            "error": "a missing value is an error naming the row and column",
            "mean": "a missing value is imputed with the pooled training mean (category "
            "frequencies for a categorical column)",
        }[schema.missing]
        return (
            "`mlflow.pyfunc.load_model(uri).predict(df)` with `df` a pandas DataFrame of raw "
            f"rows with the columns {', '.join(schema.numeric + list(schema.categorical))} "
            f"(other columns are ignored). Categorical columns as their raw values ({cats}); "
            "the model one-hot encodes them in this order"
            + (" without the first category" if schema.drop_first else "")
            + f". Missing values (NaN, None, `?` or empty) per the schema's policy "
            f"`{schema.missing}`: {missing}. Encoded features, in order: {', '.join(names)}. "
            f"Standardisation: {norm} {out}"
        )
    return (
        "`mlflow.pyfunc.load_model(uri).predict(df)` with `df` a pandas DataFrame with a "
        "column `path` of image files (DICOM, PNG or JPEG), read as the sites' readers do: "
        "DICOM modality LUT applied, MONOCHROME1 inverted, grey-scale, scaled to [0, 1], "
        f"resized to {task.image_size}x{task.image_size}. Standardisation: {norm} {out} "
        "The network alone: `load_model(uri).unwrap_python_model().network` (a torch module "
        f"on float32 tensors of shape (n, 1, {task.image_size}, {task.image_size}))."
    )


def _refusal(msg: Message) -> Refusal:
    return Refusal.decode(msg.error.reason, node=f"node {msg.metadata.src_node_id}")


def _site(msg: Message) -> str:
    return str(msg.content[Record.SITE][SiteKey.NAME])


class Federation:
    """Runs one experiment on a Grid (simulation or a real SuperLink).

    Parameters
    ----------
    cfg : ExperimentConfig
        The validated experiment.
    tracking_uri : str
        The MLflow store to record to.
    on_event : callable, optional
        Observer of progress events (:mod:`fedhealth.coordinator.progress`), e.g. a live
        display. The run's result is :meth:`run`'s return value.
    """

    def __init__(
        self, cfg: ExperimentConfig, tracking_uri: str, on_event: Observer | None = None
    ) -> None:
        self.cfg = cfg
        self.on_event = on_event
        self.spec = cfg.task_spec()  # built once; every request carries its canonical bytes
        self.tracking_uri = tracking_uri
        self.strategy = build_strategy(cfg)
        self.recorder = RunRecorder(cfg, tracking_uri)
        self.refusals: list[Refusal] = []
        self.statistics_declined: list[str] = []
        self._statistics_optional = False
        self.norm_stats: dict[str, Any] | None = None
        # Per site: ε, δ and σ of its DP release of the consortium statistics.
        self.statistics_dp: dict[str, dict[str, Any]] = {}
        self.run_tags: dict[str, str] = {}  # extra MLflow run tags (deployment: flwr run id)
        self.resume_from: str | None = None  # MLflow run id to continue (`run --resume`)
        self.privacy = PrivacyReport(cfg)  # per-site ε as reported; site-level ε accounted here
        # ROC and calibration of the final model, from the sites' released histograms.
        self.final_evaluation: FinalEvaluation | None = None
        # Encrypted aggregation (privacy.he): None when the experiment runs in plaintext.
        self.encryption = EncryptedAggregation.for_experiment(
            cfg, self.strategy, self.recorder, self._split
        )

    # -- helpers ------------------------------------------------------------------------------

    def _notify(self, kind: str, round_: int = 0, **data: Any) -> None:
        notify(self.on_event, kind, round_, **data)

    def _config(self, round_: int, score_histograms: bool = False) -> ConfigRecord:
        config = RoundConfig(
            spec=self.spec,
            server_round=round_,
            norm_stats=NormStats(**self.norm_stats) if self.norm_stats else None,
            # So each site's audit log can name the run, and through it the model
            # version, its round contributed to (`fedhealth site audit`).
            mlflow_run_id=self.recorder.run_id or "",
            registered_model=self.cfg.registered_model or "",
            score_histograms=score_histograms,
        )
        return ConfigRecord(config.to_record())

    def _split(self, round_: int, replies: Iterable[Message]) -> list[Message]:
        ok = []
        for msg in replies:
            if msg.has_error():
                ref = _refusal(msg)
                ref.round = round_
                if self._statistics_optional and ref.rule == SHARE_STATISTICS_RULE:
                    self.statistics_declined.append(ref.site)
                    self._notify("statistics-declined", round_, site=ref.site)
                    continue
                self.refusals.append(ref)
                self._notify(
                    "site-refused", round_, site=ref.site, rule=ref.rule, message=ref.message
                )
            else:
                ok.append(msg)
        # Sorting by site makes aggregation order, and so the float sums, reproducible.
        return sorted(ok, key=_site)

    def _well_formed_updates(
        self, round_: int, replies: list[Message], arrays: ArrayRecord
    ) -> list[Message]:
        """The plaintext replies that carry a usable update; each other one is a refusal
        (rule ``malformed-reply``) naming the site and what is wrong, so one site's bad reply
        cannot stop the round for the others."""
        weight_key = str(getattr(self.strategy, "weighted_by_key", Metric.NUM_EXAMPLES))
        shapes = {k: tuple(a.shape) for k, a in arrays.items()}
        ok = []
        for msg in replies:
            problem = _update_problem(msg, weight_key, shapes)
            if problem is None:
                ok.append(msg)
                continue
            try:
                site = _site(msg)
            except (KeyError, TypeError):
                site = f"node {msg.metadata.src_node_id}"
            ref = Refusal(site=site, rule="malformed-reply", message=problem, round=round_)
            self.refusals.append(ref)
            self._notify("site-refused", round_, site=site, rule=ref.rule, message=problem)
        return ok

    def _require(self, round_: int, ok: list[Message], what: str) -> None:
        need = self.cfg.experiment.min_sites
        if len(ok) < need:
            why = "; ".join(f"{r.site}: {r.message}" for r in self.refusals[-5:]) or "no reply"
            raise FederationError(
                f"round {round_} ({what}): only {len(ok)} site(s) answered but min_sites is "
                f"{need}. {why}"
            )

    def receive(self, grid: Grid, round_: int, msgs: Iterable[Message]) -> Iterable[Message]:
        """Send a round's training messages and collect the replies.

        With encryption on, each reply's ciphertexts are added to the running sum as it
        arrives (memory: one sum plus one reply) and refused contributions come back as
        error replies.
        """
        timeout = self.cfg.experiment.round_timeout
        if self.encryption is None:
            return send_and_receive(grid, msgs, timeout)
        return self.encryption.receive(grid, round_, msgs, timeout)

    def prepare_for_aggregation(
        self,
        round_: int,
        replies: list[Message],
        *,
        grid: Grid | None = None,
        arrays: ArrayRecord | None = None,
    ) -> list[Message]:
        """Hook between receiving replies and the strategy's aggregation.

        The plaintext path returns the replies unchanged. Encrypted aggregation asks a
        quorum of sites to decrypt the sum and returns one reply carrying the decrypted
        weighted mean (``grid`` and the round's global ``arrays`` are then required).
        """
        if self.encryption is None:
            return _common_metric_keys(replies)
        if grid is None or arrays is None:
            raise FederationError(f"round {round_}: encrypted aggregation needs the grid")
        return self.encryption.aggregate(grid, round_, arrays, replies)

    def admit_sites(self, grid: Grid) -> StudyGate:
        """Ask the sites whether they approved the study, wait within
        ``experiment.approval_timeout``; the returned grid lists only approved sites."""
        exp = self.cfg.experiment

        def report(ref: Refusal) -> None:
            self.refusals.append(ref)
            self._notify("site-refused", ref.round, site=ref.site, rule=ref.rule,
                         message=ref.message)  # fmt: skip

        gate = StudyGate(
            grid, self._config, exp.min_sites, exp.approval_timeout, exp.round_timeout, report
        )
        gate.wait_for_approvals(say=lambda m: self._notify("study-waiting", 0, message=m))
        return gate

    # -- state (checkpoints) ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the global arrays (see
        :mod:`fedhealth.coordinator.checkpoint`): ``strategy`` holds arrays, the rest JSON."""
        state: dict[str, Any] = {
            "norm_stats": self.norm_stats,
            "statistics_dp": self.statistics_dp,
            "refusals": [dataclasses.asdict(r) for r in self.refusals],
            "privacy": self.privacy.state_dict(),
            "strategy": strategy_state(self.strategy),
        }
        if self.encryption is not None:
            state["encryption"] = self.encryption.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        load_strategy_state(self.strategy, state.get("strategy", {}))
        self.norm_stats = state.get("norm_stats")
        self.statistics_dp = state.get("statistics_dp", {})
        self.refusals = [Refusal(**r) for r in state.get("refusals", [])]
        if "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])
        if self.encryption is not None and "encryption" in state:
            self.encryption.load_state_dict(state["encryption"])

    # -- phases -------------------------------------------------------------------------------

    def consortium_statistics(self, grid: Grid) -> None:
        """Federated mean/std: sites send noisy per-feature sums and counts, never values.

        Sites answer a study's statistics query once: a later run of the same study (same
        spec) reuses the statistics the first run recorded in MLflow.
        """
        study = self.spec.digest()
        earlier = self.recorder.earlier_statistics(study)
        if earlier is not None:
            self.norm_stats = earlier["norm_stats"]
            self.statistics_dp = earlier.get("statistics_dp", {})
            self._notify("statistics", 0, sites=sorted(self.statistics_dp), count=0)
            return
        node_ids = list(grid.get_node_ids())
        msgs = [
            Message(
                RecordDict({Record.CONFIG: self._config(0)}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in node_ids
        ]
        ok = self._split(0, send_and_receive(grid, msgs, self.cfg.experiment.round_timeout))
        self.privacy.observe_charges(ok)
        self._require(0, ok, "consortium statistics")
        count, s, ss = 0, None, None
        for msg in ok:
            stats = msg.content[Record.STATS]
            m = json.loads(str(stats[StatsKey.MOMENTS]))
            if StatsKey.DP in stats:  # the site's sums are noisy; how, and what it charged
                self.statistics_dp[_site(msg)] = json.loads(str(stats[StatsKey.DP]))
            count += m["count"]
            s = np.asarray(m["sum"]) if s is None else s + np.asarray(m["sum"])
            ss = np.asarray(m["sumsq"]) if ss is None else ss + np.asarray(m["sumsq"])
        assert s is not None and ss is not None  # _require: at least one site answered
        mean = s / count
        std = np.sqrt(np.maximum(ss / count - mean**2, 0.0))
        if self.statistics_dp:
            mean, std = _within_bounds(self.cfg, mean, std)
        self.norm_stats = {"mean": mean.tolist(), "std": np.maximum(std, 1e-6).tolist()}
        self.recorder.save_statistics(
            study, {"norm_stats": self.norm_stats, "statistics_dp": self.statistics_dp}
        )
        self._notify("statistics", 0, sites=[_site(m) for m in ok], count=count)

    def registry_statistics(self, grid: Grid) -> None:
        """Pooled statistics for a ``site``-normalised model's registered version.

        Sites train on their own z-scores; a consumer of the registered model has no site,
        so the model standardises with the pooled mean/std of the sites' training splits
        (the sums a site's ``share_statistics`` policy lets out, as for consortium
        normalisation) and sites evaluate with them. If too few sites share, the model is
        registered without statistics and its pyfunc asks the consumer for them.
        """
        self._statistics_optional = True
        try:
            self.consortium_statistics(grid)
        except FederationError:
            self.norm_stats = None
        finally:
            self._statistics_optional = False

    def train_round(self, grid: Grid, round_: int, arrays: ArrayRecord) -> ArrayRecord:
        """One round of training and aggregation; returns the new global arrays."""
        config = self._config(round_)
        if self.encryption is not None:
            self.encryption.announce(round_, arrays, config)  # round binding and fresh nonce
        msgs = list(self.strategy.configure_train(round_, arrays, config, grid))
        ok = self._split(round_, self.receive(grid, round_, msgs))
        if self.encryption is not None:
            # A cohort-bound round with a drop-out is announced again to the sites that
            # contributed (new cohort, fresh nonce), and they contribute again.
            again = self.encryption.reannounce(round_, arrays, msgs)
            if again:
                ok = self._split(round_, self.receive(grid, round_, again))
        if self.encryption is None:
            ok = self._well_formed_updates(round_, ok, arrays)
        self._require(round_, ok, "training")
        per_site = {_site(m): dict(m.content[Record.METRICS]) for m in ok}
        new_arrays, _ = self.strategy.aggregate_train(
            round_, self.prepare_for_aggregation(round_, ok, grid=grid, arrays=arrays)
        )
        if new_arrays is None:
            raise FederationError(f"round {round_}: the strategy produced no aggregate")
        strip = self.privacy.training_metrics
        train = {s: _prefix(strip(m), "train-") for s, m in per_site.items()}
        self.recorder.log_round(round_, {}, train)
        self.recorder.log_metrics(self.privacy.observe(round_, ok), round_)
        self._notify("train-done", round_, sites=per_site)
        return new_arrays

    def evaluate_round(self, grid: Grid, round_: int, arrays: ArrayRecord) -> tuple[dict, dict]:
        """Sites evaluate the global model on their test splits.

        In the final round of a binary task they also release score histograms (as their
        policy releases metrics): ROC and calibration per site and pooled for the run report
        (:mod:`fedhealth.coordinator.final_evaluation`).
        """
        final = wants_histograms(self.cfg.task.num_classes, round_, self.cfg.experiment.rounds)
        config = self._config(round_, score_histograms=final)
        msgs = self.strategy.configure_evaluate(round_, arrays, config, grid)
        ok = self._split(round_, send_and_receive(grid, msgs, self.cfg.experiment.round_timeout))
        per_site = {_site(m): dict(m.content[Record.METRICS]) for m in ok}
        self.privacy.observe_charges(ok)
        glob = aggregate_site_metrics(per_site)
        self.recorder.log_round(round_, glob, per_site)
        if final:
            self.final_evaluation = record_final_evaluation(self.recorder, round_, ok)
        self._notify("evaluate-done", round_, sites=per_site, global_metrics=glob)
        return glob, per_site

    # -- the run ------------------------------------------------------------------------------

    def published(self, round_: int, arrays: ArrayRecord) -> ArrayRecord:
        """The model evaluated after ``round_`` (and, after the last, registered).

        The round's global model ``arrays`` (what the next round trains from), unless the
        strategy publishes another: a strategy with a ``published_arrays(server_round,
        arrays)`` method returns it there, e.g. the mean of the last rounds' global models
        (``strategies/balanced_fedadam.py``, ``average_last``). Post-processing of
        aggregates the coordinator holds: no site sees or charges anything more.
        """
        hook = getattr(self.strategy, "published_arrays", None)
        if hook is None:
            return arrays
        return cast(ArrayRecord, hook(round_, arrays))

    def initial_model(self, run_id: str | None = None) -> torch.nn.Module:
        """The seeded initial global model.

        With ``run_id``, its weights are drawn from the experiment's seed *and* the run id:
        every run starts from its own global model (a resumed run reopens the same id, so
        the same one). Sites accept one contribution per (experiment, round, global model)
        under any run (docs/security.md), so a second run of the same experiment must not
        start from a model a site has already contributed from.
        """
        spec = self.spec
        seed = spec.seed
        if run_id:
            digest = hashlib.sha256(f"{spec.seed}:{run_id}".encode()).digest()
            seed = int.from_bytes(digest[:4], "big")
        return build_model(spec.model, input_dim(self.cfg), spec.task.num_classes, seed)

    def run(self, grid: Grid) -> RunSummary:
        """Run every round, then register the global model. Returns the summary."""
        t0 = time.time()
        cfg = self.cfg
        random.seed(cfg.experiment.seed)  # Flower samples sites with `random`
        if self.resume_from:
            run_id = self.recorder.reopen(self.resume_from)
        else:
            run_id = self.recorder.start(self.run_tags)
        arrays = ArrayRecord(self.initial_model(run_id).state_dict())
        start = ResumePoint(1, arrays, {}, {})
        if self.resume_from:
            start = resume_point(self.recorder, cfg.config_hash(), arrays)
            if start.state is not None:
                self.load_state_dict(start.state)
            elif self.encryption is not None:
                self.encryption.restore_binding()
        arrays, glob, per_site = start.arrays, start.global_metrics, start.site_metrics
        self._notify(
            "run-started",
            0,
            experiment=cfg.name,
            rounds=cfg.experiment.rounds,
            run_id=run_id,
            tracking_uri=self.tracking_uri,
        )
        status = "FAILED"
        try:
            gate = self.admit_sites(grid)  # only sites that approved the study take part
            grid = cast(Grid, gate)  # the gate delegates the rest of Grid to the real grid
            if cfg.task.normalisation == "consortium" and self.norm_stats is None:
                self.consortium_statistics(grid)
            elif cfg.task.normalisation == "site" and self.norm_stats is None:
                self.registry_statistics(grid)
            if start.evaluate is not None and cfg.experiment.fraction_evaluate > 0:
                # The crash came after aggregating this round, before its evaluation.
                published = self.published(start.evaluate, arrays)
                glob, per_site = self.evaluate_round(grid, start.evaluate, published)
                save_evaluation(self.recorder, start.evaluate, glob, per_site)
            for r in range(start.first, cfg.experiment.rounds + 1):
                self._notify("round-started", r)
                gate.round_start(r)  # a site approved since joins this round
                arrays = self.train_round(grid, r, arrays)
                # Checkpoint before evaluating: under HE an aggregated round cannot be re-run.
                save_round(self.recorder, r, arrays, self.state_dict(), glob, per_site)
                if cfg.experiment.fraction_evaluate > 0:
                    glob, per_site = self.evaluate_round(grid, r, self.published(r, arrays))
                    save_evaluation(self.recorder, r, glob, per_site)
            version = self.register(self.published(cfg.experiment.rounds, arrays), glob, per_site)
            report = self.report(run_id)
            status = "FINISHED"
        except FedHealthError as exc:
            self._notify("run-failed", 0, error=str(exc), exit_code=exc.exit_code)
            raise
        finally:
            self.recorder.finish(status)
        report_url = (
            report_ui_url(self.tracking_uri, str(self.recorder.experiment_id), run_id)
            if report
            else None
        )
        final = self.final_evaluation
        final_auroc = {s: dict(m["auroc"]) for s, m in final.metrics.items()} if final else {}
        summary = RunSummary(
            experiment=cfg.name,
            run_id=run_id,
            registered_model=cfg.registered_model if version else None,
            version=version,
            tracking_uri=self.tracking_uri,
            rounds=cfg.experiment.rounds,
            global_metrics=glob,
            site_metrics=per_site,
            refusals=self.refusals,
            seconds=time.time() - t0,
            privacy=self.privacy.summary(),
            report=report,
            statistics_declined=sorted(set(self.statistics_declined)),
            report_url=report_url,
            final_auroc=final_auroc,
        )
        self._notify("run-finished", cfg.experiment.rounds)
        return summary

    def report(self, run_id: str) -> str | None:
        """Log the run's plots and HTML report (from its own logged metrics); their URI.

        A plot that cannot be drawn does not undo a trained, registered model: the failure
        is reported as a progress event and the run finishes without a report.
        """
        from mlflow.exceptions import MlflowException

        from fedhealth.registry.report import build_run_report

        try:
            return build_run_report(cast("MlflowClient", self.recorder.client), run_id)
        except (MlflowException, OSError, ValueError) as exc:
            self._notify("report-failed", 0, error=str(exc))
            return None

    def register(self, arrays: ArrayRecord, glob: dict, per_site: dict) -> str | None:
        """Register the final global model as a pyfunc on raw input, with its provenance."""
        cfg = self.cfg
        model = self.initial_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        task = self.spec.task.model_dump(mode="json", by_alias=True)
        # Everything the pyfunc needs to turn raw rows or image files into the network's
        # input, and to rebuild the network from the catalogue (no pickle).
        spec = {
            "kind": cfg.task.kind,
            "model": self.spec.model.model_dump(mode="json"),
            "input_dim": input_dim(cfg),
            "num_classes": cfg.task.num_classes,
            "image_size": cfg.task.image_size,
            "normalisation": cfg.task.normalisation,
            "statistics": self.norm_stats,
            "schema": task.get("schema") if cfg.task.kind == "tabular" else None,
            "split": {"test_fraction": cfg.task.test_fraction, "split_seed": cfg.task.split_seed},
            "fedhealth_version": __version__,
        }
        provenance = {
            "experiment": cfg.name,
            "task": cfg.task.model_dump(mode="json", by_alias=True),
            "model": cfg.model.name,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "input_layout": input_layout(cfg, statistics=self.norm_stats is not None),
            "split_rule": split_rule(task),
            "sites": sorted(per_site) or ["?"],
            "rounds": cfg.experiment.rounds,
            "strategy": cfg.strategy.name.rsplit("/", 1)[-1],
            "seed": cfg.experiment.seed,
            "config_hash": cfg.config_hash(),
            "study": study_hash(self.spec),
            "fedhealth_version": __version__,
            "global_metrics": glob,
            "site_metrics": per_site,
            "statistics": self._statistics_note(),
            "metrics_release": "site metrics (loss, accuracy, train-loss) are as each site's "
            "policy released them: with Gaussian noise charged to its ledger (release_metrics "
            '= "dp", the default), withheld, or exact; the tables above hold the noisy values',
        }
        provenance.update(self.privacy.provenance())  # DP mode, accountant, δ, each site's ε
        provenance.update(self.encryption.provenance() if self.encryption else {"he": "off"})
        return self.recorder.register(model, spec, provenance)

    def _statistics_note(self) -> str:
        """What the model card says about the consortium statistics."""
        if self.norm_stats is None:
            return "none shared"
        if not self.statistics_dp:
            return "consortium normalisation: per-feature sums and counts from the sites"
        per_site = ", ".join(
            f"{site} ε={d.get('epsilon_release', d.get('epsilon', float('nan'))):.3g}"
            for site, d in sorted(self.statistics_dp.items())
        )
        delta = max(float(d.get("delta", 0.0)) for d in self.statistics_dp.values())
        return (
            "consortium normalisation: per-feature sums and sums of squares released under DP "
            f"(clamped to the schema's bounds, Gaussian noise, δ={delta:g}), charged to each "
            f"site's ledger: {per_site}"
        )


def _update_problem(msg: Message, weight_key: str, shapes: dict[str, tuple]) -> str | None:
    """What makes a plaintext training reply unusable, or None if it is well formed."""
    content = msg.content
    if Record.SITE not in content.config_records or SiteKey.NAME not in content[Record.SITE]:
        return f"the reply has no `{Record.SITE}` record naming the site"
    if Record.METRICS not in content.metric_records:
        return f"the reply has no `{Record.METRICS}` record"
    weight = content.metric_records[Record.METRICS].get(weight_key)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"metric `{weight_key}` is {weight!r}, not a positive finite number"
    if Record.ARRAYS not in content.array_records:
        return f"the reply has no `{Record.ARRAYS}` record (the model update)"
    update = content.array_records[Record.ARRAYS]
    got = {k: tuple(a.shape) for k, a in update.items()}
    if got != shapes:
        wrong = sorted(set(got) ^ set(shapes)) or sorted(k for k in got if got[k] != shapes[k])
        return f"the update's arrays differ from the global model's: {', '.join(wrong[:5])}"
    for k, a in update.items():
        if not np.isfinite(a.numpy()).all():
            return f"the update's array {k!r} holds NaN or infinity"
    return None


def _common_metric_keys(replies: list[Message]) -> list[Message]:
    """The replies with each metric record cut to the keys every reply carries.

    Sites release metrics under their own policy (exact, DP-noised with a noise-std key,
    withheld), so their key sets differ; Flower's strategies refuse to aggregate replies whose
    metric records differ (``InconsistentMessageReplies``), and one site could stop every
    round that way. Per-site metrics are logged from the original replies before this.
    """
    records = [m.content[Record.METRICS] for m in replies if Record.METRICS in m.content]
    if len(records) != len(replies):
        return replies  # the strategy names the reply without metrics
    common = set.intersection(*(set(r.keys()) for r in records)) if records else set()
    if all(set(r.keys()) == common for r in records):
        return replies
    out = []
    for m in replies:
        content = RecordDict({k: v for k, v in m.content.items() if k != Record.METRICS})
        metrics = m.content.metric_records[Record.METRICS]
        content[Record.METRICS] = MetricRecord({k: metrics[k] for k in metrics if k in common})
        # Flower's overloads omit `metadata`; a reply keeps its own.
        reply = Message(content=content, metadata=copy.deepcopy(m.metadata))  # type: ignore[call-overload]
        out.append(reply)
    return out


#: Noisy sums can make a feature's variance tiny or negative; its std is kept at least this
#: share of the feature's declared range (post-processing: costs no privacy).
MIN_STD_SHARE_OF_RANGE = 0.05


def _within_bounds(
    cfg: ExperimentConfig, mean: np.ndarray, std: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std from noisy sums, kept plausible with the schema's declared bounds."""
    if cfg.task.kind == "image":
        low, high = np.zeros_like(mean), np.ones_like(mean)
    else:
        schema = cfg.task.schema_
        assert schema is not None  # validated: a tabular task has a schema
        pairs = [schema.bounds.get(n, (0.0, 1.0)) for n in schema.feature_names()]
        low = np.array([p[0] for p in pairs], dtype=float)
        high = np.array([p[1] for p in pairs], dtype=float)
    mean = np.clip(mean, low, high)
    return mean, np.maximum(std, MIN_STD_SHARE_OF_RANGE * (high - low))


def _prefix(m: dict, prefix: str) -> dict:
    return {(k if k.startswith(prefix) else f"{prefix}{k}"): v for k, v in m.items()}


def aggregate_site_metrics(per_site: dict[str, dict]) -> dict[str, float]:
    """Global metrics: weighted by test examples, plus the plain mean over sites."""
    if not per_site:
        return {}
    # Sites that withheld their metrics (policy `release_metrics`) count in neither; a site's
    # noisy values (release_metrics = "dp") are averaged like exact ones.
    released = {s: m for s, m in per_site.items() if Metric.ACCURACY in m and Metric.LOSS in m}
    if not released:
        return {}
    n = np.array([m[Metric.NUM_EXAMPLES] for m in released.values()], dtype=float)
    out: dict[str, float] = {Metric.NUM_EXAMPLES: float(n.sum())}
    for key in (Metric.LOSS, Metric.ACCURACY):
        vals = np.array([m[key] for m in released.values()], dtype=float)
        out[key] = float((vals * n).sum() / max(n.sum(), 1))
        out[f"{key}_site_mean"] = float(vals.mean())
    return out
