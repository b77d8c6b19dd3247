"""The one FHIR client: base URL, token, timeouts, retries, paging, and errors carrying the EHR's words.

Everything that talks to an EHR's FHIR API goes through :class:`FhirClient`: the delivery worker
(with our backend-services token) and the SMART dashboard (with the clinician's token). It owns the
rules that are easy to get subtly wrong when every caller writes its own loop:

* retries with exponential backoff and full jitter on connection failures and 408/429/5xx, honouring
  ``Retry-After`` (seconds or an HTTP date, clamped); a pause longer than the caller is willing to wait
  becomes an error carrying ``retry_after`` so a queue can reschedule instead of blocking a thread;
* a request that may have reached the server and may have been applied (read timeout, 500/502/504)
  is retried here only if it is safe to repeat (reads, PUT, or what the caller declares idempotent);
* one new token and one retry on 401;
* the token goes only to URLs under the configured base: ``Bundle.link[next]`` or a reference that
  points elsewhere is refused, never followed (SMART App Launch, "don't follow references to other
  servers with the token"); redirects are not followed;
* responses are size-capped and must be JSON, so a proxy's HTML page is an error, not a resource;
* failures raise :class:`FhirTemporaryError` (worth retrying later) or :class:`FhirRejectedError`
  (the server refused; repeating will not help), each with the server's ``OperationOutcome``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import orjson
import requests
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import NameResolutionError, NewConnectionError

from auth.backend import TokenError
from auth.http import parse_retry_after, read_capped

FHIR_JSON = "application/fhir+json"
USER_AGENT = "fhir-bridge/0.1"
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
# The server says it did not process the request: safe to send again whatever the method.
NOT_PROCESSED = frozenset({408, 429, 503})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024

Params = Sequence[tuple[str, str]] | Mapping[str, str]


class TokenProvider(Protocol):
    """Where the bearer token comes from: a backend-services token source or a clinician's session."""

    def token(self) -> str: ...

    def invalidate(self, token: str) -> None: ...


class FhirError(Exception):
    """A FHIR interaction failed. ``outcome`` is the server's OperationOutcome when it sent one.

    ``reached`` is False when the request certainly never reached the server (connection refused,
    no token), so nothing can have been applied there.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        outcome: dict[str, Any] | None = None,
        retry_after: float | None = None,
        reached: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.outcome = outcome
        self.retry_after = retry_after
        self.reached = reached


class FhirTemporaryError(FhirError):
    """Worth retrying later: the server was unreachable, busy, slow, or failed on its side."""


class FhirRejectedError(FhirError):
    """The server refused the request (4xx other than 408/429); sending it again will not help."""


class FhirBadResponse(FhirTemporaryError):
    """The answer was not FHIR JSON, or was larger than we accept (a proxy page, a runaway server)."""


class FhirUnsafeUrlError(FhirRejectedError):
    """A link or reference points outside the configured FHIR base; the token is not sent there."""


class FhirAuthError(FhirError):
    """No usable access token: the token endpoint failed, or the server refused a fresh token.

    ``retryable`` distinguishes an outage (wait) from a registration problem (a person must act).
    """

    def __init__(self, message: str, *, retryable: bool, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retryable = retryable


def outcome_text(outcome: Mapping[str, Any] | None, limit: int = 300) -> str:
    """The human part of an OperationOutcome: each issue's diagnostics or details text."""
    if not outcome:
        return ""
    parts = []
    issues = outcome.get("issue")
    for issue in issues if isinstance(issues, list) else []:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details")
        text = issue.get("diagnostics") or (details.get("text") if isinstance(details, dict) else None)
        code = issue.get("code")
        if text or code:
            parts.append(f"{code}: {text}" if code and text else str(text or code))
    joined = "; ".join(parts)
    return joined if len(joined) <= limit else joined[: limit - 1] + "…"


def parse_location(location: str) -> tuple[str, str, str | None] | None:
    """(type, id, version) from ``[base/]Type/id[/_history/vid]``; None if it does not look like one."""
    path = urlsplit(location).path if "://" in location else location.split("?", 1)[0]
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 4 and parts[-2] == "_history":
        return parts[-4], parts[-3], parts[-1]
    if len(parts) >= 2:
        return parts[-2], parts[-1], None
    return None


def parse_etag(etag: str | None) -> str | None:
    """The version id in an ETag such as ``W/"3"``."""
    if not etag:
        return None
    value = etag.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"')
    return value or None


class RequestLimiter:
    """At most ``max_concurrent`` requests in flight and ``per_second`` started per second (per EHR)."""

    def __init__(self, *, per_second: float | None = None, max_concurrent: int | None = None) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self._slots = threading.BoundedSemaphore(max_concurrent) if max_concurrent else None
        self._lock = threading.Lock()
        self._next = 0.0

    def __enter__(self) -> RequestLimiter:
        if self._slots is not None:
            self._slots.acquire()
        if self.interval:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next)
                self._next = start + self.interval
            if start > now:
                time.sleep(start - now)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._slots is not None:
            self._slots.release()


class StackedLimiter(RequestLimiter):
    """Two limits at once (a tenant's backfill limit inside its overall one): both must admit a request."""

    def __init__(self, inner: RequestLimiter, outer: RequestLimiter) -> None:
        super().__init__()
        self.inner = inner
        self.outer = outer

    def __enter__(self) -> StackedLimiter:
        self.inner.__enter__()
        try:
            self.outer.__enter__()
        except BaseException:
            self.inner.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.outer.__exit__(*exc)
        self.inner.__exit__(*exc)


@dataclass(frozen=True)
class FhirResponse:
    status: int
    headers: CaseInsensitiveDict[str]
    body: dict[str, Any] | None
    elapsed: float

    @property
    def location(self) -> tuple[str, str, str | None] | None:
        for name in ("Location", "Content-Location"):
            value = self.headers.get(name)
            if value:
                return parse_location(value)
        return None

    @property
    def version(self) -> str | None:
        located = self.location
        if located and located[2]:
            return located[2]
        from_etag = parse_etag(self.headers.get("ETag"))
        if from_etag:
            return from_etag
        meta = self.body.get("meta") if self.body else None
        version = meta.get("versionId") if isinstance(meta, dict) else None
        return version if isinstance(version, str) else None

    @property
    def resource_id(self) -> str | None:
        located = self.location
        if located:
            return located[1]
        rid = self.body.get("id") if self.body else None
        return rid if isinstance(rid, str) else None


@dataclass
class SearchResult:
    """Resources matched by a paged search; ``truncated`` when a page or resource cap stopped it."""

    resources: list[dict[str, Any]] = field(default_factory=list)
    pages: int = 0
    total: int | None = None
    truncated: bool = False


ResponseHook = Callable[[str, int | None, float], None]


class FhirClient:
    """One FHIR server (one base URL) with one way of authenticating. Thread-safe."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: TokenProvider | None = None,
        session: requests.Session | None = None,
        timeout: float = 30.0,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_cap: float = 20.0,
        max_inline_wait: float = 15.0,
        retry_after_cap: float = 3600.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        limiter: RequestLimiter | None = None,
        on_response: ResponseHook | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"FHIR base must be an absolute http(s) URL, got {base_url!r}")
        self._origin = (parts.scheme, parts.hostname, parts.port)
        self._base_path = parts.path.rstrip("/")
        self.auth = auth
        self.session = session or requests.Session()
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_inline_wait = max_inline_wait
        self.retry_after_cap = retry_after_cap
        self.max_response_bytes = max_response_bytes
        self.limiter = limiter
        self.on_response = on_response
        self.sleep = sleep

    # -- URLs ------------------------------------------------------------------------------------

    def is_own_url(self, url: str) -> bool:
        """True if ``url`` is on this server under the configured base (where the token may go)."""
        parts = urlsplit(url)
        if (parts.scheme, parts.hostname, parts.port) != self._origin:
            return False
        path = parts.path.rstrip("/")
        return path == self._base_path or path.startswith(self._base_path + "/")

    def url(self, path: str) -> str:
        """Absolute URL for a relative FHIR path (``Observation/1``); absolute URLs must be our own."""
        if "://" in path:
            if not self.is_own_url(path):
                raise FhirUnsafeUrlError(
                    f"{_origin_of(path)} is not this EHR's FHIR base {self.base_url}; not sent the token"
                )
            return path
        return f"{self.base_url}/{path.lstrip('/')}" if path else self.base_url

    # -- the one request loop -------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        body: Mapping[str, Any] | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
    ) -> FhirResponse:
        """Send one interaction, retrying what is safe to retry; raises a :class:`FhirError` subclass.

        ``idempotent`` says whether the request may be repeated after an ambiguous failure (the
        server may have applied it). It defaults to True for GET, HEAD, PUT and DELETE.
        """
        method = method.upper()
        url = self.url(path)
        repeatable = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        payload = body if isinstance(body, bytes | None) else orjson.dumps(body)
        base_headers = {"Accept": FHIR_JSON, "User-Agent": USER_AGENT}
        if payload is not None:
            base_headers["Content-Type"] = FHIR_JSON
        base_headers.update(headers or {})

        attempt = 0
        reauthenticated = False
        while True:
            attempt += 1
            send_headers = dict(base_headers)
            token = self._token() if self.auth is not None else None
            if token is not None:
                send_headers["Authorization"] = f"Bearer {token}"
            try:
                response = self._send(method, url, params, payload, send_headers)
            except FhirTemporaryError as exc:
                if attempt < self.max_attempts and (not exc.reached or repeatable):
                    self._pause(attempt, None)
                    continue
                raise

            if response.status == 401 and token is not None and not reauthenticated:
                # The token may have lapsed early or been revoked: one new token, one more try.
                assert self.auth is not None
                self.auth.invalidate(token)
                reauthenticated = True
                attempt -= 1
                continue
            if 200 <= response.status < 300:
                return response
            self._raise_or_wait(response, method, url, attempt, repeatable)

    def _token(self) -> str:

        assert self.auth is not None
        try:
            return self.auth.token()
        except TokenError as exc:
            raise FhirAuthError(
                str(exc), retryable=exc.retryable, retry_after=exc.retry_after, reached=False
            ) from None

    def _send(
        self,
        method: str,
        url: str,
        params: Params | None,
        payload: bytes | None,
        headers: dict[str, str],
    ) -> FhirResponse:
        started = time.perf_counter()
        status: int | None = None
        try:
            if self.limiter is not None:
                with self.limiter:
                    raw = self._http(method, url, params, payload, headers)
            else:
                raw = self._http(method, url, params, payload, headers)
            status = raw.status_code
            with raw:
                content = self._read(raw)
        except requests.RequestException as exc:
            reached = not _never_sent(exc)
            what = "could not connect" if not reached else "no complete answer"
            raise FhirTemporaryError(
                f"{method} {_origin_of(url)}: {what} ({type(exc).__name__})", reached=reached
            ) from None
        finally:
            if self.on_response is not None:
                self.on_response(method, status, time.perf_counter() - started)
        elapsed = time.perf_counter() - started
        return FhirResponse(
            status=raw.status_code,
            headers=raw.headers,
            body=self._parse(raw, content, method, url),
            elapsed=elapsed,
        )

    def _http(
        self,
        method: str,
        url: str,
        params: Params | None,
        payload: bytes | None,
        headers: dict[str, str],
    ) -> requests.Response:
        return self.session.request(
            method,
            url,
            params=params,
            data=payload,
            headers=headers,
            timeout=(min(10.0, self.timeout), self.timeout),
            allow_redirects=False,
            stream=True,
        )

    def _read(self, raw: requests.Response) -> bytes:
        try:
            return read_capped(raw, self.max_response_bytes)
        except ValueError as exc:
            raise FhirBadResponse(
                f"{raw.request.method} {_origin_of(raw.url)}: {exc}", status=raw.status_code
            ) from None

    def _parse(self, raw: requests.Response, content: bytes, method: str, url: str) -> dict[str, Any] | None:
        if not content.strip():
            return None
        ctype = raw.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        is_json = ctype.endswith(("/json", "+json")) or ctype == ""
        try:
            data = orjson.loads(content) if is_json else None
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            return data
        if raw.status_code >= 400:
            return None  # an error page: the status says enough, the page text is not for us to repeat
        raise FhirBadResponse(
            f"{method} {_origin_of(url)}: answer {raw.status_code} is not FHIR JSON "
            f"(Content-Type {ctype or 'missing'})",
            status=raw.status_code,
        )

    def _raise_or_wait(
        self, response: FhirResponse, method: str, url: str, attempt: int, repeatable: bool
    ) -> None:
        """Sleep and return if another try is due; otherwise raise the error this response means."""
        status = response.status
        outcome = response.body if _is_outcome(response.body) else None
        detail = outcome_text(outcome)
        message = f"{method} {_strip_query(url)}: {status}" + (f" {detail}" if detail else "")
        if 300 <= status < 400:
            target = response.headers.get("Location", "")
            raise FhirRejectedError(
                f"{method} {_strip_query(url)}: redirect ({status}) to {_origin_of(target)} not followed",
                status=status,
            )
        if status == 401:
            raise FhirAuthError(message, retryable=False, status=status, outcome=outcome)
        if status not in RETRYABLE:
            raise FhirRejectedError(message, status=status, outcome=outcome)

        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is not None:
            retry_after = min(max(retry_after, 1.0), self.retry_after_cap)
        safe = status in NOT_PROCESSED or repeatable
        if not safe or attempt >= self.max_attempts:
            raise FhirTemporaryError(message, status=status, outcome=outcome, retry_after=retry_after)
        if retry_after is not None and retry_after > self.max_inline_wait:
            # Too long to hold a thread: hand the wait to the caller's scheduler.
            raise FhirTemporaryError(message, status=status, outcome=outcome, retry_after=retry_after)
        self._pause(attempt, retry_after)

    def _pause(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is not None:
            self.sleep(retry_after)
            return
        # Full jitter (AWS architecture blog, "Exponential Backoff And Jitter").
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
        self.sleep(random.uniform(0, ceiling))  # noqa: S311

    # -- interactions ----------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        response = self.request("GET", f"{resource_type}/{resource_id}")
        return _require_resource(response, f"{resource_type}/{resource_id}")

    def read_reference(self, reference: str) -> dict[str, Any]:
        """Resolve a literal reference (``Type/id`` or an absolute URL on this server only)."""
        if "://" in reference and not self.is_own_url(reference):
            raise FhirUnsafeUrlError(
                f"reference to {_origin_of(reference)} is outside this EHR's FHIR base; not followed"
            )
        located = parse_location(reference)
        if located is None:
            raise FhirRejectedError(f"{reference[:100]!r} is not a literal FHIR reference")
        resource_type, resource_id, version = located
        path = f"{resource_type}/{resource_id}" + (f"/_history/{version}" if version else "")
        return _require_resource(self.request("GET", path), path)

    def create(
        self,
        resource: Mapping[str, Any],
        *,
        if_none_exist: str | None = None,
        prefer: str | None = "return=minimal",
    ) -> FhirResponse:
        """POST a resource; with ``if_none_exist`` a conditional create, safe to repeat *later*.

        Not immediately, though: after a lost answer the first request may still be running on the
        server, and not every server makes conditional create atomic against a twin in flight. So
        an ambiguous failure is raised for the caller's queue to retry after a pause.
        """
        headers = {}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        if prefer:
            headers["Prefer"] = prefer
        return self.request(
            "POST", str(resource["resourceType"]), body=resource, headers=headers, idempotent=False
        )

    def update(self, resource: Mapping[str, Any], *, prefer: str | None = "return=minimal") -> FhirResponse:
        """PUT a resource at its own id (update, or create with a client-chosen id)."""
        path = f"{resource['resourceType']}/{resource['id']}"
        return self.request("PUT", path, body=resource, headers={"Prefer": prefer} if prefer else None)

    def update_where(
        self, resource: Mapping[str, Any], path: str, *, prefer: str | None = "return=minimal"
    ) -> FhirResponse:
        """Conditional update (``PUT Type?search``): creates on no match, replaces on one match.

        The search goes as parameters, so a URL-valued identifier system is never taken for an
        absolute URL (where the token must not go)."""
        base, _, query = path.partition("?")
        return self.request(
            "PUT",
            base,
            params=parse_qsl(query, keep_blank_values=True),
            body=resource,
            headers={"Prefer": prefer} if prefer else None,
        )

    def bundle(
        self, bundle: Mapping[str, Any] | bytes, *, idempotent: bool, prefer: str | None = "return=minimal"
    ) -> dict[str, Any]:
        """POST a transaction or batch Bundle to the base; returns the response Bundle."""
        response = self.request(
            "POST",
            "",
            body=bundle,
            headers={"Prefer": prefer} if prefer else None,
            idempotent=idempotent,
        )
        body = response.body
        if not body or body.get("resourceType") != "Bundle":
            raise FhirBadResponse(
                f"POST {self.base_url}: answered {response.status} without a response Bundle",
                status=response.status,
            )
        return body

    def search(
        self,
        resource_type: str,
        params: Params | None = None,
        *,
        max_pages: int = 100,
        max_resources: int = 100_000,
        include_modes: frozenset[str] = frozenset({"match"}),
    ) -> SearchResult:
        """Run a search and follow ``next`` links on this server, within page and resource caps."""
        result = SearchResult()
        for page in self.pages(resource_type, params, max_pages=max_pages):
            result.pages += 1
            if result.total is None and isinstance(page.get("total"), int):
                result.total = page["total"]
            for entry in page.get("entry") or []:
                if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
                    continue
                mode = (entry.get("search") or {}).get("mode", "match")
                if mode not in include_modes:
                    continue
                if len(result.resources) >= max_resources:
                    result.truncated = True
                    return result
                result.resources.append(entry["resource"])
            if result.pages >= max_pages and _next_link(page):
                result.truncated = True
        return result

    def pages(
        self, resource_type: str, params: Params | None = None, *, max_pages: int = 100
    ) -> Iterator[dict[str, Any]]:
        """Searchset Bundles one by one. A ``next`` link off this server raises; a loop stops paging."""
        response = self.request("GET", resource_type, params=params)
        seen: set[str] = set()
        count = 0
        while True:
            page = response.body
            if not page or page.get("resourceType") != "Bundle":
                raise FhirBadResponse(
                    f"search {resource_type}: answer is not a Bundle", status=response.status
                )
            yield page
            count += 1
            link = _next_link(page)
            if link is None or count >= max_pages or link in seen:
                return
            seen.add(link)
            if not self.is_own_url(link):
                raise FhirUnsafeUrlError(
                    f"search {resource_type}: next page link points to {_origin_of(link)}, outside "
                    f"{self.base_url}; not followed"
                )
            response = self.request("GET", link)


def _never_sent(exc: requests.RequestException) -> bool:
    """True if the request certainly did not reach the server (so it cannot have been applied)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError):
        reason = exc.args[0] if exc.args else None
        inner = getattr(reason, "reason", reason)
        return isinstance(inner, NewConnectionError | NameResolutionError)
    return False


def _is_outcome(body: Mapping[str, Any] | None) -> bool:
    return bool(body) and body is not None and body.get("resourceType") == "OperationOutcome"


def _require_resource(response: FhirResponse, what: str) -> dict[str, Any]:
    if response.body is None or not isinstance(response.body.get("resourceType"), str):
        raise FhirBadResponse(f"GET {what}: answer has no resource", status=response.status)
    return response.body


def _next_link(page: Mapping[str, Any]) -> str | None:
    for link in page.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme else "(relative URL)"


def _strip_query(url: str) -> str:
    """URLs in messages lose their query: search parameters can carry patient identifiers."""
    return url.split("?", 1)[0]
