"""The client's address and scheme as the hospital's reverse proxy saw them, from trusted proxies only.

Behind a TLS-terminating proxy every request arrives from the proxy's address, so anything keyed on
the client address (the token endpoint's rate limit) would put every vendor in one bucket: one noisy
or hostile client would lock the others out. ``X-Forwarded-For`` and ``X-Forwarded-Proto`` say who
the client was, but anyone can send them: they are believed only when the connection comes from an
address in ``TRUSTED_PROXIES``, and then only the last ``X-Forwarded-For`` entry (the one our proxy
added; earlier ones are whatever the client claimed).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``TRUSTED_PROXIES`` entries as networks; ValueError names an entry that is neither IP nor CIDR."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None


class TrustedProxies:
    """WSGI middleware: ``REMOTE_ADDR`` and ``wsgi.url_scheme`` from forwarded headers of trusted peers."""

    def __init__(self, app: Any, networks: tuple[Network, ...]) -> None:
        self.app = app
        self.networks = networks

    def trusted(self, address: str) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self.networks)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if self.trusted(environ.get("REMOTE_ADDR") or ""):
            forwarded_for = environ.get("HTTP_X_FORWARDED_FOR", "")
            client = _ip(forwarded_for.rsplit(",", 1)[-1]) if forwarded_for else None
            if client is not None:
                environ["REMOTE_ADDR"] = str(client)
            proto = environ.get("HTTP_X_FORWARDED_PROTO", "").strip().lower()
            if proto in {"http", "https"}:
                environ["wsgi.url_scheme"] = proto
        return self.app(environ, start_response)


__all__ = ["TrustedProxies", "parse_networks"]
