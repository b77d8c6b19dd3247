"""The instance folder: where a single-machine install keeps its database, keys and generated secrets."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

from cryptography.fernet import Fernet


def ensure_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def read_or_create_secret(path: Path, kind: Literal["token", "fernet"] = "token") -> str:
    """Return the secret stored at ``path``, creating it (mode 0600) on first use.

    Processes starting together (web and worker, or two workers) must agree on one secret and never
    see a half-written file: the secret is written to a private temporary file first, then linked to
    ``path``, which fails if another process got there first (the loser reads the winner's file, which
    is complete the moment it exists).
    """
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    ensure_folder(path.parent)
    value = Fernet.generate_key().decode() if kind == "fernet" else secrets.token_urlsafe(48)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return path.read_text().strip()
    finally:
        temporary.unlink(missing_ok=True)
    return value
