"""Record a federated run in MLflow: params, per-round metrics, the registered model.

Reads as plainly as MLflow's fluent API: ``start``, ``log_round``, ``register``,
``finish``. The coordinator is the only writer; sites never talk to MLflow.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature

import fedhealth
from fedhealth import __version__
from fedhealth.config.experiment import ExperimentConfig
from fedhealth.registry.model_card import render_model_card
from fedhealth.registry.retry import retrying
from fedhealth.registry.store import ensure_experiment, use_store


def _requirements(model: torch.nn.Module) -> list[str]:
    """What a consumer must install to load ``model``: torch, and MONAI for its networks."""
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    if any(type(m).__module__.startswith("monai") for m in model.modules()):
        import monai

        reqs.append(f"monai=={monai.__version__}")
    return reqs


def _clean(name: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . / and space.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


class RunRecorder:
    """One MLflow run for one federated experiment.

    Parameters
    ----------
    cfg : ExperimentConfig
        The validated experiment.
    tracking_uri : str
        Where to record.
    """

    def __init__(self, cfg: ExperimentConfig, tracking_uri: str) -> None:
        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self.client = use_store(tracking_uri)
        self.run_id: str | None = None

    def start(self, extra_tags: dict[str, str] | None = None) -> str:
        """Open the run and log the flattened config as params; returns the run id."""
        exp_id = retrying(
            ensure_experiment,
            self.client,
            self.cfg.name,
            self.tracking_uri,
            what="MLflow experiment",
        )
        tags = {
            "fedhealth.version": __version__,
            "fedhealth.config_hash": self.cfg.config_hash(),
            "fedhealth.strategy": self.cfg.strategy.name,
        }
        tags.update(extra_tags or {})
        run = retrying(
            self.client.create_run,
            exp_id,
            tags=tags,
            run_name=f"{self.cfg.name}",
            what="create run",
        )
        self.run_id = run.info.run_id
        params = self.cfg.flat_params()
        items = list(params.items())
        for i in range(0, len(items), 90):  # MLflow's batch limit is 100 params
            retrying(
                mlflow.tracking.MlflowClient(self.tracking_uri).log_batch,
                self.run_id,
                what="log params",
                params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 90]],
            )
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics for ``step`` (the round)."""
        ms = [
            mlflow.entities.Metric(
                _clean(k), float(v), int(mlflow.utils.time.get_current_time_millis()), step
            )
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and np.isfinite(v)
        ]
        if ms:
            retrying(self.client.log_batch, self.run_id, metrics=ms, what=f"log round {step}")

    def reopen(self, run_id: str) -> str:
        """Continue an interrupted run (``fedhealth run --resume``): mark it running again."""
        run = retrying(self.client.get_run, run_id, what=f"find run {run_id}")
        self.run_id = run.info.run_id
        retrying(self.client.update_run, self.run_id, status="RUNNING", what="reopen run")
        retrying(self.client.set_tag, self.run_id, "fedhealth.resumed", "true", what="tag run")
        return self.run_id

    def registered_version(self) -> str | None:
        """The model version this run already registered (a resumed run never registers twice)."""
        if not self.run_id:
            return None
        run = retrying(self.client.get_run, self.run_id, what="read run tags")
        tag = run.data.tags.get("fedhealth.registered_version")
        if tag:
            return tag.rsplit("/", 1)[-1]
        found = retrying(
            self.client.search_model_versions,
            f"run_id = '{self.run_id}'",
            what="search model versions",
        )
        return str(found[0].version) if found else None

    def log_round(self, round_: int, global_m: dict, per_site: dict[str, dict]) -> None:
        """Log a round's global metrics and every site's metrics (``site/<name>/<metric>``)."""
        flat = {f"global/{k}": v for k, v in global_m.items()}
        for site, m in per_site.items():
            flat.update({f"site/{site}/{k}": v for k, v in m.items()})
        self.log_metrics(flat, round_)

    def register(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        provenance: dict[str, Any],
    ) -> str | None:
        """Log the global model, its signature, input example and model card; register it.

        Returns
        -------
        str or None
            The new registered model version, or ``None`` when registration is off.
        """
        name = self.cfg.registered_model
        existing = self.registered_version()
        if existing is not None:
            return existing
        provenance = dict(provenance, registered_model=name, run_id=self.run_id)
        model.eval()
        with torch.no_grad():
            out = model(torch.as_tensor(input_example)).numpy()
        signature = infer_signature(input_example, out)
        card = render_model_card(provenance)
        # MLflow warns that pickles can run code on load; our consumers load what their own
        # consortium registered, and the warning would only alarm the data scientist.
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        mlflow.set_tracking_uri(self.tracking_uri)
        with retrying(mlflow.start_run, run_id=self.run_id, what="open run"):
            info = retrying(
                mlflow.pytorch.log_model,
                model,
                name="model",
                signature=signature,
                input_example=input_example,
                # A pickled nn.Module (not MLflow's default torch.export program) so that
                # consumers get a model that supports .eval(), any batch size and fine-tuning;
                # fedhealth's own layers travel with it as code.
                serialization_format="pickle",
                code_paths=[str(Path(fedhealth.__file__).parent)],
                pip_requirements=_requirements(model),
                what="log model",
            )
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model_card.md"
                path.write_text(card)
                retrying(mlflow.log_artifact, str(path), what="log model card")
        if not self.cfg.tracking.register_model:
            return None
        try:
            retrying(self.client.get_registered_model, name, what="find registered model")
        except mlflow.exceptions.MlflowException:
            retrying(
                self.client.create_registered_model,
                name,
                description=f"Global models of fedhealth experiment {self.cfg.name!r}.",
                what="create registered model",
            )
        version = self._create_version(name, info.model_uri, card, info.model_id)
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
        for k, v in tags.items():
            retrying(self.client.set_model_version_tag, name, version, k, v, what="tag version")
        retrying(
            self.client.set_tag,
            self.run_id,
            "fedhealth.registered_version",
            f"{name}/{version}",
            what="tag run",
        )
        return version

    def _create_version(
        self, name: str, source: str, card: str, model_id: str | None = None
    ) -> str:
        """Create the model version once, even if a retried request had already succeeded."""

        def create() -> str:
            existing = self.registered_version()
            if existing is not None:
                return existing
            mv = self.client.create_model_version(
                name, source=source, run_id=self.run_id, description=card, model_id=model_id
            )
            return str(mv.version)

        return retrying(create, what="create model version")

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run (``FINISHED`` or ``FAILED``)."""
        if self.run_id:
            retrying(self.client.set_terminated, self.run_id, status=status, what="finish run")
