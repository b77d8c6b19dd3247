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

    ``O_EXCL`` makes concurrent first starts agree: the loser of the race reads the winner's file.
    """
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    ensure_folder(path.parent)
    value = Fernet.generate_key().decode() if kind == "fernet" else secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value
