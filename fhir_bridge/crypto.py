"""Encryption of secrets at rest (EHR tokens): Fernet with a key kept outside the database."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class DataCipher:
    """Encrypts with the first key, decrypts with any, so keys rotate by prepending a new one."""

    def __init__(self, keys: str) -> None:
        parts = [k.strip() for k in keys.split(",") if k.strip()]
        if not parts:
            raise ValueError("at least one data key is required")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in parts])

    def encrypt(self, plaintext: bytes) -> bytes:
        return self._fernet.encrypt(plaintext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        try:
            return self._fernet.decrypt(ciphertext)
        except InvalidToken:
            raise ValueError("ciphertext was not made with any configured data key") from None
