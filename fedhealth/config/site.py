"""Schema of a site profile (``sites/*.toml``): one hospital's data, policy and keys.

A real hospital keeps its own profile on its own machine; the profiles in
``sites/`` are the reference consortia and the simulation's sites. Relative
paths are resolved against the profile's folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from fedhealth.catalogue import READERS, UnknownName, options_problems
from fedhealth.config.loader import load_model

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = Path(value).expanduser()
    return (Path(base) / value).resolve() if base and not value.is_absolute() else value


def _resolve_optional(value: Path | None, info: ValidationInfo) -> Path | None:
    return None if value is None else _resolve(value, info)


class DataSourceBase(_Strict):
    """Base of a dataset kind's options: ``kind`` and a ``path`` relative to the profile.

    Each reader in ``fedhealth/data/`` subclasses it (with ``kind: Literal["..."]``) and
    registers it in :data:`fedhealth.catalogue.READERS`.
    """

    kind: str
    path: Path

    _abs = field_validator("path")(_resolve)


def _data_source(value: Any, info: ValidationInfo) -> BaseModel:
    """Validate one ``[datasets.<name>]`` table with the options of its ``kind``."""
    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, dict):
        raise ValueError("a dataset is a table with `kind` and `path`")
    kind = value.get("kind")
    if kind is None:
        raise ValueError(f"`kind` is missing; use one of {', '.join(READERS.names())}")
    try:
        entry = READERS.get(str(kind))
    except UnknownName as exc:
        raise ValueError(str(exc)) from None
    assert entry.options is not None  # every reader declares its options
    try:
        return entry.options.model_validate(value, context=info.context)
    except ValidationError as exc:
        raise ValueError(options_problems(exc, f"dataset kind {kind!r}")) from None


DataSource = Annotated[SerializeAsAny[DataSourceBase], BeforeValidator(_data_source)]


class PrivacyPolicySection(_Strict):
    """The site's privacy policy: what it accepts and how much it may ever spend."""

    require_dp: bool = Field(False, description="Refuse rounds without differential privacy.")
    require_he: bool = Field(False, description="Refuse rounds without encrypted aggregation.")
    min_noise_multiplier: float = Field(
        0.0, ge=0, description="Refuse DP-SGD with less noise than this."
    )
    max_epsilon_per_experiment: float | None = Field(
        None, gt=0, description="Cap on epsilon one experiment may spend on a dataset."
    )
    lifetime_epsilon_budget: float | None = Field(
        None, gt=0, description="Cap on epsilon spent on a dataset across all experiments, ever."
    )
    max_delta: float | None = Field(None, gt=0, lt=1, description="Largest delta the site accepts.")
    allowed_experiments: list[str] | None = Field(
        None, description="Experiment names (or globs) the site takes part in; none = any."
    )
    allowed_models: list[str] | None = Field(
        None, description="Model names the site trains; none = any."
    )
    exempt_datasets: list[str] = Field(
        default_factory=list,
        description="Datasets without personal data (synthetic or public): the DP rules and "
        "ε caps above do not apply to them; experiments and models are still checked.",
    )
    share_statistics: bool = Field(
        False,
        description="Answer consortium-normalisation queries: per-feature sums and sums of "
        "squares of the training split, clamped to the schema's bounds and noised under DP "
        "(charged to the ledger), once per study.",
    )
    min_split_records: int = Field(
        50,
        ge=1,
        description="Fewest records in a split that metrics or statistics are computed on or "
        "that training releases from (rule split-too-small); exempt datasets are not checked.",
    )
    release_metrics: Literal["dp", "withheld", "exact"] | None = Field(
        None,
        description="How `train-loss` and evaluation loss/accuracy leave the site: Gaussian "
        "noise charged to the ledger ('dp'), not at all ('withheld') or exact ('exact'). "
        "Default: 'dp', and 'exact' for exempt datasets.",
    )
    metrics_noise_multiplier: float = Field(
        5.0,
        gt=0,
        description="σ of each metric release: noise std / sensitivity (a record moves the "
        "correct count by 1 and the clamped loss sum by `metrics_loss_bound`).",
    )
    metrics_loss_bound: float = Field(
        5.0, gt=0, description="Per-record loss is clamped to [0, this] before a DP release."
    )
    statistics_noise_multiplier: float = Field(
        5.0,
        gt=0,
        description="σ of the consortium statistics release (noise std / L2 sensitivity of "
        "the clamped, range-scaled sums and centred squares; docs/privacy.md).",
    )
    min_cell_count: int = Field(
        5,
        ge=1,
        description="Analytics: refuse an analysis whose count/crosstab cell, or whose "
        "records behind any other query (per survival group), number fewer than this.",
    )
    approval: str = Field(
        "rules",
        pattern=r"^(rules|manual)$",
        description="'rules': a study the rules above allow runs at once (the reference "
        "consortia run unattended); 'manual': a study not pinned in `approved_studies` waits "
        "until the site operator approves it (`fedhealth site approve`); the coordinator "
        "is told only that it is pending. Use 'manual' for a real hospital.",
    )
    approved_studies: list[str] = Field(
        default_factory=list,
        description="Study hashes (64 hex digits, from `fedhealth site requests` or the "
        "coordinator's output) approved in advance; the rules above still apply.",
    )

    @field_validator("approved_studies")
    @classmethod
    def _study_hashes(cls, v: list[str]) -> list[str]:
        out = [h.strip().lower().removeprefix("sha256:") for h in v]
        bad = [h for h in out if not re.fullmatch(r"[0-9a-f]{64}", h)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a study hash (64 hex digits)")
        return out


class LimitsSection(_Strict):
    """Resource caps a request must fit before the site builds a model or trains.

    The defaults fit every catalogue model (resnet18: 11.2 M parameters) and the reference
    experiments; a request beyond a cap is refused (rule ``limits.<key>``) before any
    model is built, any data is read for training, or any ε is charged.
    """

    max_model_parameters: int = Field(
        15_000_000, ge=1, description="Largest model (parameters) the site builds."
    )
    max_local_epochs: int = Field(50, ge=1, description="Most local epochs per round.")
    max_local_steps: int = Field(
        10_000, ge=1, description="Most optimiser steps per round (epochs x batches, capped)."
    )
    max_batch_size: int = Field(4096, ge=1, description="Largest local batch size.")
    max_image_size: int = Field(256, ge=8, description="Largest image side (pixels).")


class KeysSection(_Strict):
    """The site's consortium keys, from `fedhealth consortium init` (encrypted aggregation)."""

    identity: Path = Field(
        description="The site's private signing and key-agreement keys "
        "(sites/SITE/identity.pem of the ceremony; mode 0600)."
    )
    he_secret: Path = Field(
        description="The CKKS secret wrapped for this site (sites/SITE/he-secret.wrapped)."
    )
    registry: Path = Field(
        description="The consortium registry taken from the ceremony, not from the "
        "coordinator (public/registry.json)."
    )
    he_ledger: Path | None = Field(
        None,
        description="Where the site remembers what it encrypted and decrypted per round "
        "(default: he-ledger.json in the site's workspace). Never delete it.",
    )
    min_decrypt_sites: int = Field(
        2,
        ge=2,
        description="Fewest distinct sites' contributions an aggregate must hold before this "
        "site decrypts it.",
    )
    max_weight_share: float = Field(
        0.99,
        gt=0,
        le=1,
        description="Largest share of an aggregate's total weight any one site's contribution "
        "may hold before this site decrypts it (the others carry at least the rest).",
    )

    _abs = field_validator("identity", "he_secret", "registry", "he_ledger")(_resolve_optional)


class DeploySection(_Strict):
    """How the site's SuperNode joins a real deployment (``fedhealth site start``)."""

    superlink: str = Field(
        "127.0.0.1:9093", description="The coordinator's SuperLink address as host:port."
    )
    root_certificate: Path | None = Field(
        None,
        description="The consortium CA certificate (sites/<name>/tls/ca.pem of "
        "`fedhealth consortium init`); none = an insecure connection (testing only).",
    )
    auth_key: Path | None = Field(
        None,
        description="The SuperNode authentication private key (sites/<name>/supernode.key; "
        "mode 0600); needed when the SuperLink authenticates SuperNodes.",
    )
    port: int = Field(
        9094, ge=1, le=65535, description="Port of this SuperNode's own local API (one per node)."
    )

    _abs = field_validator("root_certificate", "auth_key")(_resolve_optional)


class SiteSection(_Strict):
    """Who the site is and where it keeps its state."""

    name: str = Field(description="The site's name, unique in the consortium.")
    display_name: str | None = Field(None, description="Human-readable name.")
    workspace: Path = Field(
        Path("../workspace/sites"),
        description="Folder for the site's ledger, audit log and logs; the site name is appended.",
    )

    _abs = field_validator("workspace")(_resolve)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SITE_NAME.match(v):
            raise ValueError(
                f"site name {v!r} must be lower-case letters, digits, '-' or '_' (max 63)"
            )
        return v


class SplitSection(_Strict):
    """How the site splits one dataset (``[splits.NAME]``): pinned by the site, not the
    coordinator. A key left out is pinned on first use (the experiment's proposal,
    recorded in ``splits.json`` of the workspace with a line in the audit log)."""

    split_seed: int | None = Field(None, description="Seed of the train/test split.")
    test_fraction: float | None = Field(
        None, gt=0, lt=1, description="Share of the records held out for evaluation."
    )
    schema_hash: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the task's schema the site accepts for this dataset (as "
        "`fedhealth.site.split_pins.schema_hash` computes it; the audit log shows it).",
    )


class SiteProfile(_Strict):
    """A hospital's site profile."""

    site: SiteSection
    datasets: dict[str, DataSource] = Field(min_length=1)
    privacy: PrivacyPolicySection = PrivacyPolicySection()
    keys: KeysSection | None = Field(
        None, description="Consortium keys; needed for experiments with privacy.he on."
    )
    deploy: DeploySection | None = Field(
        None, description="How the SuperNode connects in a real deployment (`site start`)."
    )
    limits: LimitsSection = Field(
        default_factory=LimitsSection,
        description="Resource caps on what a coordinator may ask this site to build and run.",
    )
    splits: dict[str, SplitSection] = Field(
        default_factory=dict,
        description="Per dataset: the split seed, test fraction and schema hash this site "
        "accepts (others are pinned on first use).",
    )

    @property
    def name(self) -> str:
        """The site's name, unique in the consortium."""
        return self.site.name

    @property
    def workspace(self) -> Path:
        """The site's own state folder."""
        return self.site.workspace / self.site.name

    @property
    def ledger_path(self) -> Path:
        """The site's privacy ledger (SQLite), in its workspace."""
        return self.workspace / "privacy-ledger.sqlite"

    @property
    def noise_key_path(self) -> Path:
        """The site's secret key from which its DP noise and sampling are derived."""
        return self.workspace / "dp-noise.key"


def load_site(path: Path) -> SiteProfile:
    """Load and validate a site profile.

    Parameters
    ----------
    path : Path
        The profile TOML.

    Returns
    -------
    SiteProfile
        The validated profile, with data paths made absolute.
    """
    return load_model(Path(path), SiteProfile)
