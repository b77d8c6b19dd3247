"""The sandbox EHR as a real server process (`fhir-bridge sandbox serve`) on a free loopback port.

Integration and browser tests drive it over HTTP exactly as an app or a person would; the admin
API (with the token the server wrote into its data folder) registers apps and switches faults.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from tests.support.procs import free_port, port_open, stop, wait_until


class SandboxServer:
    def __init__(self, *, clients: list[dict[str, Any]] | None = None) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fhir-bridge-sandbox-"))
        self.data = self.root / "data"
        self.clients = clients or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "sandbox.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fhir_base(self) -> str:
        return f"{self.url}/fhir"

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    @property
    def admin_token(self) -> str:
        return (self.data / "admin_token").read_text().strip()

    def start(self) -> None:
        args = [sys.executable, "-m", "fhir_bridge", "sandbox", "serve", "--port", str(self.port)]
        args += ["--data", str(self.data)]
        if self.clients:
            clients_file = self.root / "clients.json"
            clients_file.write_text(json.dumps(self.clients))
            args += ["--clients", str(clients_file)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_BRIDGE_")}
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")])
        )
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                args, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_until(lambda: port_open(self.port), timeout=60, what="sandbox EHR", proc=self.proc)
        wait_until(self._ready, timeout=60, what="sandbox EHR", proc=self.proc)

    def _ready(self) -> bool:
        try:
            return requests.get(f"{self.fhir_base}/metadata", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def admin(self, method: str, path: str, body: Any = None) -> requests.Response:
        return requests.request(
            method,
            f"{self.url}/api/admin{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=10,
        )

    def register(self, client_id: str, **fields: Any) -> None:
        response = self.admin("PUT", f"/clients/{client_id}", fields)
        assert response.status_code in (200, 201), response.text

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class JwksHost:
    """A tiny HTTP server publishing a JWKS on loopback, as a backend-services client hosts its keys."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.requests = 0
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requests += 1
                body = json.dumps(host.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "max-age=60")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/jwks.json"

    def __enter__(self) -> JwksHost:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
