"""HTTP to a host at the one address that was checked: no second DNS lookup between check and connect.

Checking that a vendor-supplied host resolves to a public address, then letting ``requests`` resolve it
again to connect, leaves a gap: a DNS server under the vendor's (or an attacker's) control can answer
the check with a public address and the connection with ``127.0.0.1`` or ``169.254.169.254`` (DNS
rebinding, security checklist V17). Here the connection goes to the checked address itself, while the
request still names the host: ``Host`` header, TLS SNI and certificate verification all use the host
name, so TLS is exactly as strict as without pinning.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from auth.jwks_fetch import system_resolver

Resolver = Callable[[str, int], Sequence[str]]


def default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def allowed_address(
    url: str,
    *,
    loopback_ok: bool,
    resolver: Resolver = system_resolver,
) -> str | None:
    """The address to connect to for ``url``'s host, or None if any address it resolves to is private,
    reserved, multicast or (unless ``loopback_ok``) loopback: one bad answer condemns the host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        addresses = list(resolver(host, parts.port or default_port(parts.scheme)))
    except OSError:
        return None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if ip.is_loopback and loopback_ok:
            continue
        if not ip.is_global or ip.is_multicast:
            return None
    return addresses[0] if addresses else None


class _NamedTlsAdapter(HTTPAdapter):
    """TLS to an address, with SNI and certificate checks against the host name the URL gave."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        super().__init__(max_retries=0)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs.update(server_hostname=self._hostname, assert_hostname=self._hostname)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


class PinnedConnection:
    """Requests to one URL's origin, sent to ``address`` and nowhere else (redirects are not followed).

    A fresh session per use: the pinning lives in the session's adapter, and webhooks and key fetches
    are rare enough that connection reuse does not matter.
    """

    def __init__(self, url: str, address: str, *, verify: bool | str = True) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"not an absolute http(s) URL: {url!r}")
        self.scheme = parts.scheme
        self.hostname = parts.hostname
        self.port = parts.port
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        self._netloc = f"{host}:{parts.port}" if parts.port else host
        # The Host header as the URL wrote it (no credentials: callers refuse those before).
        self._host_header = parts.netloc.rsplit("@", 1)[-1]
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy from the environment: we connect where we checked
        self._session.verify = verify
        if self.scheme == "https":
            self._session.mount("https://", _NamedTlsAdapter(self.hostname))

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        parts = urlsplit(url)
        if (parts.scheme, parts.hostname, parts.port) != (self.scheme, self.hostname, self.port):
            raise ValueError("a pinned connection only reaches the origin it was opened for")
        headers = {**(kwargs.pop("headers", None) or {}), "Host": self._host_header}
        target = urlunsplit((parts.scheme, self._netloc, parts.path, parts.query, ""))
        return self._session.request(method, target, headers=headers, allow_redirects=False, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", url, **kwargs)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> PinnedConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["PinnedConnection", "Resolver", "allowed_address"]
