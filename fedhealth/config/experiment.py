"""Schema of an experiment config (``experiments/*.toml``), owned by data scientists.

It says what to learn (task and data schema), with which model, strategy and
training settings, on which sites, and where to track it. The same file runs in
simulation and on a real federation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedhealth.config.encryption import HESection, check_he_fits
from fedhealth.config.loader import load_model
from fedhealth.config.site import SITE_NAME, SiteProfile, load_site
from fedhealth.errors import ConfigError

MODEL_NAMES = ("logistic_regression", "mlp", "small_cnn", "densenet121", "resnet18")
TABULAR_MODELS = ("logistic_regression", "mlp")
BUILTIN_STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedavgm",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExperimentSection(_Strict):
    """Identity and federation shape of the experiment."""

    name: str = Field(description="Experiment name; also the MLflow experiment.")
    description: str = Field("", description="Free text shown in MLflow.")
    sites: list[Path] = Field(min_length=1, description="Site profiles, relative to this file.")
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

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SITE_NAME.match(v):
            raise ValueError("use lower-case letters, digits, '-' or '_' (max 63)")
        return v

    @field_validator("sites")
    @classmethod
    def _sites(cls, v: list[Path], info: ValidationInfo) -> list[Path]:
        base = (info.context or {}).get("base_dir")
        out = [(Path(base) / p).resolve() if base and not p.is_absolute() else p for p in v]
        seen: set[Path] = set()
        for p in out:
            if p in seen:
                raise ValueError(f"site profile {p} is listed twice; list each site once")
            seen.add(p)
        return out

    @model_validator(mode="after")
    def _min_sites(self) -> ExperimentSection:
        if self.min_sites > len(self.sites):
            raise ValueError(
                f"min_sites is {self.min_sites} but only {len(self.sites)} sites are listed; "
                "lower min_sites or add sites"
            )
        return self


class TabularSchemaSection(_Strict):
    """Consortium-wide table schema, so every site encodes features identically."""

    numeric: list[str] = Field(
        default_factory=list, description="Numeric feature columns, in feature order."
    )
    categorical: dict[str, list[str]] = Field(
        default_factory=dict, description="Column -> consortium-wide category list (one-hot)."
    )
    label: str = Field(description="Label column.")
    label_map: dict[str, int] | None = Field(
        None, description="Raw label -> class index; without it labels must be integers."
    )
    binarize_label_above: float | None = Field(
        None, description="If set, class = label > this value (e.g. 0 for heart disease)."
    )
    missing: Literal["drop", "error", "mean"] = Field(
        "drop",
        description="Rows with missing values: drop them, fail, or impute the site's column mean.",
    )
    drop: list[str] = Field(default_factory=list, description="Columns to ignore.")
    drop_first: bool = Field(
        False,
        description="One-hot without the first category of each column (as pandas "
        "get_dummies(drop_first=True); FLamby's Fed-Heart-Disease uses it).",
    )

    def feature_names(self) -> list[str]:
        """Encoded feature names in model-input order: numeric, then one-hot columns."""
        onehot = [
            f"{col}={v}"
            for col, values in self.categorical.items()
            for v in (values[1:] if self.drop_first else values)
        ]
        return list(self.numeric) + onehot

    @model_validator(mode="after")
    def _features(self) -> TabularSchemaSection:
        if not self.numeric and not self.categorical:
            raise ValueError("declare at least one feature in `numeric` or `categorical`")
        both = set(self.numeric) & set(self.categorical)
        if both:
            raise ValueError(f"columns {sorted(both)} are both numeric and categorical")
        return self


class TaskSection(_Strict):
    """What to learn and from which of the sites' registered datasets."""

    dataset: str = Field(description="Name of the dataset every site registers in its profile.")
    kind: Literal["tabular", "image"] = Field(description="Tabular (EHR) or image task.")
    num_classes: int = Field(2, ge=2, description="Number of classes.")
    test_fraction: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="Share of each site's records held out for evaluation (stratified).",
    )
    split_seed: int = Field(43, description="Seed of the train/test split.")
    normalisation: Literal["site", "consortium", "none"] = Field(
        "site",
        description="z-score with each site's own statistics, with consortium statistics "
        "from federated sums and counts, or not at all.",
    )
    image_size: int = Field(
        32, ge=8, le=512, description="Images are resized to image_size x image_size."
    )
    schema_: TabularSchemaSection | None = Field(None, alias="schema")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _schema(self) -> TaskSection:
        if self.kind == "tabular" and self.schema_ is None:
            raise ValueError("a tabular task needs a [task.schema] table")
        if self.kind == "image" and self.schema_ is not None:
            raise ValueError("[task.schema] applies to tabular tasks only")
        return self


class ModelSection(_Strict):
    """Which network from the model zoo, and its options."""

    name: Literal[MODEL_NAMES] = Field(description="Network from the model zoo.")  # type: ignore[valid-type]
    hidden: list[int] = Field(
        default_factory=lambda: [64, 32], description="MLP hidden layer widths."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="MLP dropout.")
    channels: list[int] = Field(
        default_factory=lambda: [16, 32], description="small_cnn channels per stage."
    )
    groups: int = Field(8, ge=1, description="GroupNorm groups (DP-safe; no BatchNorm).")


class TrainingSection(_Strict):
    """Local training at each site, per round."""

    local_epochs: int = Field(
        1, ge=1, description="Passes over the site's training split per round."
    )
    batch_size: int = Field(32, ge=1, description="Local batch size.")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Local optimiser.")
    learning_rate: float = Field(0.05, gt=0, description="Local learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay.")
    max_steps: int | None = Field(None, ge=1, description="Cap on local steps per round.")


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
        if v.lower() in BUILTIN_STRATEGIES:
            return v.lower()
        if ":" not in v:
            raise ValueError(
                f"unknown strategy {v!r}; use one of {', '.join(BUILTIN_STRATEGIES)} "
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


class DPSection(_Strict):
    """Differential privacy: record-level DP-SGD at every site, or site-level DP."""

    enabled: bool = Field(False, description="Train with differential privacy.")
    mode: Literal["record", "site"] = Field(
        "record",
        description="'record': DP-SGD at each site (Opacus; each patient record is protected); "
        "'site': each site clips its whole update and adds its share of Gaussian noise "
        "(each hospital is protected; the coordinator accounts the ε).",
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        description="Record mode: DP-SGD noise multiplier σ (noise std / max_grad_norm). "
        "Give this or target_epsilon.",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="Record mode: ε each site may spend over the planned rounds x local steps; "
        "each site's noise is calibrated to it. Give this or noise_multiplier.",
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="δ of the guarantee; must be below 1/n for a site with n training records "
        "(record mode) or below 1/number of sites (site mode).",
    )
    max_grad_norm: float = Field(
        1.0, gt=0, description="Record mode: per-sample gradient clipping norm C."
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Privacy accountant: Rényi DP ('rdp') or PRV composition ('prv')."
    )
    grad_sample_mode: Literal["auto", "bk", "hooks", "ghost", "ew"] = Field(
        "auto",
        description="Per-sample-gradient path; 'auto' picks fedhealth's book-keeping ('bk', "
        "every zoo model), else Opacus's ghost clipping when Linear layers hold most "
        "parameters, else hooks ('ew' is needed for resnet18 outside 'bk').",
    )
    clip_norm: float | None = Field(
        None,
        gt=0,
        description="Site mode: L2 bound on each site's whole update (new minus global weights).",
    )
    site_noise_multiplier: float | None = Field(
        None,
        gt=0,
        description="Site mode: σ of the summed update; each site adds noise of std "
        "σ·clip_norm/sqrt(expected_sites).",
    )
    expected_sites: int | None = Field(
        None,
        ge=1,
        description="Site mode: number of sites whose noise shares make up the full noise "
        "(default: the number of listed sites).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DPSection:
        if not self.enabled:
            return self
        record_keys = {
            "noise_multiplier": self.noise_multiplier,
            "target_epsilon": self.target_epsilon,
        }
        site_keys = {
            "clip_norm": self.clip_norm,
            "site_noise_multiplier": self.site_noise_multiplier,
            "expected_sites": self.expected_sites,
        }
        if self.mode == "record":
            given = [k for k, v in record_keys.items() if v is not None]
            if len(given) != 1:
                raise ValueError(
                    "record-level DP needs exactly one of `privacy.dp.noise_multiplier` and "
                    f"`privacy.dp.target_epsilon` (got {', '.join(given) or 'neither'})"
                )
            extra = [k for k, v in site_keys.items() if v is not None]
            if extra:
                raise ValueError(
                    f'{", ".join(f"`privacy.dp.{k}`" for k in extra)} apply to mode = "site" '
                    'only; remove them or set mode = "site"'
                )
        else:
            missing = [k for k in ("clip_norm", "site_noise_multiplier") if site_keys[k] is None]
            if missing:
                raise ValueError(
                    f"site-level DP needs {' and '.join(f'`privacy.dp.{k}`' for k in missing)}"
                )
            extra = [k for k, v in record_keys.items() if v is not None]
            if extra:
                raise ValueError(
                    f'{", ".join(f"`privacy.dp.{k}`" for k in extra)} apply to mode = "record" '
                    "only; site-level noise is `privacy.dp.site_noise_multiplier`"
                )
        return self


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
        tabular = self.model.name in TABULAR_MODELS
        if tabular != (self.task.kind == "tabular"):
            raise ValueError(
                f"model {self.model.name!r} does not fit a {self.task.kind} task; "
                f"tabular models are {', '.join(TABULAR_MODELS)}"
            )
        return self

    @model_validator(mode="after")
    def _privacy_fits_experiment(self) -> ExperimentConfig:
        dp = self.privacy.dp
        if not dp.enabled:
            return self
        if self.strategy.name == "fedprox" or "proximal_mu" in self.strategy.options:
            raise ValueError(
                "`privacy.dp.enabled` with FedProx (`strategy.name`/`strategy.options."
                "proximal_mu`): the proximal term is added outside Opacus's per-sample "
                "gradients, so it would be dropped or break clipping. Use fedavg, fedadam, "
                "fedyogi, fedadagrad or fedavgm with DP"
            )
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

    def dp_spec(self) -> dict[str, Any]:
        """The ``[privacy.dp]`` section as sites receive it (``expected_sites`` resolved)."""
        dp = self.privacy.dp.model_dump(mode="json")
        if dp["enabled"] and dp["mode"] == "site" and dp["expected_sites"] is None:
            dp["expected_sites"] = len(self.experiment.sites)
        return dp

    def task_spec(self) -> dict[str, Any]:
        """What a site needs to know to train: task, model, training and privacy plan."""
        return {
            "experiment": self.experiment.name,
            "task": self.task.model_dump(mode="json", by_alias=True),
            "model": self.model.model_dump(mode="json"),
            "training": self.training.model_dump(mode="json"),
            "seed": self.experiment.seed,
            "rounds": self.experiment.rounds,
            "dp": self.dp_spec(),
        }


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
        image_kinds = ("dicom", "images", "npz")
        table_kinds = ("tabular", "fhir", "omop")  # all three give the same table
        if (exp.task.kind == "tabular") != (ds.kind in table_kinds) or (
            exp.task.kind == "image" and ds.kind not in image_kinds
        ):
            raise ConfigError(
                f"{site_path}: key `datasets.{exp.task.dataset}.kind`: {ds.kind!r} data cannot "
                f"feed the experiment's {exp.task.kind!r} task"
            )
    return exp, sites
