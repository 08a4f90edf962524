"""Who made a change, as the server knows it: recorded in route history and adapter events.

Never what the client says about itself (the `X-Loraplex-Caller` header or
metadata of earlier versions is ignored): the address the call came from, as
the transport reports it. Authentication adds the key id and tenant in front
of it (`caller_of` is the one place to do so), so every change records the
identity the server verified.
"""

from __future__ import annotations

from urllib.parse import unquote

from starlette.requests import HTTPConnection


def caller_of(request) -> str:
    """The verified identity behind an HTTP request (a Starlette connection) or a gRPC call (its servicer context)."""
    from . import auth

    if isinstance(request, HTTPConnection):
        client = request.client
        return auth.caller(client.host if client is not None and client.host else "unknown")
    return auth.caller(_peer_host(request.peer() or ""))  # a grpc.aio servicer context (grpc's own class is private)


def _peer_host(peer: str) -> str:
    """`ipv4:127.0.0.1:5555` / `ipv6:[::1]:5555` / `unix:/path` -> the address without the port, as HTTP gives it."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0] if rest.startswith("[") else rest
        return host.strip("[]")
    return peer or "unknown"
