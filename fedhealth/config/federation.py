"""Checks of a study's federation shape, shared by experiment and analysis configs.

Both name a study (:data:`StudyName`), list site profiles relative to the config file
(:data:`SiteProfiles`) and set a quorum (:func:`check_min_sites`); sharing these keeps the
two schemas' rules and messages the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo

from fedhealth.config.site import SITE_NAME


def check_study_name(name: str) -> str:
    """Return ``name`` if it is a valid study name (same alphabet as a site name).

    Raises
    ------
    ValueError
        If ``name`` has other characters or more than 63.
    """
    if not SITE_NAME.match(name):
        raise ValueError("use lower-case letters, digits, '-' or '_' (max 63)")
    return name


def resolve_site_profiles(paths: list[Path], info: ValidationInfo) -> list[Path]:
    """Resolve the listed site profiles against the config's folder, each listed once.

    Parameters
    ----------
    paths
        The ``sites`` list as written.
    info
        Pydantic's validation info; its context's ``base_dir`` (set by
        :func:`fedhealth.config.loader.load_model`) anchors relative paths.

    Returns
    -------
    list of Path
        The paths, relative ones made absolute.

    Raises
    ------
    ValueError
        Naming the first profile listed twice.
    """
    base = (info.context or {}).get("base_dir")
    out = [(Path(base) / p).resolve() if base and not p.is_absolute() else p for p in paths]
    seen: set[Path] = set()
    for p in out:
        if p in seen:
            raise ValueError(f"site profile {p} is listed twice; list each site once")
        seen.add(p)
    return out


def check_min_sites(min_sites: int, sites: list[Path]) -> None:
    """Refuse a quorum larger than the listed sites.

    Raises
    ------
    ValueError
        If ``min_sites`` exceeds ``len(sites)``.
    """
    if min_sites > len(sites):
        raise ValueError(
            f"min_sites is {min_sites} but only {len(sites)} sites are listed; "
            "lower min_sites or add sites"
        )


#: A study's name: validated like a site name.
StudyName = Annotated[str, AfterValidator(check_study_name)]
#: The ``sites`` list: resolved against the config's folder, each profile once.
SiteProfiles = Annotated[list[Path], AfterValidator(resolve_site_profiles)]
