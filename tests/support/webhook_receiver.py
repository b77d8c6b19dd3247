"""A vendor's webhook endpoint on loopback, for tests: answers given statuses in turn, keeps what it got."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.procs import free_port


class Receiver:
    """A vendor's webhook endpoint on loopback: answers ``statuses`` in turn (then 200), keeps requests."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify_webhook(app: Any, client_id: str, token: bytes) -> dict[str, Any]:
    """What a vendor does: fetch our JWKS, pick the key by kid, check the signature, iss and aud."""
    from joserfc import jwt
    from joserfc.jwk import KeySet

    from fhir_bridge import services

    published = app.test_client().get("/.well-known/jwks.json").json
    decoded = jwt.decode(token.decode(), KeySet.import_key_set(published), algorithms=["RS384", "ES384"])
    public_url = services.from_app(app).settings.public_url
    assert decoded.claims["iss"] == public_url and decoded.claims["aud"] == client_id
    assert any(k["kid"] == decoded.header["kid"] for k in published["keys"])
    return dict(decoded.claims)
