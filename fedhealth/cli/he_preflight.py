"""Pre-flight of an experiment's encrypted aggregation in simulation: are all keys in place?

In simulation every site runs on this machine, so the CLI checks, before any training, that
the coordinator's key-less context loads, that every site's ``[keys]`` load and belong to
the same consortium. A real site checks its own keys at its first encrypted round.
"""

from __future__ import annotations

from fedhealth.config.experiment import ExperimentConfig
from fedhealth.config.site import SiteProfile
from fedhealth.errors import ConfigError, FedHealthError

__all__ = ["he_check", "he_outlook"]


def he_check(
    cfg: ExperimentConfig, sites: list[SiteProfile]
) -> tuple[str | None, dict[str | None, FedHealthError]]:
    """Check every key of the experiment's encryption; collect every problem.

    Returns
    -------
    line : str or None
        One line describing the encryption (None when the coordinator's keys fail).
    problems : dict
        Site name (``None`` for the coordinator's keys) -> its error (missing ``[keys]``,
        missing or wrong key files, keys of another consortium), each naming the file and
        what to run.
    """
    he = cfg.privacy.he
    if not he.enabled:
        return "encryption off: sites send plaintext updates", {}
    from fedhealth.coordinator.encrypted_aggregation import describe_params
    from fedhealth.privacy.he.ceremony import load_coordinator_keys
    from fedhealth.site.encrypted_reply import site_keys

    problems: dict[str | None, FedHealthError] = {}
    try:
        registry = load_coordinator_keys(he.keys_dir).registry
    except FedHealthError as exc:
        registry = None
        problems[None] = exc
    for site in sites:
        try:
            keys = site_keys(site)
        except FedHealthError as exc:
            problems[site.name] = exc
            continue
        if registry is not None and keys.registry.consortium_id != registry.consortium_id:
            problems[site.name] = ConfigError(
                f"site {site.name!r} holds keys of consortium {keys.registry.consortium_id}, "
                f"but the experiment's privacy.he.keys_dir {he.keys_dir} is consortium "
                f"{registry.consortium_id}; point both at the same key ceremony"
            )
    if registry is None:
        return None, problems
    line = (
        f"encrypted aggregation on ({describe_params(registry.params, he.quorum, he.weight_scale)}"
        f"; consortium {registry.consortium_id}{', cohort-bound' if he.bind_cohort else ''})"
    )
    return line, problems


def he_outlook(cfg: ExperimentConfig, sites: list[SiteProfile]) -> str:
    """One line describing the experiment's encryption, after checking every key.

    Raises
    ------
    ConfigError, CryptoError
        The first missing or wrong key file, naming the file and what to run.
    """
    line, problems = he_check(cfg, sites)
    if problems:
        raise next(iter(problems.values()))
    assert line is not None
    return line
