"""Load generators for the request-rate rows: wrk when installed, else Python threads.

Why wrk: the server and the client share the machine's 2 cores, so the client's own CPU is taken
from the server. A Python generator (a thread per connection, ``requests`` or ``http.client``)
spends about as much CPU per request as a bare Flask endpoint does, so it caps the rate it claims
to measure; wrk (C, event loop, one thread) spends a small fraction of that. Every run reports the
client's CPU next to the server's, so a reader can see which side the cores went to.

wrk is bounded by time (``duration``); the Python fallback by request count. Both report the rate,
the p99 latency, non-2xx answers (which fail the run), and CPU seconds of client and server.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

WRK = shutil.which("wrk")

# A unique record per request (else every push after the first would be a cheap duplicate):
# "<prefix>-<thread>-<counter>", a daily-steps record, dates spread over a year.
PUSH_LUA = """
local thread_no = 0
local threads = {}
function setup(thread)
  thread:set("tid", thread_no)
  thread_no = thread_no + 1
  table.insert(threads, thread)
end
local counter = 0
local users = 0
function init(args)
  prefix = args[1] .. "-" .. tostring(tid)
  users = tonumber(args[2] or "0")
end
function request()
  counter = counter + 1
  local user = "bench-user"
  if users > 0 then user = "bench-user-" .. tostring((counter + tid) % users) end
  local body = '{"records":[{"record_id":"' .. prefix .. '-' .. counter ..
    '","app_user_id":"' .. user .. '","measure":"steps-daily","data":{"date":"2025-' ..
    string.format("%02d-%02d", 1 + counter % 12, 1 + counter % 28) ..
    '","steps":' .. (1000 + counter % 9000) .. '}}]}'
  return wrk.format("POST", nil, nil, body)
end
"""

# Printed by every wrk run: what the suite reads back (latencies in microseconds).
DONE_LUA = """
function done(summary, latency, requests)
  io.write(string.format(
    'WRK-JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"status_errors": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout))
end
"""


@dataclass(frozen=True)
class LoadRun:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    client_cpu: float
    server_cpu: float
    tool: str

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def server_ms_per_request(self) -> float:
        return self.server_cpu / self.requests * 1000

    @property
    def client_ms_per_request(self) -> float:
        return self.client_cpu / self.requests * 1000


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk(
    url: str,
    *,
    server_cpu: Callable[[], float],
    duration: float,
    connections: int,
    threads: int = 1,
    headers: dict[str, str] | None = None,
    push_prefix: str | None = None,
    users: int = 0,
) -> LoadRun:
    """``wrk`` for ``duration`` seconds: GET ``url``, or with ``push_prefix`` a unique push per request
    (app user ``bench-user``, or with ``users`` round robin over ``bench-user-0`` .. ``users - 1``)."""
    assert WRK is not None, "wrk is not installed (apt-get install -y wrk)"
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as folder:
        script = Path(folder) / "run.lua"
        script.write_text((PUSH_LUA if push_prefix else "") + DONE_LUA)
        command = [
            WRK,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
        ]
        for name, value in (headers or {}).items():
            command += ["-H", f"{name}: {value}"]
        command.append(url)
        if push_prefix:
            command += ["--", push_prefix, str(users)]
        cpu0, server0 = _children_cpu(), server_cpu()
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=duration + 120)
        cpu1, server1 = _children_cpu(), server_cpu()
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK-JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-500:] or done.stdout[-500:]}")
    result = json.loads(line.removeprefix("WRK-JSON "))
    failed = sum(result[k] for k in ("status_errors", "connect_errors", "read_errors", "write_errors"))
    if failed or result["timeouts"]:
        raise RuntimeError(f"wrk: {failed} failed requests, {result['timeouts']} timeouts: {result}")
    return LoadRun(
        requests=int(result["requests"]),
        seconds=result["duration_us"] / 1e6,
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        client_cpu=cpu1 - cpu0,
        server_cpu=server1 - server0,
        tool=f"wrk -t{threads} -c{connections}",
    )


def python_threads(
    url: str,
    bodies: list[bytes],
    *,
    server_cpu: Callable[[], float],
    connections: int,
    headers: dict[str, str] | None = None,
) -> LoadRun:
    """Post (or with empty bodies GET) every body, one keep-alive ``http.client`` connection per thread."""
    parts = urlsplit(url)
    path = parts.path or "/"
    method = "POST" if bodies[0] else "GET"
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors: list[str] = []

    def run(n: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=60)
        mine = latencies[n]
        for body in bodies[n::connections]:
            t0 = time.perf_counter()
            conn.request(method, path, body=body or None, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            mine.append((time.perf_counter() - t0) * 1000)
            if response.status != 200:
                errors.append(f"{response.status} {data[:200]!r}")
                return
        conn.close()

    pool = [threading.Thread(target=run, args=(n,)) for n in range(connections)]
    cpu0, server0, started = time.process_time(), server_cpu(), time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    cpu1, server1 = time.process_time(), server_cpu()
    if errors:
        raise RuntimeError(f"load: {errors[0]}")
    flat = sorted(x for part in latencies for x in part)
    return LoadRun(
        requests=len(flat),
        seconds=elapsed,
        p50_ms=flat[len(flat) // 2],
        p99_ms=flat[min(len(flat) - 1, int(len(flat) * 0.99))],
        client_cpu=cpu1 - cpu0,
        server_cpu=server1 - server0,
        tool=f"Python http.client, {connections} threads",
    )


def cpu_count() -> int:
    return os.cpu_count() or 1
