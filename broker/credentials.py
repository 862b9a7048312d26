"""Client credentials read from files, re-read when the files change.

Kubernetes updates a mounted Secret by swapping a `..data` symlink; `os.stat` follows links, so
the swap shows as a new inode or mtime. A file that becomes unreadable or empty keeps the last
good value: the broker never loses a working secret to a half-written update. A client
assertion (a projected service-account token, a JWT-SVID) keeps its last good value too, but
never past its own `exp`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from broker.errors import ConfigError, CredentialFileError
from broker.logs import SECRETS, get_logger
from broker.model import AppSpec

# An assertion is not sent when it expires within this many seconds: the request's own time
# and a few seconds of clock skew at the server would make it arrive expired.
ASSERTION_EXP_MARGIN = 10.0

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


class UnusableAssertion(ValueError):
    """An assertion file's content is not a JWT with an exp; the reason never quotes it."""


def assertion_expiry(token: str) -> float:
    """The `exp` of a JWT, read without verifying it (the server verifies; we only time it)."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise UnusableAssertion("does not hold a JWT (three dot-separated parts)")
    body = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, binascii.Error):
        raise UnusableAssertion("holds a JWT whose payload is not base64url JSON") from None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise UnusableAssertion("holds a JWT without a numeric exp claim")
    return float(exp)


def _read_assertion(path: Path) -> Assertion:
    """The assertion in `path`; UnusableAssertion saying why there is none."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise UnusableAssertion(f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UnusableAssertion("is not UTF-8 text") from None
    if not token:
        raise UnusableAssertion("is empty")
    return Assertion(token, assertion_expiry(token))


def _when(exp: float) -> str:
    """`exp` for a message: ISO time and the number itself."""
    iso = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{iso} (exp {exp:.0f})"


@dataclass(frozen=True)
class Assertion:
    """One client assertion read from its file, and when it expires."""

    token: str = field(repr=False)
    expires_at: float


class AssertionFile:
    """A JWT the platform rewrites before it expires; read again whenever the file changes.

    A file that goes missing or unreadable keeps the last good assertion, while it lasts.
    """

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self._read = False
        self._signature: _Signature | None = None
        self._current: Assertion | None = None
        self._problem: str | None = None

    def _stat(self) -> _Signature | None:
        try:
            st = os.stat(self.path)  # follows the kubelet's ..data symlink
        except OSError:
            return None
        return _Signature(st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> bool | None:
        """Re-read if the file changed. True: new assertion; False: failed (kept old); None: same."""
        signature = self._stat()
        if self._read and signature == self._signature:
            return None
        self._read = True
        self._signature = signature
        try:
            assertion = _read_assertion(self.path)
        except UnusableAssertion as exc:
            return self._failed(str(exc))
        self._problem = None
        if self._current is not None and self._current.token == assertion.token:
            return None
        self._current = assertion
        return True

    def _failed(self, problem: str) -> bool:
        self._problem = problem
        log.warning("credentials.reload_failed", file=self.key, reason=f"{self.path} {problem}")
        return False

    def current(self, now: float) -> str:
        """The assertion to send at `now`; CredentialFileError when there is none that lasts."""
        current = self._current
        if current is not None and current.expires_at - ASSERTION_EXP_MARGIN > now:
            return current.token
        if current is None:
            reason = f"{self.path} {self._problem or 'has not been read'}"
        elif self._problem is not None:
            reason = f"{self.path} {self._problem}; the last good assertion expired at " + _when(
                current.expires_at
            )
        else:
            reason = f"{self.path} expired at {_when(current.expires_at)}"
        raise CredentialFileError(
            f"{self.key}: {reason}; waiting for it to change", error="client_assertion"
        )

    @property
    def expires_at(self) -> float | None:
        """The last good assertion's exp, or None."""
        return self._current.expires_at if self._current is not None else None


class Credentials:
    """An app's client id, secrets, private key, client assertion and TLS client certificate,
    each re-read when its file changes."""

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
        self._assertion: AssertionFile | None = None
        if spec.assertion_file is not None:
            self._assertion = AssertionFile(spec.assertion_file, f"{prefix}.assertion_file")
        self._tls_context: ssl.SSLContext | None = None
        self._tls_paths: tuple[Path, Path] | None = None
        if spec.tls_client_cert_file is not None and spec.tls_client_key_file is not None:
            self._tls_paths = (spec.tls_client_cert_file, spec.tls_client_key_file)
            self._files["tls_client_cert"] = SecretFile(
                spec.tls_client_cert_file, f"{prefix}.tls_client_cert_file", text=False
            )
            self._files["tls_client_key"] = SecretFile(
                spec.tls_client_key_file, f"{prefix}.tls_client_key_file", text=False
            )
            self._tls_context = _client_tls_context(*self._tls_paths, where=prefix)

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

    def client_assertion(self, now: float) -> str:
        """The client assertion from its file, unexpired at `now` (CredentialFileError if not)."""
        if self._assertion is None:
            raise CredentialFileError("client_assertion without an assertion_file", error="config")
        self._check_assertion()
        return self._assertion.current(now)

    def _check_assertion(self) -> None:
        if self._assertion is None:
            return
        changed = self._assertion.refresh()
        if changed is not None:
            if self.on_reload is not None:
                self.on_reload(self.app, "client_assertion", changed)
            if changed and self.on_change is not None:
                self.on_change(self.app, "client_assertion")

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context holding the client certificate (tls_client_auth), or None.

        Rebuilt when the certificate or key file changed; a pair that does not load (a
        half-done rotation) keeps the last good context until the files change again.
        """
        if self._tls_paths is None:
            return self._tls_context
        cert = self._files["tls_client_cert"].refresh()
        key = self._files["tls_client_key"].refresh()
        if cert is None and key is None:
            return self._tls_context
        ok = False
        try:
            self._tls_context = _client_tls_context(*self._tls_paths, where=f"apps.{self.app}")
            ok = True
        except ConfigError as exc:
            log.warning("credentials.reload_failed", file=exc.key, reason=exc.reason)
        if self.on_reload is not None:
            self.on_reload(self.app, "tls_client_cert", ok)
        if ok and self.on_change is not None:
            self.on_change(self.app, "tls_client_cert")
        return self._tls_context

    def check_all(self) -> None:
        """Re-read every changed file now (so a change is noticed even between refreshes)."""
        for which in list(self._files):
            if not which.startswith("tls_client_"):
                self._get(which)
        self._check_assertion()
        self.tls_context()


def _client_tls_context(cert_file: Path, key_file: Path, *, where: str) -> ssl.SSLContext:
    """A verifying client context that presents the certificate chain in `cert_file`."""
    context = ssl.create_default_context()
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{where}.tls_client_cert_file",
            f"{cert_file} and {key_file} do not load as a certificate and its key: "
            f"{_ssl_reason(exc)}",
        ) from None
    return context


def _ssl_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return exc.strerror or type(exc).__name__
