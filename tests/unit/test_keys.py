"""Signing keys: generated once with safe permissions, published without private parts, rotated safely."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import KeySet

from auth.keys import Keyring

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "k"}


def test_first_start_generates_one_private_key(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "keys")
    first = ring.ensure()
    again = Keyring(tmp_path / "keys").ensure()
    assert first.kid == again.kid
    files = list((tmp_path / "keys").glob("*.json"))
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_jwks_has_only_public_members(keys_dir: Path) -> None:
    jwks = Keyring(keys_dir).jwks()
    assert jwks["keys"]
    for key in jwks["keys"]:
        assert not PRIVATE_MEMBERS & set(key)
        assert key["kid"] and key["alg"] == "RS384" and key["use"] == "sig"
        assert len(key["n"]) * 6 >= 2048  # base64url: 6 bits per character


def test_es384_keys(tmp_path: Path) -> None:
    entry = Keyring(tmp_path / "ec", alg="ES384").ensure()
    assert entry.public_jwk()["crv"] == "P-384"


def test_rotation_publishes_first_signs_later_and_retires_after_grace(keys_dir: Path) -> None:
    ring = Keyring(keys_dir)
    old = ring.signing_key()
    now = datetime.now(UTC)
    new = ring.rotate(lead=timedelta(hours=1), grace=timedelta(days=1), now=now)

    published = {k["kid"] for k in ring.jwks(now)["keys"]}
    assert published == {old.kid, new.kid}
    # Before the lead time passes the old key still signs; after it, the new one does.
    assert ring.signing_key(now).kid == old.kid
    assert ring.signing_key(now + timedelta(hours=1, seconds=1)).kid == new.kid
    # The old key stays published through the grace period, then leaves the JWKS.
    assert old.kid in {k["kid"] for k in ring.jwks(now + timedelta(hours=24))["keys"]}
    later = now + timedelta(hours=25, seconds=1)
    assert {k["kid"] for k in ring.jwks(later)["keys"]} == {new.kid}
    assert ring.purge_retired(later) == [old.kid]


def test_a_running_process_sees_a_rotation_made_elsewhere(keys_dir: Path) -> None:
    worker_view = Keyring(keys_dir)
    before = worker_view.signing_key()
    # The CLI, in another process, rotates with no lead time.
    Keyring(keys_dir).rotate(lead=timedelta(0), grace=timedelta(hours=1))
    after = worker_view.signing_key()
    assert after.kid != before.kid
    # Tokens signed with the old key still verify against the published set during the grace period.
    token = jwt.encode({"alg": "RS384", "kid": before.kid}, {"x": 1}, before.key, algorithms=["RS384"])
    keyset = KeySet.import_key_set({"keys": worker_view.jwks()["keys"]})
    assert jwt.decode(token, keyset, algorithms=["RS384"]).claims == {"x": 1}
