"""``fedhealth validate``: every check ``fedhealth run`` makes, without training anything.

An experiment config gets the whole pre-flight of ``run`` (:mod:`fedhealth.cli.preflight`):
its config and its sites' profiles, every site's data, DP plan and policy, the HE keys and
enough sites in every round. A site profile gets its schema and its data paths. Every
problem of every file is reported at once.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fedhealth.cli.preflight import PreflightError, check_experiment
from fedhealth.config.experiment import load_experiment_with_sites
from fedhealth.config.loader import read_toml
from fedhealth.config.site import SiteProfile, load_site
from fedhealth.errors import ConfigError, DataError, FedHealthError


def check_file(path: Path) -> tuple[str | None, list[FedHealthError]]:
    """Check one file, detecting whether it is an experiment or a site profile.

    Returns
    -------
    description : str or None
        A one-line description of what was checked (None when the file cannot be read).
    problems : list of FedHealthError
        Every problem found, each naming what and where.
    """
    try:
        doc = read_toml(path)
        if "experiment" in doc:
            cfg, sites = load_experiment_with_sites(path)
            checked = check_experiment(cfg, sites)
            sources, found = _check_ehr_sources([(cfg.task.dataset, s) for s in sites])
            return sources + (
                f"experiment {cfg.name!r}: {len(sites)} sites, {cfg.experiment.rounds} rounds, "
                f"model {cfg.model.name}, strategy {cfg.strategy.name.rsplit('/', 1)[-1]}"
            ), checked.problems + found
        if "site" in doc:
            site = load_site(path)
            sources, found = _check_ehr_sources([(name, site) for name in site.datasets])
            described = f"site {site.name!r}: datasets {', '.join(sorted(site.datasets))}"
            return sources + described, _paths(site, path) + found
        raise ConfigError(
            f"{path}: neither an experiment config (no [experiment] table) nor a site profile "
            "(no [site] table)"
        )
    except FedHealthError as exc:  # the file itself is invalid: nothing more to check
        return None, [exc]


def _paths(site: SiteProfile, path: Path) -> list[FedHealthError]:
    """A missing data file or folder of a site profile, one problem each."""
    out: list[FedHealthError] = []
    for name, source in sorted(site.datasets.items()):
        if source.path is not None and not Path(source.path).exists():
            out.append(
                DataError(
                    f"{path}: key `datasets.{name}.path`: {source.path} not found; fix the "
                    f"path in the [datasets.{name}] table (relative paths are relative to "
                    "the profile)"
                )
            )
    return out


def validate_files(console: Console, files: list[Path]) -> None:
    """Check every file; print ``ok`` for each sound one, then raise every problem at once.

    Raises
    ------
    PreflightError
        One or more problems in any of the files (exit code of the first).
    """
    problems: list[FedHealthError] = []
    for f in files:
        what, found = check_file(f)
        if found:
            n = len(found)
            console.print(
                f"[red]not ok[/] {escape(str(f))}: {n} problem{'s' if n > 1 else ''}",
                soft_wrap=True,
                highlight=False,
            )
            problems += found
        else:
            console.print(
                f"[green]ok[/] {escape(str(f))}: {escape(str(what))}",
                soft_wrap=True,
                highlight=False,
            )
    if problems:
        raise PreflightError(problems)


def _check_ehr_sources(datasets: list) -> tuple[str, list[FedHealthError]]:
    """Pre-flight of FHIR folders and OMOP databases (reachable, concepts found).

    Returns
    -------
    summary : str
        One line per source checked.
    problems : list of FedHealthError
        A source that cannot be read, one problem each.
    """
    from fedhealth.config.ehr_sources import FhirSource, OmopSource
    from fedhealth.data.ehr import check_ehr

    lines: list[str] = []
    problems: list[FedHealthError] = []
    for name, site in datasets:
        source = site.datasets.get(name)
        if isinstance(source, FhirSource | OmopSource):
            try:
                lines.append(f"{site.name}/{name}: {check_ehr(source)}\n   ")
            except FedHealthError as exc:
                problems.append(exc)
    return "".join(lines), problems
