"""A small HTTP proxy that injects faults in front of a real server (the EHR misbehaving on purpose).

Requests pass through to the upstream server unless a fault applies: answer with a status (429 with
``Retry-After``, 503, ...) without forwarding, or forward and then drop the connection before the
answer arrives (the ambiguous failure: the EHR did the work, the client never heard). Faults come
from a queue (one per request, in order) or from a rule active until a deadline.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tests.support.procs import free_port

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
}


@dataclass(frozen=True)
class Respond:
    """Answer with this status (and headers, body) without forwarding."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class ForwardThenDrop:
    """Forward the request, wait for the upstream answer, then close the client connection unanswered."""


@dataclass(frozen=True)
class Pass:
    """Forward as usual (to let some requests through in a queue of faults)."""


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds``, then forward (a slow EHR)."""

    seconds: float


Fault = Respond | ForwardThenDrop | Pass | Delay


class FaultProxy:
    def __init__(self, upstream: str, *, record: bool = True) -> None:
        parts = urlsplit(upstream)
        self.record = record  # keep every request (tests); off for long runs (bench/soak.py)
        assert parts.hostname and parts.port
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.port = free_port()
        self._lock = threading.Lock()
        self._queue: deque[Fault] = deque()
        self._rule: tuple[float, Fault] | None = None
        self.forwarded = 0
        self.injected = 0
        self.statuses: Counter[int] = Counter()  # statuses the upstream answered with
        # Every request seen: (arrival, method, path, body), and how many were in flight at most.
        self.requests: list[tuple[float, str, str, bytes]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    if proxy.record:
                        proxy.requests.append((time.monotonic(), self.command, self.path, body))
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    self._answer(body)
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

            def _answer(self, body: bytes) -> None:
                fault = proxy._next_fault()
                if isinstance(fault, Respond):
                    proxy._count("injected")
                    self.send_response(fault.status)
                    for name, value in fault.headers:
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(fault.body)))
                    self.end_headers()
                    self.wfile.write(fault.body)
                    return
                if isinstance(fault, Delay):
                    time.sleep(fault.seconds)
                status, headers, payload = proxy._forward(self.command, self.path, self.headers, body)
                proxy._count("forwarded")
                if isinstance(fault, ForwardThenDrop):
                    proxy._count("injected")
                    self.close_connection = True
                    return
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def queue(self, *faults: Fault) -> None:
        """Apply these faults to the next requests, one each, in order."""
        with self._lock:
            self._queue.extend(faults)

    def during(self, seconds: float, fault: Fault) -> None:
        """Apply ``fault`` to every request for the next ``seconds``."""
        with self._lock:
            self._rule = (time.monotonic() + seconds, fault)

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._rule = None

    def _next_fault(self) -> Fault | None:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            if self._rule is not None:
                until, fault = self._rule
                if time.monotonic() < until:
                    return fault
                self._rule = None
        return None

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def _forward(
        self, method: str, path: str, headers: Message, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            send = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            send["Host"] = f"{self.upstream_host}:{self.upstream_port}"
            conn.request(method, path, body=body or None, headers=send)
            response = conn.getresponse()
            payload = response.read()
            with self._lock:
                self.statuses[response.status] += 1
            return response.status, response.getheaders(), payload
        finally:
            conn.close()
