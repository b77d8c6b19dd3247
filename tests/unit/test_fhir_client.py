"""The FHIR client: retries, Retry-After, re-authentication, error classes, paging and where the token goes.

The EHR is faked at the transport with ``responses``; sleeping is recorded instead of done.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import requests
import responses
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import MaxRetryError, NewConnectionError

from auth.http import parse_retry_after
from fhir_bridge.fhir_client import (
    FhirAuthError,
    FhirBadResponse,
    FhirClient,
    FhirRejectedError,
    FhirTemporaryError,
    FhirUnsafeUrlError,
    parse_location,
)

BASE = "https://ehr.example/fhir/r4"
OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "required", "diagnostics": "Observation.status: minimum 1"}],
}


class Tokens:
    """A token provider that hands out t1, t2, ... and records invalidations."""

    def __init__(self) -> None:
        self.issued = 0
        self.invalidated: list[str] = []
        self.current: str | None = None

    def token(self) -> str:
        if self.current is None:
            self.issued += 1
            self.current = f"t{self.issued}"
        return self.current

    def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        if token == self.current:
            self.current = None


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(sleeps: list[float]) -> FhirClient:
    return FhirClient(BASE, auth=Tokens(), sleep=sleeps.append, max_attempts=4, max_inline_wait=30)


def refused() -> requests.ConnectionError:
    """What requests raises when nothing listens on the port (the request was never sent)."""
    # Constructing a pool or a connection opens nothing.
    pool, conn = HTTPConnectionPool("ehr.example", 443), HTTPConnection("ehr.example", 443)
    return requests.ConnectionError(MaxRetryError(pool, BASE, NewConnectionError(conn, "refused")))


def auth_of(call: Any) -> str:
    return str(call.request.headers.get("Authorization"))


@responses.activate
def test_reads_send_the_bearer_token_and_fhir_json(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    assert client.read("Patient", "1")["id"] == "1"
    request = responses.calls[0].request
    assert request.headers["Authorization"] == "Bearer t1"
    assert request.headers["Accept"] == "application/fhir+json"


@responses.activate
def test_5xx_is_retried_with_jittered_backoff(client: FhirClient, sleeps: list[float]) -> None:
    responses.get(f"{BASE}/Patient/1", status=502)
    responses.get(f"{BASE}/Patient/1", status=500)
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    client.read("Patient", "1")
    assert len(responses.calls) == 3
    assert len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0, "full jitter under 0.5 s * 2^n"


@responses.activate
def test_retries_are_capped_and_the_error_carries_the_outcome(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/1", status=503, json=OUTCOME)
    with pytest.raises(FhirTemporaryError) as caught:
        client.read("Patient", "1")
    assert len(responses.calls) == 4
    assert caught.value.status == 503
    assert caught.value.outcome == OUTCOME
    assert "minimum 1" in caught.value.message


@pytest.mark.parametrize(
    ("header", "expected"),
    [("5", 5.0), ("0", 0.0), ("-1", None), ("abc", None), ("", None), (None, None), ("99999999", 99999999.0)],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_retry_after_dates() -> None:
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now) == 90
    assert parse_retry_after(format_datetime(now - timedelta(hours=1), usegmt=True), now=now) == 0
    assert parse_retry_after("Wed, 99 Foo 2025 25:00:00 GMT", now=now) is None


@pytest.mark.parametrize(
    ("header", "slept"),
    [("5", 5.0), ("0", 1.0), ("past", 1.0)],  # honoured, at least one second
)
@responses.activate
def test_429_waits_as_told(client: FhirClient, sleeps: list[float], header: str, slept: float) -> None:
    if header == "past":
        header = format_datetime(datetime.now(UTC) - timedelta(minutes=5), usegmt=True)
    responses.get(f"{BASE}/Patient/1", status=429, headers={"Retry-After": header})
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    client.read("Patient", "1")
    assert sleeps == [slept]


@responses.activate
def test_garbage_retry_after_falls_back_to_backoff(client: FhirClient, sleeps: list[float]) -> None:
    responses.get(f"{BASE}/Patient/1", status=429, headers={"Retry-After": "soon"})
    responses.get(f"{BASE}/Patient/1", status=429, headers={"Retry-After": "-1"})
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    client.read("Patient", "1")
    assert len(sleeps) == 2 and all(0 <= s <= 1.0 for s in sleeps)


@responses.activate
def test_a_long_retry_after_is_handed_to_the_caller_not_slept(sleeps: list[float]) -> None:
    client = FhirClient(BASE, sleep=sleeps.append, max_inline_wait=15, retry_after_cap=600)
    responses.post(BASE, status=429, headers={"Retry-After": "99999999"})
    with pytest.raises(FhirTemporaryError) as caught:
        client.bundle({"resourceType": "Bundle", "type": "transaction"}, idempotent=True)
    assert caught.value.retry_after == 600, "clamped to the cap"
    assert sleeps == []
    assert len(responses.calls) == 1


@responses.activate
def test_401_gets_one_new_token_and_one_retry(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/1", status=401)
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    client.read("Patient", "1")
    assert [auth_of(c) for c in responses.calls] == ["Bearer t1", "Bearer t2"]
    assert isinstance(client.auth, Tokens) and client.auth.invalidated == ["t1"]


@responses.activate
def test_a_second_401_is_an_auth_error_not_a_loop(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/1", status=401)
    with pytest.raises(FhirAuthError):
        client.read("Patient", "1")
    assert len(responses.calls) == 2


@pytest.mark.parametrize("status", [400, 403, 404, 409, 412, 422])
@responses.activate
def test_other_4xx_is_rejected_at_once_with_the_outcome(client: FhirClient, status: int) -> None:
    responses.post(f"{BASE}/Observation", status=status, json=OUTCOME)
    with pytest.raises(FhirRejectedError) as caught:
        client.create({"resourceType": "Observation"}, if_none_exist="identifier=s|v")
    assert len(responses.calls) == 1
    assert caught.value.status == status
    assert caught.value.outcome == OUTCOME


@responses.activate
def test_conditional_create_sends_if_none_exist_and_reads_the_location(client: FhirClient) -> None:
    responses.post(
        f"{BASE}/Observation",
        status=201,
        headers={"Location": f"{BASE}/Observation/abc/_history/3", "ETag": 'W/"3"'},
    )
    response = client.create({"resourceType": "Observation"}, if_none_exist="identifier=https://x|1")
    assert responses.calls[0].request.headers["If-None-Exist"] == "identifier=https://x|1"
    assert (response.resource_id, response.version) == ("abc", "3")


@responses.activate
def test_ambiguous_failures_of_plain_posts_are_not_repeated(client: FhirClient) -> None:
    responses.post(f"{BASE}/Observation", status=500)
    with pytest.raises(FhirTemporaryError) as caught:
        client.create({"resourceType": "Observation"})  # not conditional: repeating could duplicate
    assert len(responses.calls) == 1
    assert caught.value.reached


@responses.activate
def test_503_and_connection_refused_are_retried_even_for_posts(client: FhirClient) -> None:
    responses.post(f"{BASE}/Observation", status=503)
    responses.post(f"{BASE}/Observation", body=refused())
    responses.post(
        f"{BASE}/Observation", status=201, headers={"Location": f"{BASE}/Observation/1/_history/1"}
    )
    assert client.create({"resourceType": "Observation"}).resource_id == "1"
    assert len(responses.calls) == 3


@responses.activate
def test_a_refused_connection_is_marked_as_never_reaching_the_server(sleeps: list[float]) -> None:
    client = FhirClient(BASE, sleep=sleeps.append, max_attempts=2)
    responses.get(f"{BASE}/metadata", body=refused())
    with pytest.raises(FhirTemporaryError) as caught:
        client.request("GET", "metadata")
    assert caught.value.reached is False
    responses.get(f"{BASE}/Patient", body=requests.ReadTimeout("slow"))
    with pytest.raises(FhirTemporaryError) as timed_out:
        client.request("GET", "Patient")
    assert timed_out.value.reached is True


@responses.activate
def test_redirects_are_not_followed(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/1", status=302, headers={"Location": "https://evil.example/steal"})
    with pytest.raises(FhirRejectedError, match="not followed"):
        client.read("Patient", "1")
    assert len(responses.calls) == 1


@responses.activate
def test_html_instead_of_fhir_is_an_error(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/1", body="<html>Sign in</html>", content_type="text/html")
    with pytest.raises(FhirBadResponse, match="not FHIR JSON"):
        client.read("Patient", "1")


@responses.activate
def test_oversized_answers_are_cut_off(sleeps: list[float]) -> None:
    client = FhirClient(BASE, sleep=sleeps.append, max_response_bytes=1000, max_attempts=1)
    responses.get(f"{BASE}/Observation", body=b"{" + b" " * 5000 + b"}", content_type="application/fhir+json")
    with pytest.raises(FhirBadResponse, match="larger than"):
        client.request("GET", "Observation")


def page(n: int, next_url: str | None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 3,
        "entry": [
            {"resource": {"resourceType": "Observation", "id": str(n)}, "search": {"mode": "match"}},
            {"resource": {"resourceType": "Patient", "id": "p"}, "search": {"mode": "include"}},
        ],
    }
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


@responses.activate
def test_search_follows_next_links_on_the_same_server(client: FhirClient) -> None:
    responses.get(f"{BASE}/Observation", json=page(1, f"{BASE}/_page/2?cursor=a"))
    responses.get(f"{BASE}/_page/2", json=page(2, f"{BASE}/_page/3?cursor=b"))
    responses.get(f"{BASE}/_page/3", json=page(3, None))
    result = client.search("Observation", {"subject": "Patient/p"})
    assert [r["id"] for r in result.resources] == ["1", "2", "3"]
    assert (result.pages, result.total, result.truncated) == (3, 3, False)


@pytest.mark.parametrize(
    "elsewhere",
    [
        "https://evil.example/fhir/r4/Observation?page=2",
        "http://ehr.example/fhir/r4/Observation?page=2",  # same host, another scheme
        "https://ehr.example:8443/fhir/r4/Observation?page=2",
        "https://ehr.example/other-fhir/Observation?page=2",  # same host, outside the base
    ],
)
@responses.activate
def test_next_links_off_the_fhir_base_are_refused_without_sending_the_token(
    client: FhirClient, elsewhere: str
) -> None:
    responses.get(f"{BASE}/Observation", json=page(1, elsewhere))
    with pytest.raises(FhirUnsafeUrlError, match="not followed"):
        client.search("Observation")
    assert [str(c.request.url).split("?")[0] for c in responses.calls] == [f"{BASE}/Observation"]


@responses.activate
def test_paging_loops_and_page_caps_stop(client: FhirClient) -> None:
    responses.get(f"{BASE}/Observation", json=page(1, f"{BASE}/_page/2"))
    responses.get(f"{BASE}/_page/2", json=page(2, f"{BASE}/_page/2"))
    looped = client.search("Observation")
    assert [r["id"] for r in looped.resources] == ["1", "2"]
    capped = client.search("Observation", max_pages=1)
    assert capped.truncated and [r["id"] for r in capped.resources] == ["1"]
    few = client.search("Observation", max_resources=1)
    assert few.truncated and len(few.resources) == 1


@responses.activate
def test_references_to_other_servers_are_not_dereferenced(client: FhirClient) -> None:
    with pytest.raises(FhirUnsafeUrlError):
        client.read_reference("https://evil.example/fhir/Patient/1")
    responses.get(f"{BASE}/Patient/1/_history/2", json={"resourceType": "Patient", "id": "1"})
    assert client.read_reference(f"{BASE}/Patient/1/_history/2")["id"] == "1"
    assert len(responses.calls) == 1


def test_error_messages_leave_out_query_strings(client: FhirClient) -> None:
    with responses.RequestsMock() as mock:
        mock.get(re.compile(f"{re.escape(BASE)}/Observation.*"), status=400, json=OUTCOME)
        with pytest.raises(FhirRejectedError) as caught:
            client.request("GET", "Observation", params={"patient": "Patient/secret-mrn"})
    assert "secret-mrn" not in caught.value.message


@pytest.mark.parametrize(
    ("location", "parsed"),
    [
        ("https://x/fhir/Observation/1/_history/2", ("Observation", "1", "2")),
        ("Observation/1", ("Observation", "1", None)),
        ("Observation/1/_history/7", ("Observation", "1", "7")),
        ("nothing", None),
    ],
)
def test_locations(location: str, parsed: tuple[str, str, str | None] | None) -> None:
    assert parse_location(location) == parsed
