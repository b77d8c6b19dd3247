"""What the SMART app keeps per process: one HTTP session, discovery and JWKS caches, refresh locks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
from flask import Flask, current_app

from auth.smart_launch import DiscoveryCache
from smart_app.web import CookiePolicy

_KEY = "smart_app"
JWKS_TTL = 3600.0
JWKS_FORCED_RELOAD_GAP = 300.0


class JwksCache:
    """Keys of each tenant's id_token issuer; a forced reload (unknown ``kid``) is rate-limited (I7)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._forced: dict[tuple[str, str], float] = {}

    def get(
        self, tenant_id: str, url: str, *, force: bool, load: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        key = (tenant_id, url)
        now = self._clock()
        with self._lock:
            hit = self._entries.get(key)
            if force:
                last = self._forced.get(key)
                if last is not None and now - last < JWKS_FORCED_RELOAD_GAP and hit is not None:
                    return hit[1]
                self._forced[key] = now
            elif hit is not None and now - hit[0] < JWKS_TTL:
                return hit[1]
        document = load()
        with self._lock:
            self._entries[key] = (now, document)
        return document


@dataclass
class SmartState:
    cookies: CookiePolicy
    http: requests.Session = field(default_factory=requests.Session)
    discovery: DiscoveryCache = field(default_factory=DiscoveryCache)
    jwks: JwksCache = field(default_factory=JwksCache)
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)

    def launch_lock(self, launch_id: str) -> threading.Lock:
        """One lock per launch in this process; the database row lock covers other processes."""
        with self._locks_guard:
            lock = self._locks.get(launch_id)
            if lock is None:
                if len(self._locks) > 10_000:
                    self._locks.clear()
                lock = self._locks[launch_id] = threading.Lock()
            return lock


def install(app: Flask, smart_state: SmartState) -> None:
    app.extensions[_KEY] = smart_state


def state() -> SmartState:
    value = current_app.extensions[_KEY]
    assert isinstance(value, SmartState)
    return value
