"""The coordinator's SuperLink with its operator APIs reachable only from its own machine.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr ls``,
``flwr supernode register``) and the Runtime API (the ServerApp process) on one HTTPS port,
and the Control API asks for no credential: its only account authentication is OIDC, and
only in Flower's enterprise edition (``FLWR_OIDC_ENABLED`` exits "unavailable in this Flower
distribution"). Whoever reaches the port could therefore list runs, register their own
SuperNode key and submit their own app.

``python -m fedhealth.deploy.superlink_gate [flower-superlink arguments]`` runs Flower's own
``flower-superlink`` (same arguments, same FastAPI app) with one ASGI layer in front of it
(:class:`OperatorGate`): a connection from another machine may use only the Fleet API
(``/v1/fleet/``, where SuperNode authentication applies) and ``/health``; every other path
— the Control and Runtime APIs — answers 403 unless the TCP peer is a loopback address. The
consortium's operators are whoever can run commands on the coordinator's machine.

The peer address is uvicorn's view of the TCP connection: no header can change it, because
uvicorn trusts ``X-Forwarded-For`` only from 127.0.0.1 (which is trusted anyway). Do not put
a reverse proxy on the coordinator's machine in front of the SuperLink: every request would
then come from loopback.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

PUBLIC_PREFIXES = ("/v1/fleet/", "/health/")  # and "/health" itself

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a TCP peer address) is this machine's loopback interface."""
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


def allowed(path: str, peer: str | None) -> bool:
    """Whether a request for ``path`` from TCP peer ``peer`` may reach the SuperLink."""
    return is_loopback(peer) or path == "/health" or path.startswith(PUBLIC_PREFIXES)


class OperatorGate:
    """ASGI middleware: the Control and Runtime APIs answer only loopback peers.

    Parameters
    ----------
    app : ASGI application
        Flower's SuperLink app (``flwr.superlink.main.create_app``).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        """Serve the request, or refuse it with 403 and a JSON reason."""
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan events
            return
        peer = (scope.get("client") or (None,))[0]
        path = scope.get("path", "")
        if allowed(path, peer):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(
            {
                "error": "forbidden",
                "message": f"{path} is served only to the coordinator's own machine "
                "(fedhealth: the Control and Runtime APIs are operator-only; run `flwr` "
                "or `fedhealth run` on the coordinator)",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    """Run ``flower-superlink`` (arguments from ``sys.argv``) behind :class:`OperatorGate`."""
    import flwr.superlink.main as superlink_main
    from flwr.superlink.cli.flower_superlink import flower_superlink

    create_app = superlink_main.create_app

    def gated_app(*args: Any, **kwargs: Any) -> Any:
        from fedhealth.deploy.heap import settle

        app = OperatorGate(create_app(*args, **kwargs))
        settle()  # started: later collections skip what Flower's start-up left
        return app

    # flower_superlink() imports create_app from this module when it starts serving.
    superlink_main.create_app = gated_app
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
