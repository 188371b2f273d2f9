"""Schema of a site profile (``sites/*.toml``): one hospital's data, policy and keys.

A real hospital keeps its own profile on its own machine; the profiles in
``sites/`` are the reference consortia and the simulation's sites. Relative
paths are resolved against the profile's folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fedhealth.config.ehr_sources import FhirSource, OmopSource
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


class TabularSource(_Strict):
    """A table of EHR records (CSV or Parquet)."""

    kind: Literal["tabular"] = Field(description="A CSV or Parquet table.")
    path: Path = Field(description="The table file (.csv, .data, .txt or .parquet).")
    columns: list[str] | None = Field(
        None, description="Header names for a header-less CSV (e.g. the UCI files)."
    )
    na_values: list[str] = Field(
        default_factory=lambda: ["?", ""], description="Tokens that mean a missing value."
    )

    _abs = field_validator("path")(_resolve)


class DicomSource(_Strict):
    """A folder of DICOM files with a labels CSV (``file,label``)."""

    kind: Literal["dicom"] = Field(description="A folder of DICOM files.")
    path: Path = Field(description="The folder.")
    labels: Path = Field(
        Path("labels.csv"), description="Labels CSV (file,label), relative to the folder."
    )
    skip_bad_files: bool = Field(
        False, description="Skip unreadable files (reported by name) instead of failing."
    )

    _abs = field_validator("path")(_resolve)


class ImageFolderSource(_Strict):
    """A folder of PNG/JPEG images with a labels CSV (``file,label``)."""

    kind: Literal["images"] = Field(description="A folder of PNG/JPEG images.")
    path: Path = Field(description="The folder.")
    labels: Path = Field(
        Path("labels.csv"), description="Labels CSV (file,label), relative to the folder."
    )
    skip_bad_files: bool = Field(
        False, description="Skip unreadable files (reported by name) instead of failing."
    )

    _abs = field_validator("path")(_resolve)


class NpzSource(_Strict):
    """A MedMNIST-style ``.npz`` (``<split>_images``, ``<split>_labels``)."""

    kind: Literal["npz"] = Field(description="A MedMNIST-style .npz archive.")
    path: Path = Field(description="The .npz file.")
    split: Literal["train", "val", "test", "all"] = Field(
        "all", description="Which split's arrays to read; 'all' concatenates them."
    )

    _abs = field_validator("path")(_resolve)


DataSource = Annotated[
    TabularSource | DicomSource | ImageFolderSource | NpzSource | FhirSource | OmopSource,
    Field(discriminator="kind"),
]


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
        True,
        description="Answer consortium-normalisation queries: exact per-feature sums, sums of "
        "squares and the count of the training split, outside any DP guarantee.",
    )
    min_cell_count: int = Field(
        5,
        ge=1,
        description="Analytics: refuse an analysis whose count/crosstab cell, or whose "
        "records behind any other query (per survival group), number fewer than this.",
    )


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
