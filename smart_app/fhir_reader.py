"""The production :class:`~smart_app.ehr.EhrReader`: the project's FHIR client with the launch's token.

:class:`fhir_bridge.fhir_client.FhirClient` owns the HTTP (timeouts, retries, paging on the same
server only, size caps, one new token and one retry on 401); this adapter gives it the clinician's
token as its auth provider and turns its errors into what the dashboard reports per panel.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from fhir_bridge import services
from fhir_bridge.fhir_client import FhirAuthError, FhirClient, FhirError
from smart_app import session as launch_session
from smart_app.ehr import EhrReader, EhrReadError
from smart_app.session import LaunchContext
from smart_app.state import state

# A dashboard is read interactively: fail over to "reload in a minute" rather than wait long.
READ_TIMEOUT = 20.0
MAX_ATTEMPTS = 2
MAX_PAGES = 50


class LaunchToken:
    """The launch's access token as the FHIR client's auth provider; refreshed under the launch's lock."""

    def __init__(self, ctx: LaunchContext) -> None:
        self.ctx = ctx
        self._force = False
        self._token: str | None = None
        self._lock = threading.Lock()

    def token(self) -> str:
        # One reader serves one dashboard request (a few seconds): the token is looked up once, and
        # again only after the EHR refused it.
        with self._lock:
            if self._token is None or self._force:
                self._token = launch_session.access_token(self.ctx, force_refresh=self._force)
                self._force = False
            return self._token

    def invalidate(self, token: str) -> None:
        with self._lock:
            if token == self._token:
                self._force = True


class ClientReader:
    def __init__(self, client: FhirClient) -> None:
        self.client = client

    def search(self, resource_type: str, params: Mapping[str, str]) -> Iterator[Mapping[str, Any]]:
        try:
            yield from self.client.pages(resource_type, dict(params), max_pages=MAX_PAGES)
        except FhirAuthError as exc:
            raise EhrReadError("the EHR refused the token", status=exc.status, unauthorized=True) from None
        except FhirError as exc:
            raise EhrReadError("search failed", status=exc.status, unauthorized=exc.status == 401) from None

    def read(self, resource_type: str, resource_id: str) -> Mapping[str, Any]:
        try:
            return self.client.read(resource_type, resource_id)
        except FhirAuthError as exc:
            raise EhrReadError("the EHR refused the token", status=exc.status, unauthorized=True) from None
        except FhirError as exc:
            raise EhrReadError("read failed", status=exc.status, unauthorized=exc.status == 401) from None


def client_reader(ctx: LaunchContext) -> EhrReader:
    settings = services.current().settings
    client = FhirClient(
        ctx.fhir_base,
        auth=LaunchToken(ctx),
        session=state().http,
        timeout=min(READ_TIMEOUT, settings.http_timeout_seconds),
        max_attempts=MAX_ATTEMPTS,
        max_inline_wait=2.0,
    )
    return ClientReader(client)
