"""Pre-flight of an experiment's encrypted aggregation in simulation: are all keys in place?

In simulation every site runs on this machine, so the CLI checks, before any training, that
the coordinator's key-less context loads, that every site's ``[keys]`` load and belong to
the same consortium. A real site checks its own keys at its first encrypted round.
"""

from __future__ import annotations

from fedhealth.config.experiment import ExperimentConfig
from fedhealth.config.site import SiteProfile
from fedhealth.errors import ConfigError

__all__ = ["he_outlook"]


def he_outlook(cfg: ExperimentConfig, sites: list[SiteProfile]) -> str:
    """One line describing the experiment's encryption, after checking every key.

    Raises
    ------
    ConfigError, CryptoError
        Missing or wrong key files, naming the file and what to run.
    """
    he = cfg.privacy.he
    if not he.enabled:
        return "encryption off: sites send plaintext updates"
    from fedhealth.coordinator.encrypted_aggregation import describe_params
    from fedhealth.privacy.he.ceremony import load_coordinator_keys
    from fedhealth.site.encrypted_reply import site_keys

    coordinator = load_coordinator_keys(he.keys_dir)
    registry = coordinator.registry
    for site in sites:
        keys = site_keys(site)
        if keys.registry.consortium_id != registry.consortium_id:
            raise ConfigError(
                f"site {site.name!r} holds keys of consortium {keys.registry.consortium_id}, "
                f"but the experiment's privacy.he.keys_dir {he.keys_dir} is consortium "
                f"{registry.consortium_id}; point both at the same key ceremony"
            )
    return (
        f"encrypted aggregation on ({describe_params(registry.params, he.quorum, he.weight_scale)}"
        f"; consortium {registry.consortium_id}{', cohort-bound' if he.bind_cohort else ''})"
    )
