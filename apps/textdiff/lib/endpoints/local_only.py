"""Answer only clients on this machine and on trusted networks, unless a login is on (MONAI_LABEL_AUTH_ENABLE).

MONAI Label chooses the address it listens on before the app loads, and without `--host` that is every interface:
the bare `monailabel start_server --app apps/textdiff ...` would hand every image, report and the model to anyone who
can reach the port. The app cannot change the address, but it decides whom it answers. A reverse proxy on the same
machine (TLS, its own login) reaches it over loopback and is answered.
"""

from __future__ import annotations

import ipaddress
import json

from ..configs.params import trusted_networks

LOCAL_NAMES = {"localhost", "testclient"}  # testclient: the in-process client of fastapi's TestClient
REFUSAL = ("this server answers only clients on its own machine: start it with a login (MONAI_LABEL_AUTH_ENABLE) or "
           "name the networks it may answer, e.g. --conf trusted_networks 10.0.0.0/8,192.168.0.0/16")


def _address(host: str | None):
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address  # ::ffff:10.0.0.2 is 10.0.0.2


def is_local(host: str | None) -> bool:
    """Loopback (IPv4, IPv6 or IPv4-mapped IPv6), a Unix socket (no address), or the in-process test client."""
    if host is None or host in LOCAL_NAMES:
        return True
    address = _address(host)
    return bool(address and address.is_loopback)


class LocalOnly:
    """ASGI middleware: a request from another machine outside `trusted` gets a 403 saying how to open the server;
    with `login`, every client is answered (the login decides)."""

    def __init__(self, app, trusted: list, login: bool):
        self.app, self.trusted, self.login = app, trusted, login

    def allows(self, host: str | None) -> bool:
        if self.login or is_local(host):
            return True
        address = _address(host)
        return bool(address) and any(address.version == net.version and address in net for net in self.trusted)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allows((scope.get("client") or (None,))[0]):
            return await self.app(scope, receive, send)
        body = json.dumps({"detail": REFUSAL}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
