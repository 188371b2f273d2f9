"""Schema of ``[privacy.he]``: homomorphic-encrypted aggregation of an experiment.

With it on, sites send CKKS-encrypted, signed updates; the coordinator adds ciphertexts
and asks ``quorum`` sites to decrypt the sum, so it never sees one site's update
(``docs/security.md``). The keys come from ``fedhealth consortium init``
(``docs/key-ceremony.md``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fedhealth.catalogue import STRATEGIES
from fedhealth.strategies import refusal


class HESection(BaseModel):
    """Encrypted aggregation (CKKS): the coordinator only ever decrypts the aggregate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        False,
        description="Sites send CKKS-encrypted, signed updates; the coordinator sums "
        "ciphertexts and a quorum of sites decrypts only the sum.",
    )
    keys_dir: Path | None = Field(
        None,
        description="Consortium directory made by `fedhealth consortium init` (the "
        "coordinator reads only coordinator/he-public.ctx and coordinator/sites.json from it).",
    )
    quorum: int = Field(
        2,
        ge=1,
        description="Sites asked to decrypt each round's sum; all their answers must agree "
        "(at most experiment.min_sites).",
    )
    weight_scale: float = Field(
        1000.0,
        gt=0,
        description="Public divisor of the sites' aggregation weights before encryption "
        "(w = n / weight_scale, and w * |update| must stay <= 100); about a typical "
        "site's example count.",
    )
    bind_cohort: bool = Field(
        True,
        description="Each site signs the list of sites sampled for the round and decrypts "
        "only the sum of exactly that list, so the coordinator cannot have different sites "
        "decrypt different subsets and subtract them; a round with a drop-out or a refused "
        "contribution is announced again to the sites that contributed (fresh nonce).",
    )
    answer_tolerance: float = Field(
        1e-6,
        gt=0,
        description="Largest difference allowed between the quorum's decrypted answers.",
    )

    @field_validator("keys_dir")
    @classmethod
    def _resolve(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return None
        base = (info.context or {}).get("base_dir")
        v = Path(v).expanduser()
        return (Path(base) / v).resolve() if base and not v.is_absolute() else v

    @model_validator(mode="after")
    def _keys(self) -> HESection:
        if self.enabled and self.keys_dir is None:
            raise ValueError(
                "encrypted aggregation needs `keys_dir`: the consortium directory made by "
                "`fedhealth consortium init` (see docs/key-ceremony.md)"
            )
        return self


def check_he_fits(he: HESection | None, min_sites: int, n_sites: int, strategy: str) -> None:
    """Cross-section checks of an experiment with encrypted aggregation on.

    Parameters
    ----------
    he
        The ``[privacy.he]`` table (``None`` or disabled: nothing to check).
    min_sites, n_sites
        ``experiment.min_sites`` and the number of listed sites.
    strategy
        ``strategy.name`` (built-in name or ``path:Class``; custom classes are checked
        when the strategy is built).

    Raises
    ------
    ValueError
        ``min_sites`` below 2 (one site's "aggregate" is its update), a quorum larger than
        ``min_sites``, or a strategy that needs individual updates.
    """
    if he is None or not he.enabled:
        return
    if min_sites < 2:
        raise ValueError(
            "privacy.he needs experiment.min_sites >= 2: sites refuse to decrypt an "
            "aggregate of a single update"
        )
    if he.quorum > min_sites or he.quorum > n_sites:
        raise ValueError(
            f"privacy.he.quorum is {he.quorum} but a round may have only min_sites = "
            f"{min_sites} contributing sites; lower the quorum or raise min_sites"
        )
    if strategy in STRATEGIES:
        problem = refusal(strategy, STRATEGIES.get(strategy).traits, {}, he=True, dp_mode=None)
        if problem:
            raise ValueError(problem)
