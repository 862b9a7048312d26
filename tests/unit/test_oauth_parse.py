"""Token endpoint responses: parsed into a token set, or classified as transient or permanent."""

from __future__ import annotations

import json

import jwt
import pytest

from broker.errors import PermanentTokenError, TransientTokenError
from broker.logs import SECRETS
from broker.oauth.parse import parse_retry_after, parse_token_response

SENT = 1_700_000_000.0


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def a_jwt(exp: float) -> str:
    return jwt.encode({"sub": "x", "exp": int(exp)}, "k" * 32, algorithm="HS256")


def parse(status: int, payload: bytes, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return parse_token_response(status, headers or {}, payload, sent_at=SENT, default_lifetime=3600)


class TestTokens:
    def test_rfc_response(self) -> None:
        """expires_at is anchored at the time the request was sent."""
        token = parse(
            200, body(access_token="abc", token_type="bearer", expires_in=600, scope="a b")
        )
        assert (token.access_token, token.token_type, token.scope) == ("abc", "bearer", "a b")
        assert token.expires_at == SENT + 600

    def test_twilio_nulls_are_tolerated(self) -> None:
        """Twilio's `"id_token": null, "refresh_token": null` are fine."""
        token = parse(
            200, body(access_token="abc", expires_in=3600, id_token=None, refresh_token=None)
        )
        assert token.refresh_token is None

    def test_jwt_exp_earlier_than_expires_in_wins(self) -> None:
        """The earlier of sent_at + expires_in and the JWT's exp."""
        token = parse(200, body(access_token=a_jwt(SENT + 100), expires_in=3600))
        assert token.expires_at == SENT + 100

    @pytest.mark.parametrize("expires_in", ["600", 600.0])
    def test_numeric_expires_in(self, expires_in: object) -> None:
        """expires_in as a number or a numeric string."""
        assert parse(200, body(access_token="abc", expires_in=expires_in)).expires_at == SENT + 600

    @pytest.mark.parametrize("expires_in", ["soon", -5, 0, 1e300, None, True])
    def test_unusable_expires_in_falls_back(self, expires_in: object) -> None:
        """Without a usable expires_in or JWT exp, the default lifetime applies."""
        assert parse(200, body(access_token="abc", expires_in=expires_in)).expires_at == SENT + 3600

    def test_jwt_with_text_exp_is_ignored(self) -> None:
        """A JWT whose exp is not a number does not break parsing."""
        token = jwt.encode({"exp": "tomorrow"}, "k" * 32, algorithm="HS256")
        assert parse(200, body(access_token=token)).expires_at == SENT + 3600


class TestTransient:
    @pytest.mark.parametrize(
        "payload",
        [
            b"<html>hi</html>",
            b'{"access_token": ',
            b"[1]",
            body(token_type="x"),
            body(error="x", access_token="abc"),
            body(access_token=a_jwt(SENT - 10)),
        ],
        ids=["html", "truncated", "array", "no-access-token", "error-field", "already-expired"],
    )
    def test_a_200_that_is_not_a_token(self, payload: bytes) -> None:
        """A 200 whose body is not a usable token is transient."""
        with pytest.raises(TransientTokenError):
            parse(200, payload)

    @pytest.mark.parametrize("status", [500, 502, 503, 429])
    def test_server_errors_and_429(self, status: int) -> None:
        """5xx and 429 are transient, with Retry-After in seconds."""
        with pytest.raises(TransientTokenError) as caught:
            parse(status, b"", {"Retry-After": "7"})
        assert caught.value.retry_after == 7

    def test_retry_after_as_http_date(self) -> None:
        """Retry-After as an HTTP date, relative to now."""
        assert parse_retry_after("Tue, 14 Nov 2023 22:14:20 GMT", 1_700_000_000.0) == 60


class TestPermanent:
    @pytest.mark.parametrize(
        "error", ["invalid_client", "invalid_grant", "unauthorized_client", "invalid_scope"]
    )
    def test_rfc_errors(self, error: str) -> None:
        """RFC 6749 §5.2 errors are permanent and keep their code."""
        with pytest.raises(PermanentTokenError) as caught:
            parse(400, body(error=error, error_description="nope"))
        assert caught.value.error == error

    def test_twilio_error_shape(self) -> None:
        """Twilio's {"code": 322402, ...} is invalid credentials."""
        with pytest.raises(PermanentTokenError) as caught:
            parse(401, body(code=322402, message="Invalid credentials", more_info="u", status=401))
        assert caught.value.error == "322402"
        assert caught.value.is_invalid_client

    @pytest.mark.parametrize("status", [400, 401, 403])
    def test_4xx_without_a_known_body(self, status: int) -> None:
        """400/401/403 with a body we do not understand are permanent."""
        with pytest.raises(PermanentTokenError):
            parse(status, b"<html>denied</html>")

    def test_descriptions_are_scrubbed(self) -> None:
        """A registered secret echoed in an error description does not reach the message."""
        secret = "echoed-secret-value-1234567890"
        SECRETS.add(secret)
        with pytest.raises(PermanentTokenError) as caught:
            parse(401, body(error="invalid_client", error_description=f"bad secret {secret}"))
        assert secret not in str(caught.value)
