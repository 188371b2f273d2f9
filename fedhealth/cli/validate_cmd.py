"""``fedhealth validate``: check experiment configs and site profiles alone."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from fedhealth.config.experiment import load_experiment_with_sites
from fedhealth.config.loader import read_toml
from fedhealth.config.site import load_site
from fedhealth.errors import ConfigError


def validate_file(path: Path) -> str:
    """Validate one file, detecting whether it is an experiment or a site profile.

    Returns
    -------
    str
        A one-line description of what was checked.
    """
    doc = read_toml(path)
    if "experiment" in doc:
        cfg, sites = load_experiment_with_sites(path)
        from fedhealth.coordinator.strategies import build_strategy

        build_strategy(cfg)
        sources = _check_ehr_sources([(cfg.task.dataset, s) for s in sites])
        return sources + (
            f"experiment {cfg.name!r}: {len(sites)} sites, {cfg.experiment.rounds} rounds, "
            f"model {cfg.model.name}, strategy {cfg.strategy.name.rsplit('/', 1)[-1]}"
        )
    if "site" in doc:
        site = load_site(path)
        sources = _check_ehr_sources([(name, site) for name in site.datasets])
        return sources + f"site {site.name!r}: datasets {', '.join(sorted(site.datasets))}"
    raise ConfigError(
        f"{path}: neither an experiment config (no [experiment] table) nor a site profile "
        "(no [site] table)"
    )


def validate_files(console: Console, files: list[Path]) -> None:
    """Validate each file; stop at the first invalid one (raising its ConfigError)."""
    for f in files:
        console.print(f"[green]ok[/] {f}: {validate_file(f)}", soft_wrap=True, highlight=False)


def _check_ehr_sources(datasets: list) -> str:
    """Pre-flight of FHIR folders and OMOP databases (reachable, concepts found)."""
    from fedhealth.config.ehr_sources import FhirSource, OmopSource
    from fedhealth.data.ehr import check_ehr

    lines = []
    for name, site in datasets:
        source = site.datasets.get(name)
        if isinstance(source, FhirSource | OmopSource):
            lines.append(f"{site.name}/{name}: {check_ehr(source)}\n   ")
    return "".join(lines)
