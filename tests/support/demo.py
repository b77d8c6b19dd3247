"""`fhir-bridge demo` as a user runs it: a subprocess whose stdout carries the one URL to open.

Also the process bookkeeping that shows "Ctrl-C stops everything": every descendant of the demo
process, read from /proc, so a test can check none outlives it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

DEMO_READY_TIMEOUT = 180.0  # generous for a loaded 2-core machine; the demo itself aims at under a minute


class DemoProcess:
    def __init__(self, *args: str, cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_BRIDGE_")}
        self.stderr_path = cwd / "demo-stderr.log"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fhir_bridge", "demo", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def stdout_lines(self, timeout: float = DEMO_READY_TIMEOUT) -> list[str]:
        """Every stdout line until the first one (the URL), waiting for it."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no URL after {timeout:.0f} s; stderr:\n{self.stderr()}") from None
        if line is None:
            raise AssertionError(
                f"the demo exited ({self.proc.wait()}) before printing a URL:\n{self.stderr()}"
            )
        return [line]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def descendants(self) -> set[int]:
        return descendants(self.proc.pid)

    def stop(self, signum: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._close()

    def _close(self) -> None:
        self._stderr.close()
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill_all(self) -> None:
        """Last resort for a failed test: this process and what it started, by their own pids."""
        for pid in [*self.descendants(), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close()


def descendants(root: int) -> set[int]:
    """Pids of every living process below ``root`` (children, grandchildren, ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the fields after it are fixed.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":  # a zombie is already gone, only not yet reaped
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] != "Z":
            living.add(pid)
    return living
