"""A minimal server-side SMART app, to drive the sandbox EHR from a real browser in tests.

It is the client side of the test, not the thing under test: it allows one ``iss``, discovers the
EHR's endpoints, sends PKCE S256 with a fresh ``state``, exchanges the code on the server, and
shows the patient it was given. fhir-bridge's own SMART app (smart_app/) is what the product ships.
"""

from __future__ import annotations

import html
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import requests

from tests.support.procs import free_port
from tests.support.smart import pkce_pair


class TinySmartApp:
    def __init__(self, *, client_id: str, iss: str) -> None:
        self.client_id = client_id
        self.iss = iss
        self.pending: dict[str, dict[str, str]] = {}
        self.tokens: list[dict[str, Any]] = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/launch":
                    self._redirect(app.authorize_url(query, standalone=False))
                elif url.path == "/standalone":
                    self._redirect(app.authorize_url({"iss": app.iss}, standalone=True))
                elif url.path == "/callback":
                    self._page(*app.callback(query))
                else:
                    self._page(404, "not found")

            def _redirect(self, location: str | None) -> None:
                if location is None:
                    self._page(400, "unknown issuer")
                    return
                self.send_response(302)
                self.send_header("Location", location)
                self.end_headers()

            def _page(self, status: int, text: str) -> None:
                body = f"<!doctype html><title>tiny app</title><h1>{html.escape(text)}</h1>".encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def authorize_url(self, query: dict[str, str], *, standalone: bool) -> str | None:
        if query.get("iss") != self.iss:
            return None  # never discover an unknown issuer
        config = requests.get(f"{self.iss}/.well-known/smart-configuration", timeout=10).json()
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(24)
        self.pending[state] = {"verifier": verifier, "token_endpoint": config["token_endpoint"]}
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": f"{self.url}/callback",
            "scope": "launch/patient patient/*.rs openid fhirUser" if standalone else "launch patient/*.rs",
            "state": state,
            "aud": self.iss,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if not standalone:
            params["launch"] = query.get("launch", "")
        return f"{config['authorization_endpoint']}?{urlencode(params)}"

    def callback(self, query: dict[str, str]) -> tuple[int, str]:
        flow = self.pending.pop(query.get("state", ""), None)
        if flow is None:
            return 400, "unknown state"
        if "error" in query:
            return 400, f"refused: {query['error']}"
        response = requests.post(
            flow["token_endpoint"],
            data={
                "grant_type": "authorization_code",
                "code": query.get("code", ""),
                "redirect_uri": f"{self.url}/callback",
                "client_id": self.client_id,
                "code_verifier": flow["verifier"],
            },
            timeout=10,
        )
        if response.status_code != 200:
            return 400, f"token request failed: {response.json().get('error')}"
        token = response.json()
        self.tokens.append(token)
        return 200, f"Patient: {token.get('patient')}"

    def __enter__(self) -> TinySmartApp:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
