"""AES-256-GCM encryption of stored token sets, with key ids so keys can be rotated.

The key file holds one key per line, `<key-id> <base64 of 32 bytes>` (or just the base64, its
id the first 8 hex digits of the key's SHA-256). The first line encrypts; every line decrypts.
A blob is `0x01 | len(id) | id | nonce(12) | ciphertext+tag`; the AAD binds it to its Redis key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import ConfigError

FORMAT_VERSION = 1
NONCE_BYTES = 12
KEY_FILE_KEY = "store.encryption_key_file"


class UndecryptableToken(Exception):
    """A stored blob that no configured key opens (unknown key id, tampering, wrong AAD)."""


class Keyring:
    """The encryption keys, newest first."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError(KEY_FILE_KEY, "holds no key")
        self._keys = {key_id: AESGCM(key) for key_id, key in keys}
        self.current_id = keys[0][0]

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        """Parse the key file; errors name the line, never the key."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(KEY_FILE_KEY, f"cannot read {path}: {exc.strerror}") from None
        keys: list[tuple[str, bytes]] = []
        for number, raw_line in enumerate(text.splitlines(), start=1):
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) > 2:
                raise ConfigError(KEY_FILE_KEY, f"line {number}: expected '<key-id> <base64 key>'")
            try:
                key = base64.b64decode(fields[-1], validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(KEY_FILE_KEY, f"line {number}: not valid base64") from None
            if len(key) != 32:
                raise ConfigError(KEY_FILE_KEY, f"line {number}: {len(key)} bytes; 32 needed")
            key_id = fields[0] if len(fields) == 2 else hashlib.sha256(key).hexdigest()[:8]
            if len(key_id.encode()) > 255 or any(k == key_id for k, _ in keys):
                raise ConfigError(KEY_FILE_KEY, f"line {number}: key id is used twice or too long")
            keys.append((key_id, key))
        return cls(keys)

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt under the newest key."""
        key_id = self.current_id.encode()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self.current_id].encrypt(nonce, plaintext, aad)
        return bytes([FORMAT_VERSION, len(key_id)]) + key_id + nonce + sealed

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt with the key the blob names; UndecryptableToken when that is not possible."""
        if len(blob) < 2 or blob[0] != FORMAT_VERSION:
            raise UndecryptableToken("unknown blob format")
        id_len = blob[1]
        key_id = blob[2 : 2 + id_len].decode(errors="replace")
        rest = blob[2 + id_len :]
        cipher = self._keys.get(key_id)
        if cipher is None:
            raise UndecryptableToken(f"written under unknown key id {key_id!r}")
        if len(rest) <= NONCE_BYTES:
            raise UndecryptableToken("truncated blob")
        try:
            return cipher.decrypt(rest[:NONCE_BYTES], rest[NONCE_BYTES:], aad)
        except InvalidTag:
            raise UndecryptableToken("authentication failed (tampered or moved)") from None
