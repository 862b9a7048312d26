"""Client credentials read from files, re-read when the files change.

Kubernetes updates a mounted Secret by swapping a `..data` symlink; `os.stat` follows links, so
the swap shows as a new inode or mtime. A file that becomes unreadable or empty keeps the last
good value: the broker never loses a working secret to a half-written update.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.errors import ConfigError
from broker.logs import SECRETS, get_logger
from broker.model import AppSpec

log = get_logger(__name__)

# (app, which) → called after a file's value changed; `which` is e.g. "client_secret".
ChangeHook = Callable[[str, str], None]
# (app, which, ok) → called after every reload attempt.
ReloadHook = Callable[[str, str, bool], None]


@dataclass
class _Signature:
    inode: int
    mtime_ns: int
    size: int


class SecretFile:
    """One secret file, its last good value, and the stat signature it was read at."""

    def __init__(self, path: Path, key: str, *, text: bool = True) -> None:
        self.path = path
        self.key = key
        self._text = text
        self._signature: _Signature | None = None
        self._value: bytes = b""
        self._value = self._read_or_raise()

    def _read_or_raise(self) -> bytes:
        try:
            signature = self._stat()
            raw = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(self.key, f"cannot read {self.path}: {exc.strerror}") from None
        value = raw.strip() if self._text else raw
        if not value:
            raise ConfigError(self.key, f"{self.path} is empty")
        self._signature = signature
        if self._text:
            SECRETS.add(value.decode(errors="replace"))
        return value

    def _stat(self) -> _Signature:
        st = os.stat(self.path)  # follows the kubelet's ..data symlink
        return _Signature(st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> bool | None:
        """Re-read if the file changed. True: new value; False: failed (kept old); None: same."""
        try:
            signature = self._stat()
        except OSError:
            signature = None
        if signature == self._signature:
            return None
        try:
            value = self._read_or_raise()
        except ConfigError as exc:
            log.warning("credentials.reload_failed", file=self.key, reason=exc.reason)
            self._signature = signature
            return False
        if value == self._value:
            return None
        self._value = value
        return True

    @property
    def value(self) -> bytes:
        """The last good value."""
        return self._value


class Credentials:
    """An app's client id, secrets and private key, each re-read when its file changes."""

    def __init__(
        self,
        spec: AppSpec,
        *,
        on_change: ChangeHook | None = None,
        on_reload: ReloadHook | None = None,
    ) -> None:
        self.app = spec.name
        self._inline_client_id = spec.client_id
        self.on_change = on_change
        self.on_reload = on_reload
        prefix = f"apps.{spec.name}"
        self._files: dict[str, SecretFile] = {}
        if spec.client_id_file is not None:
            self._files["client_id"] = SecretFile(spec.client_id_file, f"{prefix}.client_id_file")
        if spec.client_secret_file is not None:
            self._files["client_secret"] = SecretFile(
                spec.client_secret_file, f"{prefix}.client_secret_file"
            )
        if spec.client_secret_previous_file is not None:
            self._files["client_secret_previous"] = SecretFile(
                spec.client_secret_previous_file, f"{prefix}.client_secret_previous_file"
            )
        if spec.private_key_file is not None:
            self._files["private_key"] = SecretFile(
                spec.private_key_file, f"{prefix}.private_key_file", text=False
            )

    def _get(self, which: str) -> bytes | None:
        secret = self._files.get(which)
        if secret is None:
            return None
        changed = secret.refresh()
        if changed is not None:
            if self.on_reload is not None:
                self.on_reload(self.app, which, changed)
            if changed and self.on_change is not None:
                self.on_change(self.app, which)
        return secret.value

    def client_id(self) -> str:
        """The client id (inline, or from its file)."""
        if self._inline_client_id is not None:
            return self._inline_client_id
        value = self._get("client_id")
        return value.decode() if value else ""

    def client_secret(self) -> str | None:
        """The current client secret."""
        value = self._get("client_secret")
        return value.decode() if value is not None else None

    def previous_secret(self) -> str | None:
        """The pre-rotation secret, when configured."""
        value = self._get("client_secret_previous")
        return value.decode() if value is not None else None

    def private_key(self) -> bytes | None:
        """The PEM private key for private_key_jwt."""
        return self._get("private_key")

    def check_all(self) -> None:
        """Re-read every changed file now (so a change is noticed even between refreshes)."""
        for which in list(self._files):
            self._get(which)
