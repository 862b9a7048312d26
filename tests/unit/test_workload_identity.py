"""Workload identity credentials (issue 23): the client assertion file and the mTLS client
certificate, each re-read on change; their config rules; errors that name the file, never it."""

from __future__ import annotations

import base64
import json
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from broker.config import load_config
from broker.credentials import (
    ASSERTION_EXP_MARGIN,
    AssertionFile,
    Credentials,
    UnusableAssertion,
    assertion_expiry,
)
from broker.errors import ConfigError, CredentialFileError
from broker.model import AppSpec, AssertionType, ClientAuth
from tests.support.workload_identity import ClusterIssuer, TestCA

NOW = 1_800_000_000.0
AUDIENCE = "api://token-broker"


def unsigned(claims: dict[str, Any]) -> str:
    """A JWT-shaped string (the broker never verifies the signature; the server does)."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'ES256'})}.{part(claims)}.c2lnbmF0dXJl"


def write_new(path: Path, text: str) -> None:
    """Replace the file as the kubelet does (a new inode), so the change is always seen."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class TestAssertionExpiry:
    def test_reads_exp_without_a_signature_check(self) -> None:
        """The exp of a JWT is read as it is; the signature is the server's to check."""
        assert assertion_expiry(unsigned({"exp": 1234, "sub": "x"})) == 1234.0

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ("not-a-jwt", "three dot-separated parts"),
            ("a.!!!.c", "not base64url JSON"),
            (unsigned({"sub": "x"}), "without a numeric exp"),
            (unsigned({"exp": "soon"}), "without a numeric exp"),
            (unsigned({"exp": True}), "without a numeric exp"),
        ],
    )
    def test_an_unusable_token_says_why_without_quoting_it(self, text: str, reason: str) -> None:
        """Each kind of bad content has its reason; the reason never holds the content."""
        with pytest.raises(UnusableAssertion) as caught:
            assertion_expiry(text)
        assert reason in str(caught.value)
        assert text not in str(caught.value)


class TestAssertionFile:
    def test_a_rewritten_file_is_read_again(self, tmp_path: Path) -> None:
        """A new assertion in the file is what the next request sends."""
        path = tmp_path / "token"
        first, second = unsigned({"exp": NOW + 600}), unsigned({"exp": NOW + 1200})
        path.write_text(first + "\n")
        assertion = AssertionFile(path, "apps.a.assertion_file")
        assert assertion.refresh() is True
        assert assertion.current(NOW) == first
        assert assertion.refresh() is None
        write_new(path, second)
        assert assertion.refresh() is True
        assert assertion.current(NOW) == second
        assert assertion.expires_at == NOW + 1200

    def test_an_expired_assertion_is_an_error_naming_the_file_and_exp(self, tmp_path: Path) -> None:
        """Past its exp (less the margin) it is never sent; the error names file and exp."""
        path = tmp_path / "token"
        token = unsigned({"exp": NOW})
        path.write_text(token)
        assertion = AssertionFile(path, "apps.a.assertion_file")
        assertion.refresh()
        assert assertion.current(NOW - ASSERTION_EXP_MARGIN - 1) == token
        with pytest.raises(CredentialFileError) as caught:
            assertion.current(NOW - ASSERTION_EXP_MARGIN + 1)
        message = str(caught.value)
        assert "apps.a.assertion_file" in message
        assert str(path) in message
        assert "2027-01-15T08:00:00Z (exp 1800000000)" in message
        assert "waiting for it to change" in message
        assert token not in message
        assert caught.value.error == "client_assertion"

    def test_a_missing_file_is_an_error_naming_the_file(self, tmp_path: Path) -> None:
        """No file yet (spiffe-helper writes it later): the error says the file cannot be read."""
        path = tmp_path / "svid.jwt"
        assertion = AssertionFile(path, "apps.a.assertion_file")
        assert assertion.refresh() is False
        with pytest.raises(CredentialFileError, match=r"svid\.jwt cannot be read"):
            assertion.current(NOW)
        path.write_text(unsigned({"exp": NOW + 600}))
        assert assertion.refresh() is True
        assert assertion.current(NOW)

    def test_a_broken_file_keeps_the_last_good_assertion_while_it_lasts(
        self, tmp_path: Path
    ) -> None:
        """A half-written update keeps the old assertion, but only until its own exp."""
        path = tmp_path / "token"
        good = unsigned({"exp": NOW + 600})
        path.write_text(good)
        assertion = AssertionFile(path, "apps.a.assertion_file")
        assertion.refresh()
        with capture_logs() as logs:
            write_new(path, "garbage")
            assert assertion.refresh() is False
        assert logs[0]["event"] == "credentials.reload_failed"
        assert "garbage" not in str(logs)
        assert assertion.current(NOW) == good
        with pytest.raises(CredentialFileError) as caught:
            assertion.current(NOW + 600)
        assert "does not hold a JWT" in str(caught.value)
        assert "the last good assertion expired at" in str(caught.value)
        assert good not in str(caught.value)


class TestCredentialsAssertion:
    def test_a_new_assertion_fires_the_change_hook(self, tmp_path: Path) -> None:
        """The file watcher's check_all announces a rotated assertion (it wakes a failed app)."""
        path = tmp_path / "token"
        path.write_text(unsigned({"exp": NOW + 600}))
        changes: list[tuple[str, str]] = []
        spec = AppSpec(
            name="a",
            token_url="https://idp.test/token",
            client_id="c",
            client_auth=ClientAuth.CLIENT_ASSERTION,
            assertion_file=path,
        )
        credentials = Credentials(spec, on_change=lambda app, which: changes.append((app, which)))
        credentials.check_all()
        assert changes == [("a", "client_assertion")]
        credentials.check_all()
        assert changes == [("a", "client_assertion")]
        write_new(path, unsigned({"exp": NOW + 900}))
        credentials.check_all()
        assert changes == [("a", "client_assertion")] * 2

    def test_the_assertion_type_urns(self) -> None:
        """jwt-bearer and jwt-spiffe map to their registered client_assertion_type URNs."""
        assert AssertionType.JWT_BEARER.urn == (
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        )
        assert AssertionType.JWT_SPIFFE.urn == (
            "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
        )


class TestTlsClientCertificate:
    def test_the_context_is_rebuilt_when_the_files_change(self, tmp_path: Path) -> None:
        """A rotated certificate gives a new context; a mismatched pair keeps the last good one."""
        ca = TestCA()
        cert, key = ca.write(tmp_path, "tls", "broker-1")
        reloads: list[bool] = []
        spec = AppSpec(
            name="a",
            token_url="https://idp.test/token",
            client_id="c",
            client_auth=ClientAuth.TLS_CLIENT_AUTH,
            tls_client_cert_file=cert,
            tls_client_key_file=key,
        )
        credentials = Credentials(spec, on_reload=lambda app, which, ok: reloads.append(ok))
        first = credentials.tls_context()
        assert isinstance(first, ssl.SSLContext)
        assert credentials.tls_context() is first
        new_cert, new_key = ca.issue("broker-2")
        write_new(cert, new_cert.decode())
        write_new(key, new_key.decode())
        second = credentials.tls_context()
        assert second is not first
        assert reloads == [True]
        other_cert, _ = ca.issue("broker-3")
        with capture_logs() as logs:
            write_new(cert, other_cert.decode())
            assert credentials.tls_context() is second
        assert reloads == [True, False]
        assert logs[0]["file"] == "apps.a.tls_client_cert_file"
        assert "BEGIN" not in str(logs)


class TestConfig:
    def config(self, tmp_path: Path, app: dict[str, Any]) -> Path:
        (tmp_path / "client.key").write_text("client-key-0123456789-abcdefghijklmnop")
        data = {
            "apps": {"fed": {"token_url": "https://idp.test/token", "client_id": "c", **app}},
            "clients": {"svc": {"key_file": "client.key", "apps": ["fed"]}},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def errors(self, tmp_path: Path, app: dict[str, Any]) -> dict[str, str]:
        with pytest.raises(ConfigError) as caught:
            load_config(self.config(tmp_path, app))
        found = getattr(caught.value, "errors", (caught.value,))
        return {e.key: e.reason for e in found}

    def test_client_assertion_needs_no_secret(self, tmp_path: Path) -> None:
        """assertion_file alone authenticates; the type defaults to jwt-bearer."""
        (tmp_path / "token").write_text(ClusterIssuer().mint(audience=AUDIENCE))
        config = load_config(
            self.config(tmp_path, {"client_auth": "client_assertion", "assertion_file": "token"})
        )
        app = config.apps["fed"]
        assert app.assertion_file == tmp_path / "token"
        assert app.assertion_type is AssertionType.JWT_BEARER
        assert app.client_secret_file is None

    def test_a_missing_assertion_file_is_the_platforms_to_write(self, tmp_path: Path) -> None:
        """spiffe-helper writes after start: a file not there yet is not a config mistake."""
        config = load_config(
            self.config(
                tmp_path,
                {
                    "client_auth": "client_assertion",
                    "assertion_file": "svid.jwt",
                    "assertion_type": "jwt-spiffe",
                },
            )
        )
        assert config.apps["fed"].assertion_type is AssertionType.JWT_SPIFFE

    def test_a_token_exchange_needs_no_client_id(self, tmp_path: Path) -> None:
        """token-exchange authenticates no client: no client_id is fine; other types need one."""
        app = {"client_auth": "client_assertion", "assertion_file": "t"}
        path = self.config(tmp_path, {**app, "assertion_type": "token-exchange"})
        data = yaml.safe_load(path.read_text())
        del data["apps"]["fed"]["client_id"]
        path.write_text(yaml.safe_dump(data))
        assert load_config(path).apps["fed"].client_id is None
        data["apps"]["fed"]["assertion_type"] = "jwt-bearer"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match="give exactly one of client_id and client_id_file"):
            load_config(path)

    def test_client_assertion_rules(self, tmp_path: Path) -> None:
        """No assertion_file, or one that is not a JWT, is named by its key."""
        assert self.errors(tmp_path, {"client_auth": "client_assertion"}) == {
            "apps.fed.assertion_file": "required for client_auth client_assertion"
        }
        (tmp_path / "token").write_text("not a token at all")
        found = self.errors(
            tmp_path, {"client_auth": "client_assertion", "assertion_file": "token"}
        )
        assert found == {
            "apps.fed.assertion_file": f"{tmp_path / 'token'} does not hold a JWT "
            "(three dot-separated parts)"
        }
        found = self.errors(
            tmp_path,
            {"client_auth": "client_assertion", "assertion_file": "t", "assertion_type": "x"},
        )
        assert "apps.fed.assertion_type" in found
        (tmp_path / "t").write_text(unsigned({"exp": NOW}))
        found = self.errors(
            tmp_path,
            {
                "client_auth": "client_assertion",
                "assertion_file": "t",
                "assertion_type": "token-exchange",
                "grant_type": "authorization_code",
                "authorize_url": "https://idp.test/authorize",
                "redirect_uri": "http://127.0.0.1:8411/callback",
            },
        )
        assert found == {
            "apps.fed.assertion_type": "token-exchange needs grant_type client_credentials"
        }

    def test_keys_of_another_method_are_mistakes(self, tmp_path: Path) -> None:
        """assertion_* and tls_client_* keys with a secret method would be ignored: refused."""
        (tmp_path / "secret").write_text("s3cret-value-0123456789-abcdefghij")
        found = self.errors(
            tmp_path,
            {"client_secret_file": "secret", "assertion_type": "jwt-spiffe"},
        )
        assert found == {
            "apps.fed.assertion_type": "applies only when client_auth is client_assertion"
        }

    def test_tls_client_auth_rules(self, tmp_path: Path) -> None:
        """Both files are required, and they must be a certificate and its own key."""
        ca = TestCA()
        cert, key = ca.write(tmp_path, "tls", "broker-1")
        _, other_key = ca.write(tmp_path, "other", "broker-2")
        good = {
            "client_auth": "tls_client_auth",
            "tls_client_cert_file": str(cert),
            "tls_client_key_file": str(key),
        }
        assert load_config(self.config(tmp_path, good)).apps["fed"].tls_client_key_file == key
        found = self.errors(tmp_path, {"client_auth": "tls_client_auth"})
        assert found == {
            "apps.fed.tls_client_cert_file": "required for client_auth tls_client_auth",
            "apps.fed.tls_client_key_file": "required for client_auth tls_client_auth",
        }
        found = self.errors(tmp_path, {**good, "tls_client_key_file": str(other_key)})
        assert list(found) == ["apps.fed.tls_client_cert_file"]
        assert (
            "do not load as a PEM certificate and its unencrypted key"
            in found["apps.fed.tls_client_cert_file"]
        )
