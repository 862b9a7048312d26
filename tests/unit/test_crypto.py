"""The store's encryption keyring: round trip, rotation, tamper detection, key file parsing."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import ConfigError
from broker.store.crypto import KEY_FILE_KEY, Keyring, UndecryptableToken

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
AAD = b"token-broker:token:twilio"
PLAINTEXT = b'{"access_token": "at-123"}'


def b64(key: bytes) -> str:
    """The key as the key file spells it."""
    return base64.b64encode(key).decode()


class TestKeyring:
    """Keyring.encrypt / decrypt."""

    def test_round_trip(self) -> None:
        """A blob decrypts to its plaintext under the same keyring and AAD."""
        keyring = Keyring([("a", KEY_A)])
        blob = keyring.encrypt(PLAINTEXT, AAD)
        assert PLAINTEXT not in blob
        assert keyring.decrypt(blob, AAD) == PLAINTEXT

    def test_nonces_differ(self) -> None:
        """Two encryptions of the same plaintext give different blobs (fresh nonce each time)."""
        keyring = Keyring([("a", KEY_A)])
        assert keyring.encrypt(PLAINTEXT, AAD) != keyring.encrypt(PLAINTEXT, AAD)

    def test_first_key_encrypts(self) -> None:
        """The newest (first) key is the one new blobs are written under."""
        keyring = Keyring([("b", KEY_B), ("a", KEY_A)])
        assert keyring.current_id == "b"
        assert Keyring([("b", KEY_B)]).decrypt(keyring.encrypt(PLAINTEXT, AAD), AAD) == PLAINTEXT

    def test_rotation_old_blob_still_decrypts(self) -> None:
        """A blob written under key A decrypts with a keyring [B, A]."""
        blob = Keyring([("a", KEY_A)]).encrypt(PLAINTEXT, AAD)
        assert Keyring([("b", KEY_B), ("a", KEY_A)]).decrypt(blob, AAD) == PLAINTEXT

    def test_rotation_dropped_key(self) -> None:
        """A blob written under key A is undecryptable once only key B is configured."""
        blob = Keyring([("a", KEY_A)]).encrypt(PLAINTEXT, AAD)
        with pytest.raises(UndecryptableToken, match="unknown key id"):
            Keyring([("b", KEY_B)]).decrypt(blob, AAD)

    def test_same_id_other_key(self) -> None:
        """A blob under the right id but a different key fails authentication."""
        blob = Keyring([("a", KEY_A)]).encrypt(PLAINTEXT, AAD)
        with pytest.raises(UndecryptableToken):
            Keyring([("a", KEY_B)]).decrypt(blob, AAD)

    @pytest.mark.parametrize("position", [-1, -20, 5])
    def test_tamper(self, position: int) -> None:
        """Flipping one bit of the nonce, ciphertext or tag makes the blob undecryptable."""
        keyring = Keyring([("a", KEY_A)])
        blob = bytearray(keyring.encrypt(PLAINTEXT, AAD))
        blob[position] ^= 0x01
        with pytest.raises(UndecryptableToken):
            keyring.decrypt(bytes(blob), AAD)

    def test_aad_mismatch(self) -> None:
        """A blob moved to another Redis key (other AAD) is undecryptable."""
        keyring = Keyring([("a", KEY_A)])
        blob = keyring.encrypt(PLAINTEXT, AAD)
        with pytest.raises(UndecryptableToken, match="authentication failed"):
            keyring.decrypt(blob, b"token-broker:token:other-app")

    @pytest.mark.parametrize(
        "blob",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b"\x01", id="one-byte"),
            pytest.param(b"\x02\x01a" + b"\x00" * 40, id="unknown-version"),
            pytest.param(b"\x01\x01a" + b"\x00" * 12, id="truncated"),
            pytest.param(b"\x01\x01a" + b"\x00" * 27, id="shorter-than-a-tag"),
        ],
    )
    def test_malformed_blob(self, blob: bytes) -> None:
        """Malformed blobs raise UndecryptableToken, never another exception."""
        with pytest.raises(UndecryptableToken):
            Keyring([("a", KEY_A)]).decrypt(blob, AAD)

    def test_empty_keyring(self) -> None:
        """A keyring without keys is a configuration error on the key file."""
        with pytest.raises(ConfigError) as caught:
            Keyring([])
        assert caught.value.key == KEY_FILE_KEY


class TestBlobsOfEarlierReleases:
    """Blobs are AES-256-GCM as cryptography's AESGCM wrote them before PyCryptodome did."""

    def test_opens_a_blob_sealed_by_cryptography(self) -> None:
        """A token set stored by an earlier release (cryptography's AESGCM) still decrypts."""
        nonce = bytes(range(12))
        sealed = AESGCM(KEY_A).encrypt(nonce, PLAINTEXT, AAD)
        assert Keyring([("a", KEY_A)]).decrypt(b"\x01\x01a" + nonce + sealed, AAD) == PLAINTEXT

    def test_cryptography_opens_our_blob(self) -> None:
        """A blob written now opens with cryptography's AESGCM: a rollback reads it."""
        blob = Keyring([("a", KEY_A)]).encrypt(PLAINTEXT, AAD)
        nonce, sealed = blob[3:15], blob[15:]
        assert AESGCM(KEY_A).decrypt(nonce, sealed, AAD) == PLAINTEXT


class TestKeyringFromFile:
    """Keyring.from_file: ids, bare keys, and errors that never show key material."""

    def test_ids_and_bare_keys(self, tmp_path: Path) -> None:
        """`id base64` lines keep their id; a bare line's id is the key's SHA-256 prefix."""
        path = tmp_path / "keys"
        path.write_text(f"# rotated 2024-05\n\nk2 {b64(KEY_B)}\n  {b64(KEY_A)}  \n")
        keyring = Keyring.from_file(path)
        bare_id = hashlib.sha256(KEY_A).hexdigest()[:8]
        assert keyring.current_id == "k2"
        assert Keyring([("k2", KEY_B)]).decrypt(keyring.encrypt(PLAINTEXT, AAD), AAD) == PLAINTEXT
        old_blob = Keyring([(bare_id, KEY_A)]).encrypt(PLAINTEXT, AAD)
        assert keyring.decrypt(old_blob, AAD) == PLAINTEXT

    def test_file_keyring_opens_its_own_blobs(self, tmp_path: Path) -> None:
        """Two keyrings read from the same file decrypt each other's blobs."""
        path = tmp_path / "keys"
        path.write_text(f"k1 {b64(KEY_A)}\n")
        blob = Keyring.from_file(path).encrypt(PLAINTEXT, AAD)
        assert Keyring.from_file(path).decrypt(blob, AAD) == PLAINTEXT

    @pytest.mark.parametrize(
        ("text", "line", "fragment", "material"),
        [
            pytest.param(
                f"k1 {b64(KEY_A)}\nk2 {b64(KEY_B)[:-4]}!!!!\n",
                2,
                "not valid base64",
                b64(KEY_B)[:-4],
                id="bad-base64",
            ),
            pytest.param(
                f"# header\nk1 {b64(KEY_A[:16])}\n",
                2,
                "16 bytes; 32 needed",
                b64(KEY_A[:16]),
                id="short-key",
            ),
            pytest.param(
                f"k1 {b64(KEY_A)} extra\n",
                1,
                "expected '<key-id> <base64 key>'",
                b64(KEY_A),
                id="three-fields",
            ),
            pytest.param(
                f"k1 {b64(KEY_A)}\nk1 {b64(KEY_B)}\n",
                2,
                "used twice",
                b64(KEY_B),
                id="duplicate-id",
            ),
            pytest.param(
                f"{'i' * 256} {b64(KEY_A)}\n",
                1,
                "too long",
                b64(KEY_A),
                id="id-too-long",
            ),
        ],
    )
    def test_errors_name_the_line(
        self, tmp_path: Path, text: str, line: int, fragment: str, material: str
    ) -> None:
        """The ConfigError names the line and the reason, never the base64 text."""
        path = tmp_path / "keys"
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            Keyring.from_file(path)
        assert caught.value.key == KEY_FILE_KEY
        assert caught.value.reason.startswith(f"line {line}: ")
        assert fragment in caught.value.reason
        assert material not in str(caught.value)

    def test_only_comments(self, tmp_path: Path) -> None:
        """A file of comments and blank lines holds no key."""
        path = tmp_path / "keys"
        path.write_text("# nothing yet\n\n")
        with pytest.raises(ConfigError, match="holds no key"):
            Keyring.from_file(path)

    def test_missing_file(self, tmp_path: Path) -> None:
        """An unreadable key file is a ConfigError naming the path."""
        path = tmp_path / "absent"
        with pytest.raises(ConfigError, match="cannot read") as caught:
            Keyring.from_file(path)
        assert str(path) in caught.value.reason
