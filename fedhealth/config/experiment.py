"""Schema of an experiment config (``experiments/*.toml``), owned by data scientists.

It says what to learn (task and data schema), with which model, strategy and
training settings, on which sites, and where to track it. The same file runs in
simulation and on a real federation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedhealth.catalogue import MODELS, READERS, STRATEGIES, WEIGHTED_MEAN
from fedhealth.config.encryption import HESection, check_he_fits
from fedhealth.config.federation import SiteProfiles, StudyName, check_min_sites
from fedhealth.config.loader import load_model
from fedhealth.config.site import SiteProfile, load_site
from fedhealth.errors import ConfigError

# The sections a site receives are wire types: defined once, in the protocol.
from fedhealth.protocol import (
    DPSection,
    HESpec,
    ModelSection,
    StrategySpec,
    TabularSchemaSection,
    TaskSection,
    TaskSpec,
    TrainingSection,
)
from fedhealth.strategies import refusal

__all__ = [
    "DPSection",
    "ExperimentConfig",
    "ModelSection",
    "TabularSchemaSection",
    "TaskSection",
    "TaskSpec",
    "TrainingSection",
    "load_experiment",
    "load_experiment_with_sites",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExperimentSection(_Strict):
    """Identity and federation shape of the experiment."""

    name: StudyName = Field(description="Experiment name; also the MLflow experiment.")
    description: str = Field("", description="Free text shown in MLflow.")
    sites: SiteProfiles = Field(min_length=1, description="Site profiles, relative to this file.")
    rounds: int = Field(gt=0, le=10_000, description="Number of federated rounds.")
    min_sites: int = Field(
        2,
        ge=1,
        description="Fewest sites whose replies a round needs; below it the run stops cleanly.",
    )
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="Fraction of connected sites sampled for training each round."
    )
    fraction_evaluate: float = Field(
        1.0, ge=0, le=1, description="Fraction of sites that evaluate each round (0 disables)."
    )
    seed: int = Field(0, description="Seed of initial weights, batch order and sampling.")
    round_timeout: float = Field(600.0, gt=0, description="Seconds to wait for site replies.")
    approval_timeout: float = Field(
        0.0,
        ge=0,
        description="Seconds to wait, before the first round, for sites whose operator has "
        "not yet approved the study (`fedhealth site approve`); 0 = do not wait: go on with "
        "the approved sites if min_sites hold, else stop naming the pending ones.",
    )

    @model_validator(mode="after")
    def _min_sites(self) -> ExperimentSection:
        check_min_sites(self.min_sites, self.sites)
        return self


class StrategySection(_Strict):
    """Aggregation strategy: a built-in name, or ``path/to/file.py:ClassName``."""

    name: str = Field(
        "fedavg",
        description="Built-in strategy or a custom class as 'strategies/file.py:ClassName'.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the strategy "
        "(e.g. eta for fedadam, proximal_mu for fedprox).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str, info: ValidationInfo) -> str:
        if v.lower() in STRATEGIES:
            return v.lower()
        if ":" not in v:
            raise ValueError(
                f"unknown strategy {v!r}; use one of {', '.join(STRATEGIES.names())} "
                "or a custom one as 'strategies/file.py:ClassName'"
            )
        file_part, _, cls_name = v.rpartition(":")
        base = (info.context or {}).get("base_dir")
        path = Path(file_part)
        candidates = [path] if path.is_absolute() else []
        if base and not path.is_absolute():
            # An experiment names strategies from the project root or from its own folder.
            candidates += [Path(base).parent / path, Path(base) / path]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            looked = ", ".join(str(c.resolve()) for c in candidates) or str(path)
            raise ValueError(f"custom strategy file {file_part!r} not found (looked in {looked})")
        if not cls_name.isidentifier():
            raise ValueError(f"{cls_name!r} is not a class name")
        return f"{found.resolve()}:{cls_name}"


class PrivacySection(_Strict):
    """Privacy settings of the experiment."""

    dp: DPSection = Field(default_factory=DPSection)
    he: HESection = Field(default_factory=HESection)


class TrackingSection(_Strict):
    """Where runs and models are recorded."""

    uri: str | None = Field(
        None, description="MLflow tracking URI; default: sqlite in ./workspace/mlflow."
    )
    registered_model: str | None = Field(None, description="Default: the experiment name.")
    register_model: bool = Field(True, alias="register", description="Register the final model.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ExperimentConfig(_Strict):
    """A whole experiment config."""

    experiment: ExperimentSection
    task: TaskSection
    model: ModelSection
    training: TrainingSection = TrainingSection()
    strategy: StrategySection = StrategySection()
    privacy: PrivacySection = PrivacySection()
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="after")
    def _model_fits_task(self) -> ExperimentConfig:
        if self.task.kind not in MODELS.get(self.model.name).traits:
            raise ValueError(
                f"model {self.model.name!r} does not fit a {self.task.kind} task; "
                f"{self.task.kind} models are {', '.join(MODELS.names(self.task.kind))}"
            )
        return self

    @model_validator(mode="after")
    def _privacy_fits_experiment(self) -> ExperimentConfig:
        dp = self.privacy.dp
        if not dp.enabled:
            return self
        name = self.strategy.name
        # A custom class's traits are checked when the coordinator builds it; here only
        # its options can tell (a `proximal_mu`).
        traits = STRATEGIES.get(name).traits if name in STRATEGIES else {WEIGHTED_MEAN}
        problem = refusal(name, traits, self.strategy.options, he=False, dp_mode=dp.mode)
        if problem:
            raise ValueError(problem)
        if dp.mode == "site":
            n_sites = len(self.experiment.sites)
            if dp.delta >= 1.0 / n_sites:
                raise ValueError(
                    f"`privacy.dp.delta` = {dp.delta:g} is too large for site-level DP over "
                    f"{n_sites} sites: it must be below 1/{n_sites} = {1 / n_sites:.3g} "
                    "(the privacy unit is a whole site)"
                )
        return self

    @model_validator(mode="after")
    def _he_fits_experiment(self) -> ExperimentConfig:
        exp = self.experiment
        check_he_fits(self.privacy.he, exp.min_sites, len(exp.sites), self.strategy.name)
        return self

    @property
    def name(self) -> str:
        """The experiment's name."""
        return self.experiment.name

    @property
    def registered_model(self) -> str:
        """Name of the registered model that versions this experiment's global models."""
        return self.tracking.registered_model or self.experiment.name

    def config_hash(self) -> str:
        """A stable hash of the validated config (provenance of every model version)."""
        blob = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def flat_params(self) -> dict[str, str]:
        """The config flattened to ``section.key -> str`` for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = str(value)[:500]

        walk("", self.model_dump(mode="json", by_alias=True))
        return out

    def dp_spec(self) -> DPSection:
        """The ``[privacy.dp]`` section as sites receive it (``expected_sites`` resolved)."""
        dp = self.privacy.dp
        if dp.enabled and dp.mode == "site" and dp.expected_sites is None:
            dp = dp.model_copy(update={"expected_sites": len(self.experiment.sites)})
        return dp

    def task_spec(self) -> TaskSpec:
        """What a site needs to know to train: task, model, training and privacy plan."""
        return TaskSpec(
            experiment=self.experiment.name,
            task=self.task,
            model=self.model,
            training=self.training,
            seed=self.experiment.seed,
            rounds=self.experiment.rounds,
            dp=self.dp_spec(),
            strategy=self.strategy_spec(),
            he=self.he_spec(),
        )

    def strategy_spec(self) -> StrategySpec:
        """The strategy as the sites see it: a custom file by name and SHA-256 of its source."""
        name, code = self.strategy.name, None
        if name not in STRATEGIES:
            file_part, _, cls_name = name.rpartition(":")
            code = hashlib.sha256(Path(file_part).read_bytes()).hexdigest()
            name = f"{Path(file_part).name}:{cls_name}"
        return StrategySpec(name=name, code_sha256=code, options=dict(self.strategy.options))

    def he_spec(self) -> HESpec | None:
        """The encrypted-aggregation parameters every round announces (None: plaintext)."""
        he = self.privacy.he
        if not he.enabled:
            return None
        return HESpec(
            weight_scale=he.weight_scale,
            quorum=he.quorum,
            bind_cohort=he.bind_cohort,
            min_sites=self.experiment.min_sites,
        )


def load_experiment(path: Path) -> ExperimentConfig:
    """Load and validate an experiment config (not its sites).

    Parameters
    ----------
    path : Path
        The experiment TOML.

    Returns
    -------
    ExperimentConfig
    """
    return load_model(Path(path), ExperimentConfig)


def load_experiment_with_sites(path: Path) -> tuple[ExperimentConfig, list[SiteProfile]]:
    """Load an experiment and every site profile it lists, and check they fit together.

    Raises
    ------
    ConfigError
        If a profile is invalid, two profiles share a site name, or a site does
        not register the experiment's dataset with a kind that fits the task.
    """
    exp = load_experiment(path)
    sites = [load_site(p) for p in exp.experiment.sites]
    names: dict[str, Path] = {}
    for site_path, site in zip(exp.experiment.sites, sites, strict=True):
        if site.name in names:
            raise ConfigError(
                f"{path}: key `experiment.sites`: site name {site.name!r} is used by both "
                f"{names[site.name]} and {site_path}; give each hospital its own name"
            )
        names[site.name] = site_path
        ds = site.datasets.get(exp.task.dataset)
        if ds is None:
            raise ConfigError(
                f"{site_path}: site {site.name!r} has no dataset named {exp.task.dataset!r} "
                f"(experiment {path} key `task.dataset`); it registers "
                f"{', '.join(sorted(site.datasets))}. Add a [datasets.{exp.task.dataset}] table."
            )
        if exp.task.kind not in READERS.get(ds.kind).traits:
            raise ConfigError(
                f"{site_path}: key `datasets.{exp.task.dataset}.kind`: {ds.kind!r} data cannot "
                f"feed the experiment's {exp.task.kind!r} task"
            )
    return exp, sites
