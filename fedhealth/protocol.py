"""The wire protocol between the coordinator and the sites: one typed, import-free module.

Everything that crosses the wire is named here and nowhere else: the Flower message kinds
(:class:`MessageKind`), the records of a message (:class:`Record`), the keys of the round's
``"config"`` record (:class:`ConfigKey`) and of the other records (:class:`SiteKey`,
:class:`Metric`, :class:`StatsKey`, :class:`HEKey`), the task spec (:class:`TaskSpec`), the
whole round config (:class:`RoundConfig`, with the encrypted-aggregation announcement
:class:`HERound`) and a site's refusal (:class:`Refusal`).

It imports only the standard library, pydantic and :mod:`fedhealth.catalogue` (itself
standard library and pydantic only: model names and option schemas), so that a site's
ClientApp and the coordinator both read it without loading torch, Flower or TenSEAL.

**One schema, not two.** The experiment config's ``[task]``, ``[model]``, ``[training]`` and
``[privacy.dp]`` sections *are* what a site receives, so their pydantic models live here
(:class:`TaskSection`, :class:`ModelSection`, :class:`TrainingSection`, :class:`DPSection`)
and :mod:`fedhealth.config.experiment` composes them into ``ExperimentConfig``. The
coordinator builds a :class:`TaskSpec` once (``ExperimentConfig.task_spec()``); a site parses
it once (:meth:`RoundConfig.from_record`), with the same validation the config file had, so
a hostile or mistaken coordinator cannot send what a config file could not hold. A malformed
value is a :class:`ProtocolError` naming the field; the site answers it with a
:class:`Refusal`, never an exception.

**Canonical bytes.** :meth:`TaskSpec.canonical_bytes` is JSON with sorted keys, no
whitespace and ASCII only; :meth:`TaskSpec.digest` is its SHA-256. The spec carries
``protocol_version``; a site refuses a version it does not speak.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedhealth.catalogue import MODELS, UnknownName, options_problems

PROTOCOL_VERSION: Final = 1
REFUSAL_CODE: Final = 4100  # Flower Error code of a site's deliberate refusal (policy, data)


class MessageKind:
    """Flower message types (``Message.metadata.message_type``) fedhealth sends."""

    TRAIN: Final = "train"
    EVALUATE: Final = "evaluate"
    QUERY: Final = "query"  # consortium statistics
    DECRYPT_ACTION: Final = "decrypt"
    DECRYPT: Final = f"query.{DECRYPT_ACTION}"  # decrypt the round's encrypted sum
    IDENTIFY_ACTION: Final = "identify"
    IDENTIFY: Final = f"query.{IDENTIFY_ACTION}"  # which site is this node
    STUDY_ACTION: Final = "study"
    STUDY: Final = f"query.{STUDY_ACTION}"  # has the site approved this study
    VALIDATE_ACTION: Final = "validate"
    VALIDATE: Final = f"query.{VALIDATE_ACTION}"  # evaluate a registered model (histograms)
    ANALYSIS_ACTION: Final = "analysis"
    ANALYSIS: Final = f"query.{ANALYSIS_ACTION}"  # federated analytics (:class:`AnalysisKey`)


class Record:
    """Names of the records of a message's ``RecordDict``."""

    CONFIG: Final = "config"  # ConfigRecord: the round config (:class:`ConfigKey`)
    ARRAYS: Final = "arrays"  # ArrayRecord: global model (request) or update (plaintext reply)
    METRICS: Final = "metrics"  # MetricRecord: a reply's numbers (:class:`Metric`)
    SITE: Final = "site"  # ConfigRecord: who replied (:class:`SiteKey`)
    STATS: Final = "stats"  # ConfigRecord: a statistics reply (:class:`StatsKey`)
    HE_CONTRIBUTION: Final = "he-contribution"  # ConfigRecord: signed CKKS update
    HE_REQUEST: Final = "he-request"  # ConfigRecord: a decryption request
    HE_ANSWER: Final = "he-aggregate"  # ArrayRecord: a decrypted aggregate
    STUDY: Final = "study"  # ConfigRecord: a study-status reply (:class:`StudyKey`)
    VALIDATION: Final = "validation"  # ConfigRecord: a validation request/reply (ValidationKey)
    ANALYSIS: Final = "analysis"  # ConfigRecord: an analysis request (:class:`AnalysisKey`)
    RELEASE: Final = "release"  # ConfigRecord: a site's noisy analysis release


class ConfigKey:
    """Keys of the ``"config"`` record a coordinator sends with every request."""

    SPEC: Final = "spec"  # TaskSpec, canonical JSON
    SERVER_ROUND: Final = "server-round"
    NORM_STATS: Final = "norm-stats"  # consortium mean/std (JSON) or ""
    MLFLOW_RUN_ID: Final = "mlflow-run-id"
    REGISTERED_MODEL: Final = "registered-model"
    PROXIMAL_MU: Final = "proximal-mu"  # set by Flower's FedProx
    WEIGHT_EXPONENT: Final = "weight-exponent"  # set by strategies/balanced_fedavg.py
    HE_ENABLED: Final = "he-enabled"
    HE_EXPERIMENT: Final = "he-experiment"
    HE_ROUND: Final = "he-round"
    HE_NONCE: Final = "he-nonce"
    HE_WEIGHT_SCALE: Final = "he-weight-scale"
    HE_WEIGHT_KEY: Final = "he-weight-key"
    HE_MIN_SITES: Final = "he-min-sites"
    HE_COHORT: Final = "he-cohort"
    #: bool, only in the final round's evaluation of a training run: release score
    #: histograms per class (:class:`ValidationKey` ``release`` in the reply's ``"validation"``).
    SCORE_HISTOGRAMS: Final = "score-histograms"


class SiteKey:
    """Keys of a reply's ``"site"`` record."""

    NAME: Final = "name"
    DP_PATH: Final = "dp-path"  # which per-sample-gradient path ran


class StatsKey:
    """Keys of a statistics reply's ``"stats"`` record."""

    MOMENTS: Final = "moments"  # JSON {"count", "sum", "sumsq"}
    #: JSON {"epsilon", "delta", "noise_multiplier", "sum_noise_std", "sumsq_noise_std"}: how
    #: the site noised its sums under DP (``sum``/``sumsq`` are then noisy).
    DP: Final = "dp"


class StudyKey:
    """Keys of a study-status reply's ``"study"`` record (``query.study``)."""

    HASH: Final = "hash"  # the study hash the site computed (fedhealth.study)
    STATUS: Final = "status"  # "approved" (pending and declined are refusals)


class ValidationKey:
    """Keys of the ``"validation"`` record of a ``query.validate`` request and its reply.

    The reply of a training run's final evaluation carries the same record (its ``release``)
    when the request asked for score histograms (:attr:`ConfigKey.SCORE_HISTOGRAMS`).
    """

    SPLIT: Final = "split"  # request: "test" (the site's pinned test split) or "all"
    RELEASE: Final = "release"  # reply: JSON histograms (fedhealth.evaluation.histograms)


class AnalysisKey:
    """Keys of an analysis request's ``"analysis"`` record and its reply's ``"release"``.

    The spec is :class:`fedhealth.config.analysis.AnalysisSpec` as canonical JSON (sorted
    keys, no whitespace, ASCII); the site validates it again with the same rules as a file.
    """

    PROTOCOL_VERSION: Final = "protocol-version"  # int: PROTOCOL_VERSION of the sender
    SPEC: Final = "spec"  # in "analysis": the AnalysisSpec, canonical JSON
    RELEASE: Final = "release"  # in "release": JSON of the site's release (noisy numbers, ε)
    STUDY: Final = "study"  # in "release": the study hash the site admitted


class HEKey:
    """Keys inside the encrypted-aggregation records."""

    CONTRIBUTION: Final = "contribution"  # in "he-contribution": signed Contribution (JSON)
    CHUNKS: Final = "chunks"  # in "he-contribution": ciphertext chunks
    EXPERIMENT_ID: Final = "experiment_id"  # in "he-request"
    ROUND: Final = "round"
    NONCE: Final = "nonce"
    CONTRIBUTIONS: Final = "contributions"
    SUM_CHUNKS: Final = "sum_chunks"
    ANSWER_ARRAY: Final = "aggregate"  # in "he-aggregate"


class Metric:
    """Keys of a reply's ``"metrics"`` record."""

    NUM_EXAMPLES: Final = "num-examples"
    SITE_WEIGHT: Final = "site-weight"  # aggregation weight (BalancedFedAvg, site-level DP)
    TRAIN_LOSS: Final = "train-loss"
    LOCAL_STEPS: Final = "local-steps"
    SKIPPED_FILES: Final = "skipped-files"  # a count of unreadable files skipped; never names
    LOSS: Final = "loss"
    ACCURACY: Final = "accuracy"
    EPSILON: Final = "epsilon"
    EPSILON_ROUND: Final = "epsilon-round"
    DP_STEPS: Final = "dp-steps"
    NOISE_MULTIPLIER: Final = "noise-multiplier"
    SAMPLE_RATE: Final = "sample-rate"
    DELTA: Final = "delta"
    HE_ENCRYPT_SECONDS: Final = "he-encrypt-seconds"
    HE_DECRYPT_SECONDS: Final = "he-decrypt-seconds"
    HE_BYTES: Final = "he-bytes"
    #: 1.0 when the site's policy withholds its metrics (``privacy.release_metrics``): the
    #: reply then carries no loss or accuracy.
    WITHHELD: Final = "metrics-withheld"
    #: Std of the Gaussian noise a site added to a released accuracy / loss (0: exact).
    ACCURACY_NOISE_STD: Final = "accuracy-noise-std"
    LOSS_NOISE_STD: Final = "loss-noise-std"


_EXPERIMENT_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class ProtocolError(ValueError):
    """A message does not follow the protocol; ``field`` names where, ``rule`` the check."""

    def __init__(self, message: str, field: str = "", rule: str = "protocol") -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _invalid(what: str, exc: ValidationError, prefix: str = "") -> ProtocolError:
    """One error naming every malformed field (pydantic's ``loc``) of ``what``."""
    errors = exc.errors(include_url=False, include_input=False)
    fields = [prefix + _loc(e["loc"]) for e in errors]
    detail = "; ".join(f"`{f}`: {e['msg']}" for f, e in zip(fields, errors, strict=True))
    return ProtocolError(f"malformed {what}: {detail}", field=fields[0] if fields else "")


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TabularSchemaSection(_Wire):
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
    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Numeric column -> [low, high]: a site clamps the column to it before "
        "releasing consortium statistics under DP (the noise is calibrated to the range). "
        'Every numeric column needs one for `normalisation = "consortium"`; one-hot '
        "columns are bounded by [0, 1].",
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
        unknown = sorted(set(self.bounds) - set(self.numeric))
        if unknown:
            raise ValueError(f"`bounds` names columns that are not numeric features: {unknown}")
        for col, (low, high) in self.bounds.items():
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"`bounds.{col}` must be two finite numbers, low < high")
        return self


class TaskSection(_Wire):
    """What to learn and from which of the sites' registered datasets."""

    dataset: str = Field(description="Name of the dataset every site registers in its profile.")
    kind: Literal["tabular", "image"] = Field(description="Tabular (EHR) or image task.")
    num_classes: int = Field(2, ge=2, description="Number of classes.")
    test_fraction: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="Share of each site's records held out for evaluation (stratified). The "
        "consortium proposes it; each site pins its own per dataset (`[splits.NAME]` of its "
        "profile, or the first value it accepted) and refuses another (rule split-mismatch).",
    )
    split_seed: int = Field(
        43,
        description="Seed of the train/test split: a proposal, pinned per dataset by each site "
        "like `test_fraction`.",
    )
    normalisation: Literal["site", "consortium", "none"] = Field(
        "site",
        description="z-score with each site's own statistics, with consortium statistics "
        "from federated sums and counts, or not at all.",
    )
    image_size: int = Field(
        32, ge=8, le=512, description="Images are resized to image_size x image_size."
    )
    schema_: TabularSchemaSection | None = Field(None, alias="schema")

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    @model_validator(mode="after")
    def _schema(self) -> TaskSection:
        if self.kind == "tabular" and self.schema_ is None:
            raise ValueError("a tabular task needs a [task.schema] table")
        if self.kind == "image" and self.schema_ is not None:
            raise ValueError("[task.schema] applies to tabular tasks only")
        return self


class ModelSection(BaseModel):
    """Which network from the model catalogue, and its options (see the models below)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    name: str = Field(description="Network from the model catalogue (listed below).")

    @model_validator(mode="before")
    @classmethod
    def _options(cls, data: Any) -> Any:
        # The keys beside `name` are that model's options, checked against its own schema,
        # so a site refuses options a config file could not hold.
        if not isinstance(data, dict) or "name" not in data:
            return data
        name = str(data["name"])
        try:
            entry = MODELS.get(name)
        except UnknownName as exc:
            raise ValueError(str(exc)) from None
        given = {k: v for k, v in data.items() if k != "name"}
        if entry.options is None:
            return data
        try:
            options = entry.options.model_validate(given).model_dump()
        except ValidationError as exc:
            raise ValueError(options_problems(exc, f"model {name!r}")) from None
        return {"name": name, **options}

    def options(self) -> dict[str, Any]:
        """The model's options (every key but ``name``)."""
        return dict(self.model_extra or {})


class TrainingSection(_Wire):
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
    local_steps: int | None = Field(
        None,
        ge=1,
        description="Exactly this many optimiser steps per round at every site, cycling "
        "through its training split as often as needed (instead of `local_epochs`; FLamby's "
        "recipe). Under DP-SGD each step is a Poisson batch and the accountant counts every one.",
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingSection:
        if self.local_steps is not None and (self.local_epochs != 1 or self.max_steps is not None):
            raise ValueError(
                "`local_steps` fixes the steps per round: leave out `local_epochs` and `max_steps`"
            )
        return self

    def steps_per_round(self, steps_per_epoch: int) -> int:
        """Optimiser steps one round runs at a site whose epoch has ``steps_per_epoch`` batches.

        Parameters
        ----------
        steps_per_epoch : int
            Batches in one pass over the site's training split.

        Returns
        -------
        int
            ``local_steps`` if set, else ``local_epochs x steps_per_epoch`` capped by
            ``max_steps``.
        """
        if self.local_steps is not None:
            return self.local_steps
        steps = self.local_epochs * steps_per_epoch
        return min(steps, self.max_steps) if self.max_steps is not None else steps


class DPSection(_Wire):
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


class StrategySpec(_Wire):
    """The coordinator's aggregation strategy, as declared to the sites (part of the study)."""

    name: str = Field(
        description="Catalogue name, or 'file.py:ClassName' of a custom strategy.",
        max_length=200,
    )
    code_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of a custom strategy's source file (none for catalogued ones: "
        "the fedhealth version covers them).",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="The strategy's options.")


class HESpec(_Wire):
    """The encrypted-aggregation parameters of the study (``[privacy.he]`` and min_sites).

    Each encrypted round's announcement must match them (rule ``study-mismatch``).
    """

    weight_scale: float = Field(gt=0, description="Public divisor of the sites' weights.")
    quorum: int = Field(ge=1, description="Sites asked to decrypt each round's sum.")
    bind_cohort: bool = Field(description="Each round names the sites of its sum.")
    min_sites: int = Field(ge=1, description="Fewest contributions in a decrypted sum.")


class TaskSpec(_Wire):
    """What a site needs to know to train: the experiment's task, model, training and DP plan.

    Built once by the coordinator (``ExperimentConfig.task_spec()``), sent as
    :meth:`canonical_bytes`, parsed once by the site (:meth:`from_wire`).
    """

    protocol_version: int = Field(PROTOCOL_VERSION, description="Version of this protocol.")
    experiment: str = Field(pattern=_EXPERIMENT_NAME, description="Experiment name.")
    task: TaskSection
    model: ModelSection
    training: TrainingSection
    seed: int = Field(description="Seed of initial weights and batch order.")
    rounds: int = Field(ge=1, le=10_000, description="Planned rounds (DP plans spend over them).")
    dp: DPSection = Field(default_factory=DPSection)
    strategy: StrategySpec | None = Field(
        None, description="The aggregation strategy and its code hash (the coordinator's)."
    )
    he: HESpec | None = Field(None, description="Encrypted aggregation; none = plaintext.")

    @field_validator("protocol_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != PROTOCOL_VERSION:
            raise ValueError(
                f"protocol version {v}, but this fedhealth speaks version {PROTOCOL_VERSION}; "
                "run the same fedhealth version at the coordinator and the sites"
            )
        return v

    @model_validator(mode="after")
    def _model_fits_task(self) -> TaskSpec:
        if self.task.kind not in MODELS.get(self.model.name).traits:
            raise ValueError(f"model {self.model.name!r} does not fit a {self.task.kind} task")
        if self.dp.enabled and self.dp.mode == "site" and self.dp.expected_sites is None:
            raise ValueError("site-level DP needs `dp.expected_sites` resolved by the coordinator")
        return self

    def canonical_bytes(self) -> bytes:
        """Deterministic JSON (sorted keys, no whitespace, ASCII): what is hashed and signed."""
        data = self.model_dump(mode="json", by_alias=True)
        return json.dumps(
            data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")

    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`canonical_bytes`."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @classmethod
    def from_wire(cls, text: str | bytes) -> TaskSpec:
        """Parse a spec as sent; :class:`ProtocolError` names the malformed field."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise _invalid("task spec (config key `spec`)", exc, prefix="spec.") from None


class NormStats(_Wire):
    """Consortium-wide per-feature mean and standard deviation (``norm-stats``)."""

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> NormStats:
        if len(self.mean) != len(self.std):
            raise ValueError("`mean` and `std` differ in length")
        if any(s <= 0 for s in self.std):
            raise ValueError("every `std` must be > 0")
        return self


@dataclass(frozen=True)
class HERound:
    """The encrypted-aggregation part of one round's training config.

    Attributes
    ----------
    experiment_id
        Unique id of this attempt at running the experiment
        (``<experiment>:<MLflow run id>:<random>``): contributions and sums of another run,
        attempt or experiment are refused.
    round
        The round number.
    nonce
        Fresh random nonce of the round (from ``secrets``).
    weight_scale
        Public divisor of the sites' weights (``w = weight / weight_scale``).
    weight_key
        The reply metric a site weights its update by (``num-examples``, ``site-weight``).
    min_sites
        The experiment's ``min_sites``; a site decrypts only sums of at least
        ``max(min_sites, its own floor, 2)`` contributions.
    cohort
        With ``privacy.he.bind_cohort``: the sorted names of the sites sampled for the
        round; each signs it and decrypts only a sum of exactly these sites.
    """

    experiment_id: str
    round: int
    nonce: str
    weight_scale: float
    weight_key: str
    min_sites: int
    cohort: tuple[str, ...] | None = None

    @property
    def experiment(self) -> str:
        """The experiment name part of :attr:`experiment_id`."""
        return self.experiment_id.split(":", 1)[0]

    def to_config(self) -> dict[str, Any]:
        """The ``he-*`` keys to add to the round's training ``ConfigRecord``."""
        return {
            ConfigKey.HE_ENABLED: True,
            ConfigKey.HE_EXPERIMENT: self.experiment_id,
            ConfigKey.HE_ROUND: self.round,
            ConfigKey.HE_NONCE: self.nonce,
            ConfigKey.HE_WEIGHT_SCALE: float(self.weight_scale),
            ConfigKey.HE_WEIGHT_KEY: self.weight_key,
            ConfigKey.HE_MIN_SITES: int(self.min_sites),
            ConfigKey.HE_COHORT: json.dumps(None if self.cohort is None else list(self.cohort)),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HERound | None:
        """Read the announcement; ``None`` if the round is not encrypted.

        Raises
        ------
        ProtocolError
            The round is encrypted but the announcement is incomplete or malformed
            (``rule`` is ``"he-round"``).
        """
        if not config.get(ConfigKey.HE_ENABLED):
            return None
        try:
            cohort = json.loads(str(config.get(ConfigKey.HE_COHORT) or "null"))
            he = cls(
                cohort=None if cohort is None else tuple(str(s) for s in cohort),
                experiment_id=str(config[ConfigKey.HE_EXPERIMENT]),
                round=int(config[ConfigKey.HE_ROUND]),
                nonce=str(config[ConfigKey.HE_NONCE]),
                weight_scale=float(config[ConfigKey.HE_WEIGHT_SCALE]),
                weight_key=str(config[ConfigKey.HE_WEIGHT_KEY]),
                min_sites=int(config[ConfigKey.HE_MIN_SITES]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(
                f"the round's encrypted-aggregation announcement is incomplete ({exc!r}); "
                "the coordinator and this site run different fedhealth versions",
                field=str(exc.args[0]) if isinstance(exc, KeyError) else "",
                rule="he-round",
            ) from None
        if not (math.isfinite(he.weight_scale) and he.weight_scale > 0):
            raise ProtocolError(
                f"`{ConfigKey.HE_WEIGHT_SCALE}` must be a finite number > 0",
                field=ConfigKey.HE_WEIGHT_SCALE,
                rule="he-round",
            )
        return he


def _number(config: Mapping[str, Any], key: str, default: float, kind: type = float) -> Any:
    value = config.get(key, default)
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"config key `{key}`: {value!r} is not a number", field=key) from None
    if kind is float and not math.isfinite(out):
        raise ProtocolError(f"config key `{key}`: {value!r} is not finite", field=key)
    return out


@dataclass(frozen=True)
class RoundConfig:
    """The ``"config"`` record of a request: built by the coordinator, parsed once by a site.

    Attributes
    ----------
    spec
        The experiment's task spec.
    server_round
        The round (0 for the consortium statistics query).
    norm_stats
        Consortium normalisation statistics, once computed.
    mlflow_run_id, registered_model
        So each site's audit log names the run (and through it the model version).
    proximal_mu
        FedProx's proximal weight (Flower's FedProx adds it); 0 otherwise.
    weight_exponent
        BalancedFedAvg's exponent of the aggregation weight ``n ** alpha``; 1 otherwise.
    he
        The encrypted-aggregation announcement, ``None`` for a plaintext round.
    score_histograms
        Only in the evaluation of a training run's last round: the site also releases score
        histograms per class under its policy (ROC and calibration in the run report).
    """

    spec: TaskSpec
    server_round: int = 0
    norm_stats: NormStats | None = None
    mlflow_run_id: str = ""
    registered_model: str = ""
    proximal_mu: float = 0.0
    weight_exponent: float = 1.0
    he: HERound | None = None
    score_histograms: bool = False

    @property
    def experiment(self) -> str:
        """The experiment's name."""
        return self.spec.experiment

    def to_record(self) -> dict[str, Any]:
        """The keys of the ``"config"`` ``ConfigRecord`` (the HE announcement is added by
        the encrypted aggregation, FedProx's and BalancedFedAvg's keys by their strategies)."""
        out: dict[str, Any] = {
            ConfigKey.SPEC: self.spec.canonical_bytes().decode("ascii"),
            ConfigKey.NORM_STATS: self.norm_stats.model_dump_json() if self.norm_stats else "",
            ConfigKey.SERVER_ROUND: int(self.server_round),
            ConfigKey.MLFLOW_RUN_ID: self.mlflow_run_id,
            ConfigKey.REGISTERED_MODEL: self.registered_model,
        }
        if self.score_histograms:
            out[ConfigKey.SCORE_HISTOGRAMS] = True
        if self.he is not None:
            out.update(self.he.to_config())
        return out

    @classmethod
    def from_record(cls, config: Mapping[str, Any] | None) -> RoundConfig:
        """Parse a request's ``"config"`` record.

        Raises
        ------
        ProtocolError
            A key is missing or malformed; the message and ``field`` name it.
        """
        if config is None:
            raise ProtocolError("the request carries no `config` record", field=Record.CONFIG)
        raw = config.get(ConfigKey.SPEC)
        if raw is None:
            raise ProtocolError("config key `spec` is missing", field=ConfigKey.SPEC)
        spec = TaskSpec.from_wire(raw if isinstance(raw, (str, bytes)) else str(raw))
        stats = config.get(ConfigKey.NORM_STATS)
        norm = None
        if stats:
            try:
                norm = NormStats.model_validate_json(str(stats))
            except ValidationError as exc:
                raise _invalid("`norm-stats`", exc, prefix="norm-stats.") from None
        server_round = _number(config, ConfigKey.SERVER_ROUND, 0, int)
        if server_round < 0:
            raise ProtocolError("config key `server-round` is negative", ConfigKey.SERVER_ROUND)
        mu = _number(config, ConfigKey.PROXIMAL_MU, 0.0)
        if mu < 0:
            raise ProtocolError("config key `proximal-mu` is negative", ConfigKey.PROXIMAL_MU)
        histograms = config.get(ConfigKey.SCORE_HISTOGRAMS, False)
        if not isinstance(histograms, bool):
            raise ProtocolError(
                f"config key `{ConfigKey.SCORE_HISTOGRAMS}`: {histograms!r} is not a boolean",
                field=ConfigKey.SCORE_HISTOGRAMS,
            )
        return cls(
            spec=spec,
            server_round=server_round,
            norm_stats=norm,
            mlflow_run_id=str(config.get(ConfigKey.MLFLOW_RUN_ID, "") or ""),
            registered_model=str(config.get(ConfigKey.REGISTERED_MODEL, "") or ""),
            proximal_mu=mu,
            weight_exponent=_number(config, ConfigKey.WEIGHT_EXPONENT, 1.0),
            he=HERound.from_config(config),
            score_histograms=histograms,
        )


#: The rule a site names when its policy does not share per-feature sums
#: (``privacy.share_statistics = false``).
SHARE_STATISTICS_RULE = "share_statistics"


@dataclass
class Refusal:
    """A site's refusal (policy, data, malformed request) or failure in one round.

    Encoded as the ``reason`` of a Flower ``Error`` with code :data:`REFUSAL_CODE`: a JSON
    object ``{"site", "rule", "message", "round"}``. ``rule`` names the check that refused.
    """

    site: str
    rule: str
    message: str
    round: int = 0

    def encode(self) -> str:
        """The ``Error.reason`` text."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, reason: str | None, *, node: str = "?") -> Refusal:
        """Read an ``Error.reason``; a reason that is not a refusal (a crash's traceback)
        becomes rule ``"error"`` with its last line, from ``node``."""
        text = reason or ""
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError(text)
            return cls(
                str(d.get("site", "?")),
                str(d.get("rule", "?")),
                str(d.get("message", text)),
                int(d.get("round", 0) or 0),
            )
        except (ValueError, TypeError):
            last = text.strip().splitlines()[-1] if text.strip() else "no reason given"
            return cls(node, "error", last)
