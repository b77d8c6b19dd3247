"""The service's signing keys: generated on first start, published as a JWKS, rotated without downtime.

One JSON file per key in a folder (mode 0700, files 0600), holding the private JWK and its
lifecycle. A rotation adds a key that is *published* at once but only *signs* after a lead time,
because EHRs cache our JWKS; the key it replaces keeps being published for a grace period after
that, so nothing signed with it stops verifying while it may still be in use. Every process
reloads the folder when it changes, so rotating from the CLI never breaks a running worker.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from joserfc.jwk import ECKey, RSAKey

SUPPORTED_ALGS = ("RS384", "ES384")
RSA_BITS = 3072

SigningKey = RSAKey | ECKey


def _utcnow() -> datetime:
    return datetime.now(UTC)


def generate_key(alg: str) -> SigningKey:
    """A fresh private key for ``alg`` whose `kid` is its RFC 7638 thumbprint."""
    key: SigningKey
    if alg == "RS384":
        key = RSAKey.generate_key(RSA_BITS, parameters={"alg": alg, "use": "sig"}, private=True)
    elif alg == "ES384":
        key = ECKey.generate_key("P-384", parameters={"alg": alg, "use": "sig"}, private=True)
    else:
        raise ValueError(f"unsupported signing algorithm {alg!r}; use one of {', '.join(SUPPORTED_ALGS)}")
    return _with_kid(key, alg)


def _with_kid(key: SigningKey, alg: str) -> SigningKey:
    kid = key.thumbprint()
    data = key.as_dict(private=True)
    data.update({"kid": kid, "alg": alg, "use": "sig"})
    return import_private_jwk(data)


def import_private_jwk(data: dict[str, Any]) -> SigningKey:
    if data.get("kty") == "RSA":
        return RSAKey.import_key(data)
    if data.get("kty") == "EC":
        return ECKey.import_key(data)
    raise ValueError(f"unsupported key type {data.get('kty')!r}")


@dataclass(frozen=True)
class KeyEntry:
    """A key and when it signs: published from creation, signing from ``activates_at``."""

    key: SigningKey
    alg: str
    created_at: datetime
    activates_at: datetime
    retires_at: datetime | None = None

    @property
    def kid(self) -> str:
        return str(self.key.kid)

    def is_published(self, now: datetime) -> bool:
        return self.retires_at is None or now < self.retires_at

    def can_sign(self, now: datetime) -> bool:
        return self.activates_at <= now and self.is_published(now)

    def public_jwk(self) -> dict[str, Any]:
        data = self.key.as_dict(private=False)
        data.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return data

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "alg": self.alg,
            "created_at": self.created_at.isoformat(),
            "activates_at": self.activates_at.isoformat(),
            "retires_at": self.retires_at.isoformat() if self.retires_at else None,
            "jwk": self.key.as_dict(private=True) | {"kid": self.kid, "alg": self.alg, "use": "sig"},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyEntry:
        retires = data.get("retires_at")
        return cls(
            key=import_private_jwk(data["jwk"]),
            alg=data["alg"],
            created_at=datetime.fromisoformat(data["created_at"]),
            activates_at=datetime.fromisoformat(data["activates_at"]),
            retires_at=datetime.fromisoformat(retires) if retires else None,
        )


class Keyring:
    """The keys in one folder. Thread-safe; cheap to ask repeatedly (reloads only on change)."""

    def __init__(self, folder: Path, *, alg: str = "RS384") -> None:
        if alg not in SUPPORTED_ALGS:
            raise ValueError(f"unsupported signing algorithm {alg!r}")
        self.folder = folder
        self.alg = alg
        self._lock = threading.Lock()
        self._entries: list[KeyEntry] = []
        self._seen: tuple[int, ...] = ()

    # -- reading -------------------------------------------------------------------------------

    def _fingerprint(self) -> tuple[int, ...]:
        try:
            return tuple(sorted(p.stat().st_mtime_ns for p in self.folder.glob("*.json")))
        except FileNotFoundError:
            return ()

    def entries(self) -> list[KeyEntry]:
        """All keys on disk, oldest first; re-read only when a file was added, changed or removed."""
        seen = self._fingerprint()
        with self._lock:
            if seen != self._seen or not self._entries:
                entries = []
                for path in sorted(self.folder.glob("*.json")):
                    with path.open() as handle:
                        entries.append(KeyEntry.from_json(json.load(handle)))
                entries.sort(key=lambda e: (e.activates_at, e.created_at))
                self._entries, self._seen = entries, seen
            return list(self._entries)

    def signing_key(self, now: datetime | None = None) -> KeyEntry:
        """The key to sign with now: the newest one whose lead time has passed."""
        now = now or _utcnow()
        candidates = [e for e in self.entries() if e.can_sign(now)]
        if not candidates:
            raise LookupError(f"no usable signing key in {self.folder}; run `fhir-bridge keys rotate`")
        return candidates[-1]

    def find(self, kid: str) -> KeyEntry | None:
        return next((e for e in self.entries() if e.kid == kid), None)

    def jwks(self, now: datetime | None = None) -> dict[str, Any]:
        """The public JWKS: every key still published (upcoming, current and in grace), no private parts."""
        now = now or _utcnow()
        return {"keys": [e.public_jwk() for e in self.entries() if e.is_published(now)]}

    # -- writing -------------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialise writers across processes (two services starting at once must not both generate)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (self.folder / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, entry: KeyEntry) -> None:
        path = self.folder / f"{entry.kid}.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(entry.to_json(), handle, indent=1)
        tmp.replace(path)

    def ensure(self, now: datetime | None = None) -> KeyEntry:
        """Generate the first key if the folder has none that can sign (first start)."""
        now = now or _utcnow()
        with self._exclusive():
            try:
                return self.signing_key(now)
            except LookupError:
                entry = KeyEntry(key=generate_key(self.alg), alg=self.alg, created_at=now, activates_at=now)
                self._write(entry)
                return entry

    def rotate(self, *, lead: timedelta, grace: timedelta, now: datetime | None = None) -> KeyEntry:
        """Publish a new key now, let it sign after ``lead``; keep the old ones for ``grace`` after that."""
        now = now or _utcnow()
        with self._exclusive():
            new = KeyEntry(key=generate_key(self.alg), alg=self.alg, created_at=now, activates_at=now + lead)
            self._write(new)
            for old in self.entries():
                if old.kid != new.kid and old.retires_at is None:
                    self._write(replace(old, retires_at=new.activates_at + grace))
            return new

    def purge_retired(self, now: datetime | None = None) -> list[str]:
        """Delete keys whose grace period is over; they are no longer published and never sign."""
        now = now or _utcnow()
        removed = []
        with self._exclusive():
            for entry in self.entries():
                if not entry.is_published(now):
                    (self.folder / f"{entry.kid}.json").unlink(missing_ok=True)
                    removed.append(entry.kid)
        return removed
