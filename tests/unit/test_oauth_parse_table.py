"""Token endpoint responses as a table: each parsed into a token set or classified precisely."""

from __future__ import annotations

import json
from collections.abc import Iterator
from email.utils import formatdate

import jwt
import pytest

from broker.errors import PermanentTokenError, TransientTokenError
from broker.logs import REDACTED, SECRETS
from broker.model import TokenSet
from broker.oauth.parse import MAX_EXPIRES_IN, jwt_exp, parse_retry_after, parse_token_response

SENT = 1_700_000_000.0
DEFAULT_LIFETIME = 1800.0
LEAKED_SECRET = "leaked-client-secret-7f3a9c2e"


def json_body(document: object) -> bytes:
    """`document` as a JSON response body."""
    return json.dumps(document).encode()


def signed_jwt(**claims: object) -> str:
    """An HS256 JWT with `claims` (the broker never checks the signature)."""
    return jwt.encode({"sub": "svc", **claims}, "k" * 32, algorithm="HS256")


def parse(status: int, body: bytes, headers: dict[str, str] | None = None) -> TokenSet:
    """parse_token_response with the table's fixed send time and default lifetime."""
    return parse_token_response(
        status, headers or {}, body, sent_at=SENT, default_lifetime=DEFAULT_LIFETIME
    )


JWT_EXP_IN_600 = signed_jwt(exp=int(SENT) + 600)
JWT_BAD_EXP = signed_jwt(exp="tomorrow")


@pytest.fixture
def registered_secret() -> Iterator[str]:
    """A value registered with SECRETS for the test, forgotten afterwards."""
    SECRETS.add(LEAKED_SECRET)
    yield LEAKED_SECRET
    SECRETS.discard([LEAKED_SECRET])


class TestParseTokenResponse:
    """parse_token_response on 2xx bodies that hold a token."""

    def test_valid_rfc_response(self) -> None:
        """Every RFC 6749 §5.1 field is carried over, expiry anchored at the send time."""
        token = parse(
            200,
            json_body(
                {
                    "access_token": "at-123",
                    "token_type": "bearer",
                    "expires_in": 3600,
                    "scope": "read write",
                    "refresh_token": "rt-456",
                }
            ),
        )
        assert token == TokenSet(
            access_token="at-123",
            token_type="bearer",
            issued_at=SENT,
            expires_at=SENT + 3600,
            scope="read write",
            refresh_token="rt-456",
        )

    def test_twilio_null_fields(self) -> None:
        """Twilio's `"id_token": null, "refresh_token": null` parse, with no refresh token."""
        token = parse(
            200,
            json_body(
                {
                    "access_token": "twilio-at",
                    "token_type": "Bearer",
                    "expires_in": 86400,
                    "id_token": None,
                    "refresh_token": None,
                }
            ),
        )
        assert token.refresh_token is None
        assert token.expires_at == SENT + 86400

    def test_missing_token_type_defaults_to_bearer(self) -> None:
        """A response without token_type is served as a Bearer token."""
        token = parse(200, json_body({"access_token": "at", "expires_in": 60}))
        assert token.token_type == "Bearer"

    @pytest.mark.parametrize(
        ("access_token", "expires_in", "expected_expiry"),
        [
            pytest.param("opaque", "900", SENT + 900, id="numeric-string"),
            pytest.param("opaque", "soon", SENT + DEFAULT_LIFETIME, id="non-numeric-string"),
            pytest.param("opaque", -60, SENT + DEFAULT_LIFETIME, id="negative"),
            pytest.param("opaque", 0, SENT + DEFAULT_LIFETIME, id="zero"),
            pytest.param(
                "opaque", MAX_EXPIRES_IN + 1, SENT + DEFAULT_LIFETIME, id="over-ten-years"
            ),
            pytest.param("opaque", None, SENT + DEFAULT_LIFETIME, id="absent"),
            pytest.param("opaque", True, SENT + DEFAULT_LIFETIME, id="boolean"),
            pytest.param(JWT_EXP_IN_600, "soon", SENT + 600, id="non-numeric-falls-back-to-jwt"),
            pytest.param(JWT_EXP_IN_600, -5, SENT + 600, id="negative-falls-back-to-jwt"),
            pytest.param(JWT_EXP_IN_600, 0, SENT + 600, id="zero-falls-back-to-jwt"),
            pytest.param(JWT_EXP_IN_600, 20 * 365 * 86400, SENT + 600, id="huge-falls-back-to-jwt"),
            pytest.param(JWT_EXP_IN_600, 3600, SENT + 600, id="jwt-exp-earlier-wins"),
            pytest.param(JWT_EXP_IN_600, 300, SENT + 300, id="expires-in-earlier-wins"),
            pytest.param(JWT_BAD_EXP, 900, SENT + 900, id="jwt-non-numeric-exp-ignored"),
            pytest.param(JWT_BAD_EXP, None, SENT + DEFAULT_LIFETIME, id="jwt-bad-exp-no-expiry"),
        ],
    )
    def test_expiry(self, access_token: str, expires_in: object, expected_expiry: float) -> None:
        """expires_at is the earlier of expires_in and the JWT exp, else the default lifetime."""
        document: dict[str, object] = {"access_token": access_token, "token_type": "Bearer"}
        if expires_in is not None:
            document["expires_in"] = expires_in
        assert parse(200, json_body(document)).expires_at == expected_expiry

    def test_already_expired_jwt_is_transient(self) -> None:
        """A JWT whose exp is before the send time is not a servable token."""
        stale = signed_jwt(exp=int(SENT) - 10)
        with pytest.raises(TransientTokenError, match="already expired"):
            parse(200, json_body({"access_token": stale, "expires_in": 3600}))


class TestNotAToken:
    """A 2xx body that is not a token is a transient failure."""

    @pytest.mark.parametrize(
        ("body", "fragment"),
        [
            pytest.param(json_body({"token_type": "Bearer"}), "no access_token", id="missing"),
            pytest.param(json_body({"access_token": "  "}), "no access_token", id="blank"),
            pytest.param(json_body({"access_token": 42}), "no access_token", id="not-a-string"),
            pytest.param(b"<html><body>Login</body></html>", "not a JSON object", id="html"),
            pytest.param(b'{"access_token": "abc", "expi', "not a JSON object", id="truncated"),
            pytest.param(json_body([{"access_token": "a"}]), "not a JSON object", id="array"),
            pytest.param(b"", "not a JSON object", id="empty"),
            pytest.param(b"\xff\xfe", "not a JSON object", id="not-utf8"),
        ],
    )
    def test_transient(self, body: bytes, fragment: str) -> None:
        """The body is refused as a TransientTokenError carrying the status."""
        with pytest.raises(TransientTokenError, match=fragment) as caught:
            parse(200, body)
        assert caught.value.status == 200

    def test_200_with_error_field(self) -> None:
        """A 200 carrying an `error` field is transient and keeps the error code."""
        with pytest.raises(TransientTokenError) as caught:
            parse(200, json_body({"access_token": "at", "error": "temporarily_unavailable"}))
        assert caught.value.error == "temporarily_unavailable"


class TestClassifyTransient:
    """5xx and 429 are transient, with Retry-After honoured."""

    @pytest.mark.parametrize("status", [500, 502, 503, 429])
    def test_retry_after_seconds(self, status: int) -> None:
        """`Retry-After: 7` becomes retry_after 7.0 on a TransientTokenError."""
        with pytest.raises(TransientTokenError) as caught:
            parse(status, b"oops", {"Retry-After": "7"})
        assert (caught.value.status, caught.value.retry_after) == (status, 7.0)

    @pytest.mark.parametrize("status", [503, 429])
    def test_retry_after_http_date(self, status: int) -> None:
        """An HTTP-date Retry-After becomes the seconds from the send time to that date."""
        date = formatdate(SENT + 120, usegmt=True)
        with pytest.raises(TransientTokenError) as caught:
            parse(status, b"", {"Retry-After": date})
        assert caught.value.retry_after == pytest.approx(120.0)

    def test_no_retry_after(self) -> None:
        """Without the header, retry_after is None (the caller's backoff decides)."""
        with pytest.raises(TransientTokenError) as caught:
            parse(502, b"<html>Bad Gateway</html>")
        assert caught.value.retry_after is None

    def test_5xx_with_rfc_body_stays_transient(self) -> None:
        """A 5xx is transient even when its body names an RFC 6749 error."""
        with pytest.raises(TransientTokenError) as caught:
            parse(500, json_body({"error": "invalid_client"}))
        assert caught.value.error == "invalid_client"


class TestParseRetryAfter:
    """parse_retry_after on both header forms and on junk."""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            pytest.param("7", 7.0, id="seconds"),
            pytest.param(" 7 ", 7.0, id="padded"),
            pytest.param(formatdate(SENT + 30, usegmt=True), 30.0, id="http-date"),
            pytest.param(formatdate(SENT - 30, usegmt=True), 0.0, id="date-in-the-past"),
            pytest.param("-3", 0.0, id="negative"),
            pytest.param("soon", None, id="junk"),
            pytest.param("inf", None, id="infinite"),
            pytest.param("nan", None, id="nan"),
            pytest.param("", None, id="empty"),
            pytest.param(None, None, id="absent"),
        ],
    )
    def test_values(self, value: str | None, expected: float | None) -> None:
        """Seconds to wait, never negative; None when the header says nothing usable."""
        assert parse_retry_after(value, SENT) == (
            pytest.approx(expected) if expected is not None else None
        )


class TestClassifyPermanent:
    """RFC 6749 §5.2 errors, Twilio codes and other 4xx are permanent."""

    @pytest.mark.parametrize("status", [400, 401])
    @pytest.mark.parametrize(
        "error", ["invalid_client", "invalid_grant", "unauthorized_client", "invalid_scope"]
    )
    def test_rfc_errors(self, status: int, error: str) -> None:
        """The §5.2 error code is kept in .error, the description in .description."""
        body = json_body({"error": error, "error_description": "nope"})
        with pytest.raises(PermanentTokenError) as caught:
            parse(status, body)
        assert (caught.value.status, caught.value.error, caught.value.description) == (
            status,
            error,
            "nope",
        )
        assert caught.value.is_invalid_client == (error == "invalid_client")
        assert caught.value.is_invalid_grant == (error == "invalid_grant")

    def test_twilio_invalid_credentials(self) -> None:
        """Twilio's code 322402 becomes error "322402" and counts as invalid_client."""
        body = json_body(
            {
                "code": 322402,
                "message": "Invalid credentials",
                "more_info": "https://www.twilio.com/docs/errors/322402",
                "status": 401,
            }
        )
        with pytest.raises(PermanentTokenError) as caught:
            parse(401, body)
        assert caught.value.error == "322402"
        assert caught.value.description == "Invalid credentials"
        assert caught.value.is_invalid_client

    @pytest.mark.parametrize(
        ("status", "body", "invalid_client"),
        [
            pytest.param(401, b"", True, id="401-empty"),
            pytest.param(401, b"<html>Unauthorized</html>", True, id="401-html"),
            pytest.param(403, b"", False, id="403-empty"),
            pytest.param(403, b"<html>Forbidden</html>", False, id="403-html"),
        ],
    )
    def test_4xx_without_error_body(self, status: int, body: bytes, invalid_client: bool) -> None:
        """401/403 with no parsable error are permanent; a bare 401 means invalid client."""
        with pytest.raises(PermanentTokenError) as caught:
            parse(status, body, {"Retry-After": "7"})
        assert caught.value.error is None
        assert caught.value.is_invalid_client is invalid_client

    def test_boolean_code_is_not_a_twilio_code(self) -> None:
        """`"code": true` is not taken as an error code."""
        with pytest.raises(PermanentTokenError) as caught:
            parse(400, json_body({"code": True, "message": "x"}))
        assert caught.value.error is None

    def test_description_is_scrubbed(self, registered_secret: str) -> None:
        """A registered secret echoed in the description is absent from message and fields."""
        body = json_body(
            {"error": "invalid_client", "error_description": f"bad secret {registered_secret}"}
        )
        with pytest.raises(PermanentTokenError) as caught:
            parse(401, body)
        assert registered_secret not in str(caught.value)
        assert caught.value.description == f"bad secret {REDACTED}"

    def test_long_description_is_cut(self) -> None:
        """Descriptions are cut to 200 characters, so a huge body cannot flood the logs."""
        body = json_body({"error": "invalid_scope", "error_description": "x" * 5000})
        with pytest.raises(PermanentTokenError) as caught:
            parse(400, body)
        assert caught.value.description == "x" * 200


class TestJwtExp:
    """jwt_exp reads `exp` from a compact JWS without verifying it, and refuses anything else."""

    @pytest.mark.parametrize(
        ("token", "expected"),
        [
            pytest.param(JWT_EXP_IN_600, SENT + 600, id="hs256-token"),
            pytest.param(
                jwt.encode({"exp": 1_900_000_000.5}, "k" * 64, algorithm="HS512"),
                1_900_000_000.5,
                id="fractional-exp",
            ),
            pytest.param(signed_jwt(), None, id="no-exp"),
            pytest.param(JWT_BAD_EXP, None, id="non-numeric-exp"),
            pytest.param(signed_jwt(exp=-1), None, id="negative-exp"),
            pytest.param("opaque-token-value", None, id="not-a-jwt"),
            pytest.param("a.b", None, id="two-segments"),
            pytest.param("e30.e30.e30.e30", None, id="four-segments"),
            pytest.param("e30.WzFd.", None, id="payload-not-an-object"),
            pytest.param("WzFd.e30.", None, id="header-not-an-object"),
            pytest.param("e30.!!!.", None, id="payload-not-base64url"),
            pytest.param("e30.e30=.", None, id="padded-segment"),
            pytest.param("e30.e30.x", None, id="signature-of-bad-length"),
        ],
    )
    def test_values(self, token: str, expected: float | None) -> None:
        """Each token gives its exp, or None when it is not a JWT with a positive numeric exp."""
        assert jwt_exp(token) == expected
