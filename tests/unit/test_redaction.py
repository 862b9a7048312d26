"""Redaction: registered secrets and JWTs never reach a log line, whatever surrounds them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from broker.logs import REDACTED, SecretRegistry, audit, configure_logging, get_logger

SECRET = "s3cr3t-Value_0123456789abcdef"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzdmMifQ.c2lnbmF0dXJlLXZhbHVl"


@pytest.fixture
def registry() -> SecretRegistry:
    """A registry holding SECRET."""
    secrets = SecretRegistry()
    secrets.add(SECRET)
    return secrets


class TestScrub:
    """SecretRegistry.scrub replaces registered values and JWTs wherever they stand."""

    @pytest.mark.parametrize(
        "template",
        [
            "{}",
            "Bearer {}",
            "client_secret={}&grant_type=client_credentials",
            '{{"access_token": "{}"}}',
            "b'{}'",
            "key:{}",
            "(token {})",
            "[{}]",
            "a\t{}\n",
            "https://example.com/cb?code={}#x",
        ],
    )
    def test_delimited_secret(self, registry: SecretRegistry, template: str) -> None:
        """A registered secret between any of the delimiters is replaced."""
        assert registry.scrub(template.format(SECRET)) == template.format(REDACTED)

    def test_jwt_anywhere(self, registry: SecretRegistry) -> None:
        """A JWT is replaced even when registered nowhere and glued to other text."""
        assert JWT not in registry.scrub(f"token{JWT}")
        assert registry.scrub(f"got {JWT} back") == f"got {REDACTED} back"

    def test_padded_base64_secret(self) -> None:
        """A base64 secret with `=` padding is replaced up to its padding."""
        secrets = SecretRegistry()
        padded = "QUJDREVGR0hJSktMTU5PUA=="
        secrets.add(padded)
        assert secrets.scrub(f"secret {padded} end") == f"secret {REDACTED}== end"

    def test_secret_with_short_pieces_is_a_substring(self) -> None:
        """A secret whose delimiters leave short pieces is matched as a substring."""
        secrets = SecretRegistry()
        odd = "pw: a b c 0123456789"
        secrets.add(odd)
        assert secrets.scrub(f"x{odd}y") == f"x{REDACTED}y"

    def test_ordinary_words_are_kept(self, registry: SecretRegistry) -> None:
        """Text without secrets comes back unchanged."""
        text = "token endpoint unreachable: ClientConnectorError at 2026-11-22T20:59:29Z"
        assert registry.scrub(text) == text

    def test_short_values_are_not_registered(self) -> None:
        """Values under 8 characters are ignored (they would mangle ordinary text)."""
        secrets = SecretRegistry()
        secrets.add("short", None, "")
        assert secrets.scrub("short text") == "short text"

    def test_discard_forgets(self, registry: SecretRegistry) -> None:
        """A discarded secret is no longer replaced."""
        registry.discard([SECRET])
        assert registry.scrub(SECRET) == SECRET

    def test_shared_piece_stays_until_both_are_discarded(self) -> None:
        """Two secrets that share a piece keep it redacted until both are forgotten."""
        secrets = SecretRegistry()
        first, second = "commonpiece0123=aaaaaaaaaa", "commonpiece0123=bbbbbbbbbb"
        secrets.add(first, second)
        secrets.discard([first])
        assert secrets.scrub("commonpiece0123") == REDACTED
        secrets.discard([second])
        assert secrets.scrub("commonpiece0123") == "commonpiece0123"


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """JSON log lines written to a buffer; logging restored to the console afterwards."""
    stream = io.StringIO()
    configure_logging(json=True, level="INFO", stream=stream)
    yield stream
    configure_logging(json=True, level="INFO")


class TestLines:
    """The processor chain redacts once, before rendering, for our lines and other libraries'."""

    def test_secret_in_a_free_text_field(self, log_output: io.StringIO) -> None:
        """A registered secret in an error message is replaced in the written line."""
        from broker.logs import SECRETS

        SECRETS.add(SECRET)
        try:
            get_logger("test").warning("refresh.failed", error=f"rejected {SECRET}")
        finally:
            SECRETS.discard([SECRET])
        line = json.loads(log_output.getvalue().splitlines()[-1])
        assert SECRET not in log_output.getvalue()
        assert line["error"] == f"rejected {REDACTED}"

    def test_secret_named_field(self, log_output: io.StringIO) -> None:
        """A field named like a secret is replaced whatever it holds."""
        get_logger("test").info("x", client_secret="anything at all", token_fingerprint="abc")
        line = json.loads(log_output.getvalue().splitlines()[-1])
        assert line["client_secret"] == REDACTED
        assert line["token_fingerprint"] == "abc"

    def test_audit_fields_are_written_as_given(self, log_output: io.StringIO) -> None:
        """An audit line's names and numbers come out unchanged."""
        audit(get_logger("test"), "token.refreshed", app="app1", expires_at=1.5, lifetime=60.0)
        line = json.loads(log_output.getvalue().splitlines()[-1])
        assert (line["event"], line["app"], line["audit"]) == ("token.refreshed", "app1", True)

    def test_other_librarys_message_is_scrubbed(self, log_output: io.StringIO) -> None:
        """A stdlib record's message (its event) carrying a JWT is replaced."""
        logging.getLogger("somelib").warning("sent Authorization: Bearer %s", JWT)
        assert JWT not in log_output.getvalue()
        line = json.loads(log_output.getvalue().splitlines()[-1])
        assert line["event"] == f"sent Authorization: Bearer {REDACTED}"
