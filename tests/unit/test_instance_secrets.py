"""Generated secrets: processes starting together agree on one, and none reads a half-written file."""

from __future__ import annotations

import functools
import multiprocessing
import stat
from pathlib import Path

from cryptography.fernet import Fernet

from fhir_bridge.instance import read_or_create_secret


def test_processes_starting_together_get_the_same_complete_secret(tmp_path: Path) -> None:
    # Web and worker processes start at once on a fresh install; a worker once read an empty key file
    # created, but not yet written, by another ("at least one data key is required").
    # Spawned, not forked: forking the threaded pytest process can leave a child stuck on a lock another
    # thread held at the fork (seen in CI: the pool never returned).
    read = functools.partial(read_or_create_secret, kind="fernet")
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        for attempt in range(20):
            path = tmp_path / f"data_key_{attempt}"
            values = pool.map(read, [path] * 16)
            assert len(set(values)) == 1, values
            (value,) = set(values)
            Fernet(value.encode())  # a whole, valid key
            assert path.read_text().strip() == value
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"data_key_{n}" for n in range(20)), (
        "no temporary file is left behind"
    )


def test_a_new_secret_is_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "instance" / "secret_key"
    first = read_or_create_secret(path)
    assert len(first) >= 64 and read_or_create_secret(path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
