"""AES-256-GCM encryption of stored token sets, with key ids so keys can be rotated.

The key file holds one key per line, `<key-id> <base64 of 32 bytes>` (or just the base64, its
id the first 8 hex digits of the key's SHA-256). The first line encrypts; every line decrypts.
A blob is `0x01 | len(id) | id | nonce(12) | ciphertext+tag`; the AAD binds it to its Redis key.

AES-GCM comes from PyCryptodome (pycryptodomex, the `Cryptodome` package): its AES and GHASH
are small C libraries, about 3 MiB resident with their import, where cryptography's AESGCM
maps its whole Rust extension with a static OpenSSL (about 8 MiB). The blobs are the same
AES-256-GCM either way (96-bit nonce, 128-bit tag).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from broker import import_without
from broker.errors import ConfigError

# PyCryptodome reaches its C code through cffi wherever cffi is installed (cryptography installs
# it), and then parses C declarations with pycparser at import: 2.6 MiB and ~20 ms, where
# ctypes takes 1.3 MiB and ~5 ms. cffi is hidden while PyCryptodome picks its backend.
import_without("Cryptodome.Cipher.AES", hidden="cffi")
from Cryptodome.Cipher import AES  # noqa: E402

FORMAT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_FILE_KEY = "store.encryption_key_file"


class UndecryptableToken(Exception):
    """A stored blob that no configured key opens (unknown key id, tampering, wrong AAD)."""


class Keyring:
    """The encryption keys, newest first."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError(KEY_FILE_KEY, "holds no key")
        self._keys = dict(keys)
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
        cipher = AES.new(self._keys[self.current_id], AES.MODE_GCM, nonce=nonce)
        cipher.update(aad)
        ciphertext, tag = cipher.encrypt_and_digest(plaintext)
        return bytes([FORMAT_VERSION, len(key_id)]) + key_id + nonce + ciphertext + tag

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt with the key the blob names; UndecryptableToken when that is not possible."""
        if len(blob) < 2 or blob[0] != FORMAT_VERSION:
            raise UndecryptableToken("unknown blob format")
        id_len = blob[1]
        key_id = blob[2 : 2 + id_len].decode(errors="replace")
        rest = blob[2 + id_len :]
        key = self._keys.get(key_id)
        if key is None:
            raise UndecryptableToken(f"written under unknown key id {key_id!r}")
        if len(rest) < NONCE_BYTES + TAG_BYTES:
            raise UndecryptableToken("truncated blob")
        cipher = AES.new(key, AES.MODE_GCM, nonce=rest[:NONCE_BYTES])
        cipher.update(aad)
        try:
            return cipher.decrypt_and_verify(rest[NONCE_BYTES:-TAG_BYTES], rest[-TAG_BYTES:])
        except ValueError:
            raise UndecryptableToken("authentication failed (tampered or moved)") from None
