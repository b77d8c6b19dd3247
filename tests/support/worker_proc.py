"""`fhir-bridge worker` as a real process, for tests that kill it or run two at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class WorkerProcess:
    def __init__(self, settings: dict[str, Any], *, cwd: Path, log: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_BRIDGE_")}
        self.env.update({f"FHIR_BRIDGE_{k.upper()}": str(v) for k, v in settings.items()})
        self.cwd = cwd
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fhir_bridge", "worker"],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = 30) -> WorkerProcess:
        """Until the worker logs that its loop runs (its signal handlers are in place by then)."""
        deadline = time.monotonic() + timeout
        while b"delivery worker started" not in self.log.read_bytes():
            if not self.alive():
                raise RuntimeError(f"worker exited early; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready after {timeout} s; see {self.log}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as when the machine loses power."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait: the worker finishes its batch and exits 0."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_stopped(self) -> None:
        if self.alive():
            self.kill()
