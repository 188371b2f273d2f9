"""The ``flwr`` CLI's SuperLink connections (``$FLWR_HOME/config.toml``, default
``~/.flwr``): ``fedhealth coordinator start`` writes one named after the federation so
that ``fedhealth run --federation NAME`` and ``flwr run APP NAME`` both reach it.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from fedhealth.errors import ConfigError, FederationError


def write_connection(name: str, address: str, root_cert: Path | None) -> Path:
    """Add or replace the SuperLink connection ``name`` in the flwr config; returns its path."""
    from flwr.cli.flower_config import init_flwr_config, write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection
    from flwr.supercore.utils import get_flwr_home

    init_flwr_config()
    conn = SuperLinkConnection(
        name=name,
        address=address,
        root_certificates=str(Path(root_cert).resolve()) if root_cert else None,
        insecure=None if root_cert else True,
    )
    write_superlink_connection(conn)
    return get_flwr_home() / "config.toml"


def read_connection(name: str):
    """The SuperLink connection ``name`` from the flwr config (a ``SuperLinkConnection``)."""
    from flwr.cli.flower_config import read_flower_config, read_superlink_connection

    try:
        return read_superlink_connection(name)
    except BaseException as exc:  # flwr exits via click/typer on a missing connection
        _, path = read_flower_config()
        raise ConfigError(
            f"no SuperLink connection named {name!r} in {path}; the coordinator writes it "
            "when it starts (`fedhealth coordinator start --federation NAME`), or add it "
            "there with `address` and `root-certificates`"
        ) from exc


def register_node(public_key: Path, federation: str, name: str) -> str:
    """Register a SuperNode's public key with the SuperLink (as ``flwr supernode register``).

    Returns
    -------
    str
        ``"registered"`` or ``"already registered"``.
    """
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import RegisterNodeRequest

    key = try_load_public_key(Path(public_key))
    conn = read_connection(federation)
    with contextlib.redirect_stdout(io.StringIO()):
        client = init_http_client_from_connection(conn)
    try:
        res = client.RegisterNode(RegisterNodeRequest(public_key=key, name=name))
    except Exception as exc:
        body = getattr(getattr(exc, "response", None), "text", "") or ""
        if "already" in f"{exc} {body}".lower() or "412" in str(exc):
            return "already registered"  # 412: the key is in use (registered before)
        raise FederationError(
            f"registering SuperNode key {public_key} of site {name!r} with {federation!r} "
            f"failed: {exc}"
        ) from exc
    finally:
        client.close()
    if not res.node_id:
        raise FederationError(f"the SuperLink did not register the SuperNode key of {name!r}")
    return "registered"
