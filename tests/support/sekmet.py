"""The third-party FHIR server our integration tests write into: sekmet-fhir (PyPI), run as a subprocess.

It is a real FHIR R4 server with SMART Backend Services auth, written outside this project. Its
known quirks (docs/ehr-vendors.md) are things the product must cope with, not things to build on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import requests

from tests.support.procs import free_port, port_open, stop, wait_until


def sekmet_executable() -> str | None:
    candidate = Path(sys.executable).parent / "sekmet"
    return str(candidate) if candidate.exists() else shutil.which("sekmet")


class SekmetServer:
    """One sekmet process; ``smart_clients`` turns SMART auth on (client_id, scopes, jwks or jwks_url)."""

    def __init__(
        self,
        *,
        smart_clients: list[dict[str, Any]] | None = None,
        token_lifetime: int = 300,
        processes: int = 1,
    ) -> None:
        exe = sekmet_executable()
        if exe is None:
            raise FileNotFoundError("sekmet")
        self.exe = exe
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fhir-bridge-sekmet-"))
        self.smart_clients = smart_clients
        self.token_lifetime = token_lifetime
        # More than one: uvicorn --workers N on the same data folder (benchmarks only; see start()).
        self.processes = processes
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "sekmet.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/auth/token"

    def _settings(self) -> dict[str, Any]:
        server_auth: dict[str, Any]
        if self.smart_clients is None:
            server_auth = {"types": ["none"]}
        else:
            server_auth = {
                "types": ["smart"],
                "enforce_scopes": True,
                "token_lifetime": self.token_lifetime,
                "smart_clients": self.smart_clients,
            }
        return {
            "base_url": self.base_url,
            "host": "127.0.0.1",
            "port": self.port,
            "data_dir": str(self.root / "data"),
            "simulator": {"enabled": False},
            "validation": {"inbound": "strict"},
            "server_auth": server_auth,
            "log_inbound": False,
            "own_private_key_path": str(self.root / "keys" / "sekmet_private.pem"),
        }

    def start(self) -> None:
        config = self.root / "settings.yaml"
        # JSON is valid YAML; no YAML writer needed.
        config.write_text(json.dumps(self._settings()))
        # The child keeps its own copy of the log file descriptor; ours is closed at once.
        port = str(self.port)
        command = [self.exe, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", port]
        env = None
        if self.processes > 1:
            # `sekmet serve` has no worker option; it runs uvicorn on this factory, so uvicorn's own
            # --workers gives N processes on one SQLite file. sekmet serialises writes through
            # BEGIN IMMEDIATE (a file lock, so across processes too), and keeps a per-process
            # history sequence counter (history order across processes is not kept): fit for
            # throughput benchmarks, not for tests of its behaviour. Auth must stay off (each
            # process could mint its own token secret on a fresh data folder).
            if self.smart_clients is not None:
                raise ValueError("several sekmet processes only without SMART auth")
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                "sekmet.main:app_factory",
                "--factory",
                "--workers",
                str(self.processes),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ]
            env = {**os.environ, "SEKMET_CONFIG": str(config)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        wait_until(lambda: port_open(self.port), timeout=60, what="sekmet FHIR server", proc=self.proc)
        wait_until(self._metadata_ok, timeout=60, what="sekmet FHIR server", proc=self.proc)

    def _metadata_ok(self) -> bool:
        try:
            return requests.get(f"{self.base_url}/metadata", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        """Start again on the same port and data folder (the EHR coming back after an outage)."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
