"""Keys of the simulated quickstart consortium, so the quickstart runs with encryption on.

A real consortium runs the ceremony with ``fedhealth consortium init`` and copies each file
to its machine (``docs/key-ceremony.md``). The quickstart's three hospitals all live on one
machine, so ``fedhealth demo-data`` simply runs the ceremony once into
``workspace/consortium``, where the quickstart site profiles' ``[keys]`` tables and the
experiments' ``privacy.he.keys_dir`` point.
"""

from __future__ import annotations

from pathlib import Path

from fedhealth.errors import ConfigError
from fedhealth.privacy.he.ceremony import Registry, init_consortium

__all__ = ["ensure_consortium"]


def ensure_consortium(root: str | Path, sites: list[str], key_holder: str) -> tuple[Registry, bool]:
    """Run the key ceremony into ``root`` unless it already holds these sites' consortium.

    Parameters
    ----------
    root
        Consortium directory (e.g. ``workspace/consortium``).
    sites
        The site names.
    key_holder
        The site that generates the CKKS secret.

    Returns
    -------
    (registry, created)
        The consortium's registry and whether it was created now. An existing consortium
        is never re-keyed: its sites' ledgers and any model trained under it stay valid.

    Raises
    ------
    ConfigError
        ``root`` holds a consortium that lacks some of ``sites`` (add them with
        ``fedhealth consortium add-site``) or another layout.
    """
    root = Path(root)
    registry_file = root / "coordinator" / "sites.json"
    if registry_file.is_file():
        registry = Registry.load(registry_file)
        missing = sorted(set(sites) - set(registry.sites))
        if missing:
            raise ConfigError(
                f"{root} holds consortium {registry.consortium_id} without site(s) {missing}; "
                "add them with `fedhealth consortium add-site NAME --dir "
                f"{root}` or remove {root} to start a new consortium"
            )
        return registry, False
    return init_consortium(root, sites, key_holder), True
