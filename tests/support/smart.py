"""What a SMART app does on the wire, written out by hand so tests can drive an EHR step by step.

PKCE pairs, authorization URLs, reading a redirect, and client assertions signed by SMART's rules
(RS384 or ES384, ``kid`` header, ``exp`` five minutes ahead at most, a fresh ``jti``). Tests bend
these on purpose (wrong algorithm, old ``exp``, replayed ``jti``) to check that the EHR refuses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(64)[:96]
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_query(**params: str | None) -> str:
    return urlencode({k: v for k, v in params.items() if v is not None})


def redirect_params(location: str) -> dict[str, str]:
    """The query parameters of a redirect, one value each."""
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@dataclass
class AppKey:
    """A confidential app's key pair and the public JWKS it registers."""

    key: RSAKey | ECKey
    alg: str
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    @classmethod
    def rsa(cls, alg: str = "RS384") -> AppKey:
        return cls(RSAKey.generate_key(2048, private=True), alg)

    @classmethod
    def ec(cls) -> AppKey:
        return cls(ECKey.generate_key("P-384", private=True), "ES384")

    @property
    def jwk(self) -> dict[str, Any]:
        return self.key.as_dict(private=False) | {"kid": self.kid, "alg": self.alg, "use": "sig"}

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}

    def assertion(
        self,
        client_id: str,
        token_url: str,
        *,
        alg: str | None = None,
        lifetime: int = 240,
        jti: str | None = None,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": client_id,
            "sub": client_id,
            "aud": token_url,
            "iat": now,
            "exp": now + lifetime,
            "jti": jti or uuid.uuid4().hex,
        }
        body.update(claims or {})
        use_alg = alg or self.alg
        head = {"alg": use_alg, "typ": "JWT", "kid": self.kid, **(header or {})}
        return jwt.encode(head, body, self.key, algorithms=[use_alg])

    def signed(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        """A JWS signed with this key exactly as given (no library checks on the header, e.g. ``crit``)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

        def b64(data: bytes) -> bytes:
            return base64.urlsafe_b64encode(data).rstrip(b"=")

        signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims).encode())
        private = self.key.private_key
        assert private is not None, "AppKey always holds the private half"
        if isinstance(private, ec.EllipticCurvePrivateKey):
            r, s = utils.decode_dss_signature(private.sign(signing_input, ec.ECDSA(hashes.SHA384())))
            signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
        else:
            signature = private.sign(signing_input, padding.PKCS1v15(), hashes.SHA384())
        return (signing_input + b"." + b64(signature)).decode()

    def claims(self, client_id: str, token_url: str, lifetime: int = 240) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": client_id,
            "sub": client_id,
            "aud": token_url,
            "iat": now,
            "exp": now + lifetime,
            "jti": uuid.uuid4().hex,
        }

    def client_credentials(
        self,
        client_id: str,
        token_url: str,
        scope: str,
        *,
        alg: str | None = None,
        lifetime: int = 240,
        jti: str | None = None,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
    ) -> dict[str, str]:
        """A client_credentials token request form, with an assertion made by ``assertion``."""
        assertion = self.assertion(
            client_id, token_url, alg=alg, lifetime=lifetime, jti=jti, header=header, claims=claims
        )
        return {
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }
