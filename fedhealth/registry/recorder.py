"""Record a federated run in MLflow: params, per-round metrics, the registered model.

Reads as plainly as MLflow's fluent API: ``start``, ``log_round``, ``register``,
``finish``. The coordinator is the only writer; sites never talk to MLflow.

Every MLflow call survives the tracking server restarting mid-run
(:mod:`fedhealth.registry.retry`): calls that can be repeated are retried as they are
(:attr:`RunRecorder.client`), and calls that create something first look for what a lost
attempt created. A run is created once (found again by a token tag), a metric point once
(each point carries its own timestamp; a retry sends only the points the run lacks), the
logged model once per run and the registered model version once per run.
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModel, LoggedModelOutput, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags

import fedhealth
from fedhealth import __version__
from fedhealth.config.experiment import ExperimentConfig
from fedhealth.registry.model_card import render_model_card
from fedhealth.registry.retry import (
    RetryingClient,
    TrackingUnavailable,
    create_once,
    find_or_create,
    retrying,
)
from fedhealth.registry.store import ensure_experiment, use_store

T = TypeVar("T")

RUN_TOKEN_TAG = "fedhealth.start_token"  # finds the run again if "create run" lost its answer
REGISTERED_TAG = "fedhealth.registered_version"
# Consortium statistics are released once per study (the sites refuse a second query): a
# later run of the same study reuses the first run's, found by these tags.
STATISTICS_STUDY_TAG = "fedhealth.statistics_study"
STATISTICS_TAG = "fedhealth.consortium_statistics"
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value
GLOBAL_MODEL_TAG = "fedhealth.global_model"  # on the run's logged model (at most one per run)
# What MLflow runs to load a registered model (models-from-code: nothing is unpickled).
MODEL_CODE = Path(__file__).with_name("model_code.py")
FINISH_DEADLINE_AFTER_FAILURE = 5.0  # seconds: closing a run once the server stayed down


def _requirements(model: torch.nn.Module) -> list[str]:
    """What a consumer must install to load the pyfunc (fedhealth's code travels with it)."""
    import mlflow as _mlflow
    import pandas
    import safetensors

    reqs = [
        f"mlflow=={_mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pandas.__version__}",
        f"safetensors=={safetensors.__version__}",
    ]
    if any(type(m).__module__.startswith("monai") for m in model.modules()):
        import monai

        reqs.append(f"monai=={monai.__version__}")
    return reqs


def _clean(name: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . / and space.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _quote(value: str) -> str:
    """A string literal for an MLflow search filter."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


class RunRecorder:
    """One MLflow run for one federated experiment.

    Parameters
    ----------
    cfg : ExperimentConfig
        The validated experiment.
    tracking_uri : str
        Where to record.

    Attributes
    ----------
    client : RetryingClient
        The MLflow client for calls that can be repeated (each is retried while the
        server is unreachable); other coordinator code (checkpoints, encrypted
        aggregation) logs through it too.
    run_id : str or None
        The MLflow run, once started or reopened.
    round : int
        The latest round whose metrics were logged (named in error messages).
    """

    def __init__(self, cfg: ExperimentConfig, tracking_uri: str) -> None:
        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self._mlflow = use_store(tracking_uri)  # raw client: only inside idempotent calls
        self.client = RetryingClient(
            self._mlflow, tracking_uri, scope=self._scope, hint=self._resume_hint
        )
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.round = 0
        self._gave_up = False
        self._before_resume: set[tuple[str, int]] = set()  # (key, step) logged before --resume

    # -- retrying -----------------------------------------------------------------------------

    def _scope(self) -> str:
        return f"round {self.round}" if self.round else ""

    def _resume_hint(self) -> str:
        if self.run_id is None:
            return "No MLflow run was created; run the experiment again once the server is back."
        return (
            f"Every completed round is checkpointed in MLflow run {self.run_id}: once the "
            f"server answers again, continue with `fedhealth run EXPERIMENT --resume "
            f"{self.run_id}` (add `--federation NAME` on a deployment)."
        )

    def _call(
        self, fn: Callable[..., T], *args: Any, what: str, deadline: float | None = None
    ) -> T:
        """``fn(*args)`` retried while the server is unreachable (``fn`` must be idempotent)."""
        try:
            return retrying(
                fn, *args, what=what, deadline=deadline, uri=self.tracking_uri,
                hint=self._resume_hint(),
            )  # fmt: skip
        except TrackingUnavailable:
            self._gave_up = True
            raise

    @property
    def gave_up(self) -> bool:
        """Whether an MLflow call failed after waiting the whole retry deadline."""
        return self._gave_up or self.client.gave_up

    # -- the run ------------------------------------------------------------------------------

    def _experiment(self) -> str:
        try:
            return ensure_experiment(self._mlflow, self.cfg.name, self.tracking_uri)
        except MlflowException as exc:
            # Created meanwhile: by another run, or by our own attempt whose answer was lost.
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = self._mlflow.get_experiment_by_name(self.cfg.name)
            if exp is None:
                raise
            return exp.experiment_id

    def start(self, extra_tags: dict[str, str] | None = None) -> str:
        """Open the run and log the flattened config as params; returns the run id."""
        exp_id = self._call(
            self._experiment, what=f"finding or creating the MLflow experiment {self.cfg.name!r}"
        )
        self.experiment_id = exp_id
        token = uuid.uuid4().hex
        tags = {
            "fedhealth.version": __version__,
            "fedhealth.config_hash": self.cfg.config_hash(),
            "fedhealth.strategy": self.cfg.strategy.name,
            RUN_TOKEN_TAG: token,
        }
        tags.update(extra_tags or {})

        def find() -> str | None:
            runs = self._mlflow.search_runs(
                [exp_id], f"tags.`{RUN_TOKEN_TAG}` = {_quote(token)}", max_results=1
            )
            return runs[0].info.run_id if runs else None

        def create() -> str:
            run = self._mlflow.create_run(exp_id, tags=tags, run_name=self.cfg.name)
            return run.info.run_id

        self.run_id = self._call(
            create_once(find, create), what=f"creating the MLflow run of {self.cfg.name!r}"
        )
        items = list(self.cfg.flat_params().items())
        for i in range(0, len(items), 90):  # MLflow's batch limit is 100 params
            # A param's value never changes, so sending a batch twice is harmless.
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 90]])
        return self.run_id

    def earlier_statistics(self, study: str) -> dict[str, Any] | None:
        """The consortium statistics an earlier run of the same study recorded, if any."""
        exp_id = self.experiment_id
        if exp_id is None:
            return None

        def find() -> str | None:
            runs = self._mlflow.search_runs(
                [exp_id], f"tags.`{STATISTICS_STUDY_TAG}` = {_quote(study)}", max_results=1
            )
            return runs[0].data.tags.get(STATISTICS_TAG) if runs else None

        text = self._call(find, what="looking up the study's consortium statistics")
        return json.loads(text) if text else None

    def save_statistics(self, study: str, statistics: dict[str, Any]) -> None:
        """Record the run's consortium statistics for later runs of the same study."""
        text = json.dumps(statistics)
        if self.run_id is None or len(text) > MAX_TAG_CHARS:
            return  # too wide to keep in a tag: a later run of this study asks the sites again
        self.client.set_tag(self.run_id, STATISTICS_TAG, text)
        self.client.set_tag(self.run_id, STATISTICS_STUDY_TAG, study)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics for ``step`` (the round), each point exactly once.

        The points carry their timestamp from the first attempt. If an attempt fails, the
        next one first reads the run's history of these keys and sends only the points
        (same key, step and timestamp) the server does not have: a batch that reached the
        server although its answer was lost is not logged twice. In a resumed run, a point
        whose key and step were logged before the interruption is not logged again (the
        first value stays).
        """
        self.round = max(self.round, step)
        now = int(mlflow.utils.time.get_current_time_millis())
        ms = [
            Metric(_clean(k), float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and np.isfinite(v)
        ]
        # A resumed run repeats the work the crash interrupted (the round after its last
        # checkpoint, or that round's evaluation); points it logged before are kept.
        ms = [m for m in ms if (m.key, m.step) not in self._before_resume]
        if not ms:
            return
        run_id = cast(str, self.run_id)  # metrics are logged after start() or reopen()
        tried = False

        def send() -> None:
            nonlocal tried
            todo = self._not_logged(run_id, ms) if tried else ms
            tried = True
            if todo:
                self._mlflow.log_batch(run_id, metrics=todo)

        self._call(send, what=f"logging round {step}'s metrics ({len(ms)} values)")

    def _not_logged(self, run_id: str, ms: list[Metric]) -> list[Metric]:
        """The points of ``ms`` that the run's history does not hold yet."""
        have: set[tuple[str, int, int]] = set()
        for key in {m.key for m in ms}:
            have.update(
                (key, h.step, h.timestamp) for h in self._mlflow.get_metric_history(run_id, key)
            )
        return [m for m in ms if (m.key, m.step, m.timestamp) not in have]

    def log_round(self, round_: int, global_m: dict, per_site: dict[str, dict]) -> None:
        """Log a round's global metrics and every site's metrics (``site/<name>/<metric>``)."""
        flat = {f"global/{k}": v for k, v in global_m.items()}
        for site, m in per_site.items():
            flat.update({f"site/{site}/{k}": v for k, v in m.items()})
        self.log_metrics(flat, round_)

    def reopen(self, run_id: str) -> str:
        """Continue an interrupted run (``fedhealth run --resume``): mark it running again."""
        run = self.client.get_run(run_id)
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.client.update_run(self.run_id, status="RUNNING")
        self.client.set_tag(self.run_id, "fedhealth.resumed", "true")
        for key in run.data.metrics:
            history = self.client.get_metric_history(self.run_id, key)
            self._before_resume.update((key, h.step) for h in history)
        return self.run_id

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run (``FINISHED`` or ``FAILED``).

        After a call already waited the whole retry deadline in vain, this tries only
        briefly and never raises, so that the error the user sees is the first one.
        """
        if not self.run_id:
            return
        what = f"marking MLflow run {self.run_id} {status}"
        if not self.gave_up:
            self._call(self._mlflow.set_terminated, self.run_id, status, what=what)
            return
        try:
            retrying(
                self._mlflow.set_terminated, self.run_id, status, what=what,
                deadline=FINISH_DEADLINE_AFTER_FAILURE, uri=self.tracking_uri,
            )  # fmt: skip
        except (TrackingUnavailable, MlflowException, OSError):  # `--resume` reopens it
            logging.getLogger("fedhealth.registry").warning(
                "MLflow run %s stays marked RUNNING (the server is unreachable)", self.run_id
            )

    # -- the registered model -----------------------------------------------------------------

    def _versions_of_run(self) -> list[str]:
        """This run's versions of the registered model (at most one, by construction)."""
        found = self._mlflow.search_model_versions(
            f"name = {_quote(self.cfg.registered_model)} and run_id = {_quote(self.run_id or '')}"
        )
        return sorted((str(v.version) for v in found), key=int)

    def registered_version(self) -> str | None:
        """The model version this run already registered (a resumed run never registers twice)."""
        if not self.run_id:
            return None
        run = self.client.get_run(self.run_id)
        tag = run.data.tags.get(REGISTERED_TAG)
        if tag:
            return tag.rsplit("/", 1)[-1]
        found = self._call(
            self._versions_of_run, what=f"looking up the model versions of run {self.run_id}"
        )
        return found[0] if found else None

    def register(
        self,
        network: torch.nn.Module,
        spec: dict[str, Any],
        provenance: dict[str, Any],
    ) -> str | None:
        """Log the global model as a pyfunc with its model card; register it.

        The logged model holds the network's weights (safetensors), the preprocessing spec
        (JSON) and :mod:`fedhealth.registry.model_code`; it loads with
        ``mlflow.pyfunc.load_model`` and predicts on raw rows or image files
        (:mod:`fedhealth.registry.pyfunc_model`). Each step can be repeated: after a retry,
        or in a resumed run, it completes what an earlier attempt left unfinished and never
        creates a second logged model or version.

        Parameters
        ----------
        network : torch.nn.Module
            The catalogue's network with the final global weights (no standardisation layer:
            the spec's statistics are built in on load).
        spec : dict
            The preprocessing spec (kind, schema, statistics, architecture).
        provenance : dict
            What the model card and version tags say.

        Returns
        -------
        str or None
            The registered model version, or ``None`` when registration is off.
        """
        name = self.cfg.registered_model
        provenance = dict(provenance, registered_model=name, run_id=self.run_id)
        tags = self._version_tags(provenance)
        existing = self.registered_version()
        if existing is not None:  # an earlier attempt may have stopped before tagging
            self._tag_version(name, existing, tags)
            self.client.set_tag(self.run_id, REGISTERED_TAG, f"{name}/{existing}")
            return existing
        card = render_model_card(provenance)
        model_id = self._log_model(network, spec)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model_card.md"
            path.write_text(card)
            self.client.log_artifact(self.run_id, str(path))
        if not self.cfg.tracking.register_model:
            return None
        self._call(self._ensure_registered_model, what=f"creating registered model {name!r}")
        token = uuid.uuid4().hex

        def find() -> str | None:
            found = self._versions_of_run()
            return found[0] if found else None

        def create() -> str:
            mv = self._mlflow.create_model_version(
                name,
                source=f"models:/{model_id}",
                run_id=self.run_id,
                tags={"fedhealth.run_id": str(self.run_id), "fedhealth.registration_token": token},
                description=card,
                model_id=model_id,
            )
            return str(mv.version)

        version = self._call(
            find_or_create(find, create),
            what=f"registering a version of model {name!r} from MLflow run {self.run_id}",
        )
        self._tag_version(name, version, tags)
        self.client.set_tag(self.run_id, REGISTERED_TAG, f"{name}/{version}")
        return version

    def _version_tags(self, provenance: dict[str, Any]) -> dict[str, str]:
        """The provenance tags of the registered version."""
        tags = {
            "sites": ",".join(provenance["sites"]),
            "rounds": str(provenance["rounds"]),
            "strategy": provenance["strategy"],
            "config_hash": provenance["config_hash"],
            "fedhealth_version": __version__,
            "experiment": provenance["experiment"],
            "task": provenance["task"]["kind"],
            "dataset": provenance["task"]["dataset"],
            "seed": str(provenance["seed"]),
            "dp": provenance.get("dp", "off"),
            "he": provenance.get("he", "off"),
            "accuracy": f"{provenance['global_metrics'].get('accuracy', float('nan')):.4f}",
        }
        # DP mode, accountant, δ, noise and each site's ε (``epsilon/<site>``).
        tags.update(provenance.get("dp_tags", {}))
        # HE parameters and the consortium whose keys encrypted the updates.
        he_keys = ("he_params", "he_consortium")
        tags.update({k: str(provenance[k]) for k in he_keys if k in provenance})
        return tags

    def _tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        """Set the provenance tags the version does not have yet."""
        have = self.client.get_model_version(name, version).tags
        for k, v in tags.items():
            if k not in have:
                self.client.set_model_version_tag(name, version, k, v)

    def _ensure_registered_model(self) -> None:
        name = self.cfg.registered_model
        try:
            self._mlflow.get_registered_model(name)
            return
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            self._mlflow.create_registered_model(
                name, description=f"Global models of fedhealth experiment {self.cfg.name!r}."
            )
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":  # e.g. our lost first attempt
                raise

    def _log_model(self, network: torch.nn.Module, spec: dict[str, Any]) -> str:
        """Log the run's one logged model (MLflow 3) as a pyfunc; returns its model id.

        ``mlflow.pyfunc.log_model`` writes and uploads the model, but it creates the logged
        model and links it to the run in the same call: retried after a lost answer it
        creates a second logged model and a second link (measured with the lossy proxy of
        ``tests/test_mlflow_restart.py::test_lost_answers_create_nothing_twice``: two
        logged models). So those two creating steps stay here, each found again before it
        is repeated, and ``log_model`` is given the logged model's id (``model_id=``), which
        makes the rest of it — read, save, upload, mark ready — safe to retry as a whole.
        """
        from safetensors.torch import save_file

        from fedhealth.registry import pyfunc_model

        run_id = str(self.run_id)
        if self.experiment_id is None:
            self.experiment_id = self.client.get_run(run_id).info.experiment_id
        exp_id = self.experiment_id
        params = dict(self.cfg.flat_params())

        def find() -> LoggedModel | None:
            found = self._mlflow.search_logged_models(
                [exp_id],
                filter_string=f"source_run_id = {_quote(run_id)} "
                f"AND tags.`{GLOBAL_MODEL_TAG}` = 'true'",
                max_results=1,
            )
            return found[0] if found else None

        def create() -> LoggedModel:
            return self._mlflow.create_logged_model(
                exp_id,
                name="model",
                source_run_id=run_id,
                # With the user and source tags mlflow.pyfunc.log_model would set.
                tags=resolve_tags({GLOBAL_MODEL_TAG: "true", "fedhealth.run_id": run_id}),
                params={k: str(v) for k, v in params.items()},
            )

        logged = self._call(
            find_or_create(find, create), what=f"creating the logged model of MLflow run {run_id}"
        )

        def link() -> None:
            outputs = self._mlflow.get_run(run_id).outputs
            linked = outputs.model_outputs if outputs and outputs.model_outputs else []
            if all(o.model_id != logged.model_id for o in linked):
                step = self.cfg.experiment.rounds
                self._mlflow.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])

        self._call(link, what=f"linking the logged model to MLflow run {run_id}")
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / pyfunc_model.WEIGHTS_FILE
            state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
            save_file(state, str(weights))
            prep = Path(tmp) / pyfunc_model.SPEC_FILE
            prep.write_text(json.dumps(spec, indent=2, sort_keys=True))
            # MLflow validates the example by predicting on it: only for a model that can
            # predict without params (image files cannot travel; a table's is synthetic).
            example = spec["kind"] == "tabular" and (
                spec["normalisation"] == "none" or bool(spec.get("statistics"))
            )

            def log() -> None:
                with warnings.catch_warnings():
                    # MLflow compares a DataFrame's columns with a range while checking the
                    # example, which pandas 3 deprecates: MLflow's to fix, not the user's.
                    warnings.filterwarnings("ignore", message=r"Operation with range is deprecated")
                    _log_pyfunc()

            def _log_pyfunc() -> None:
                mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(MODEL_CODE),  # code, not a pickle
                    artifacts={"weights": str(weights), "preprocessing": str(prep)},
                    code_paths=[str(Path(fedhealth.__file__).parent)],
                    signature=pyfunc_model.signature(spec),
                    input_example=pyfunc_model.input_example(spec) if example else None,
                    pip_requirements=_requirements(network),
                    model_id=logged.model_id,
                )

            self._call(log, what=f"uploading the model's files to MLflow run {run_id}")
        return logged.model_id
