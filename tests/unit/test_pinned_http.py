"""Pinned connections reach the checked address, and TLS there is as strict as without pinning.

The host names used here (``*.vendor.test``) resolve nowhere: a request that arrives proves the
connection went to the address we gave, not to a second DNS lookup.
"""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from auth.pinned_http import PinnedConnection, allowed_address

HOST = "hooks.vendor.test"


@dataclass
class TlsServer:
    port: int
    ca_file: str
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (Host header, SNI)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificates(folder: Path, dns_name: str) -> tuple[Path, Path, Path]:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_file, cert_file, key_file


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsServer]:
    ca_file, cert_file, key_file = _certificates(tmp_path, HOST)
    sni: dict[int, str | None] = {}
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.sni_callback = lambda sock, name, ctx: sni.__setitem__(id(sock), name)
    server_box: list[TlsServer] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            server_box[0].seen.append((self.headers["Host"], sni.get(id(self.connection))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    server_box.append(TlsServer(port=httpd.server_address[1], ca_file=str(ca_file)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield server_box[0]
    httpd.shutdown()
    httpd.server_close()


def test_the_request_goes_to_the_pinned_address_under_the_host_name(tls_server: TlsServer) -> None:
    url = f"https://{HOST}:{tls_server.port}/hooks"
    with PinnedConnection(url, "127.0.0.1", verify=tls_server.ca_file) as connection:
        response = connection.post(url, data=b"{}", timeout=10)
    assert response.status_code == 204
    assert tls_server.seen == [(f"{HOST}:{tls_server.port}", HOST)]


def test_the_certificate_must_still_match_the_host_name(tls_server: TlsServer) -> None:
    url = f"https://other.vendor.test:{tls_server.port}/hooks"
    with (
        PinnedConnection(url, "127.0.0.1", verify=tls_server.ca_file) as connection,
        pytest.raises(requests.exceptions.SSLError),
    ):
        connection.post(url, data=b"{}", timeout=10)
    assert tls_server.seen == []


def test_a_pinned_connection_does_not_reach_another_origin() -> None:
    with (
        PinnedConnection(f"https://{HOST}/a", "127.0.0.1") as connection,
        pytest.raises(ValueError, match="origin"),
    ):
        connection.get("https://elsewhere.vendor.test/a")


@pytest.mark.parametrize(
    ("answers", "loopback_ok", "expected"),
    [
        (["93.184.215.14"], False, "93.184.215.14"),
        (["93.184.215.14", "10.0.0.7"], False, None),  # one private answer condemns the host
        (["169.254.169.254"], False, None),
        (["127.0.0.1"], False, None),
        (["127.0.0.1"], True, "127.0.0.1"),
        (["::ffff:10.0.0.1"], False, None),
        (["224.0.0.1"], False, None),
        ([], False, None),
    ],
)
def test_the_address_is_public_or_none(answers: list[str], loopback_ok: bool, expected: str | None) -> None:
    assert (
        allowed_address(f"https://{HOST}/x", loopback_ok=loopback_ok, resolver=lambda h, p: answers)
        == expected
    )


def test_a_host_that_does_not_resolve_has_no_address() -> None:
    def fails(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    assert allowed_address(f"https://{HOST}/x", loopback_ok=False, resolver=fails) is None
