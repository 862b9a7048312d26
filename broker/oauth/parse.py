"""Token endpoint responses: parse a token, or classify the failure (pure functions).

Transient: 5xx, 429, and a 200 whose body is not a token. Permanent: RFC 6749 §5.2 errors,
Twilio's 32xxxx codes, and any other 4xx.

For a rotating grant (a refresh token sent to a server not declared transactional) a 5xx is
an unknown outcome: a server that rotated and then failed while rendering answers 500 (issue
20, M4). Only a 429, or a 503 with Retry-After, says the server did not act.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from broker.errors import PermanentTokenError, TokenEndpointError, TransientTokenError
from broker.logs import SECRETS
from broker.model import TokenSet

# expires_in beyond ten years is not a lifetime, it is a bug on the other side.
MAX_EXPIRES_IN = 10 * 365 * 86400.0
_DESCRIPTION_LIMIT = 200
_GATEWAY_STATUSES = frozenset({502, 504})


def parse_token_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    sent_at: float,
    default_lifetime: float,
    rotating: bool = False,
) -> TokenSet:
    """The token set in a 2xx response; otherwise raise the classified error.

    `rotating`: the request spent a refresh token at a server not declared transactional.
    """
    if not 200 <= status < 300:
        raise classify_error(status, headers, body, sent_at=sent_at, rotating=rotating)
    # A 2xx that is not a token may still mean the server acted (rotated a refresh token).
    document = _json_object(body)
    if document is None:
        raise TransientTokenError(
            f"http {status}: body is not a JSON object", status=status, outcome_unknown=True
        )
    if document.get("error") is not None:
        error = _short(document.get("error"))
        raise TransientTokenError(
            f"http {status} with an error field: {error}",
            status=status,
            error=error,
            outcome_unknown=True,
        )
    access_token = document.get("access_token")
    if not isinstance(access_token, str) or not access_token.strip():
        raise TransientTokenError(
            f"http {status}: no access_token in the response", status=status, outcome_unknown=True
        )
    token_type = document.get("token_type")
    scope = document.get("scope")
    refresh_token = document.get("refresh_token")
    expires_at = _expiry(document.get("expires_in"), access_token, sent_at, default_lifetime)
    if expires_at <= sent_at:
        raise TransientTokenError(
            f"http {status}: the token is already expired", status=status, outcome_unknown=True
        )
    return TokenSet(
        access_token=access_token,
        token_type=token_type if isinstance(token_type, str) and token_type else "Bearer",
        issued_at=sent_at,
        expires_at=expires_at,
        scope=scope if isinstance(scope, str) else None,
        refresh_token=refresh_token if isinstance(refresh_token, str) and refresh_token else None,
    )


def classify_error(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    sent_at: float,
    rotating: bool = False,
) -> TokenEndpointError:
    """The error for a non-2xx response (returned, not raised).

    `rotating`: the request spent a refresh token at a server not declared transactional.
    """
    retry_after = parse_retry_after(headers.get("Retry-After"), sent_at)
    document = _json_object(body)
    error, description = _error_fields(document)
    detail = f": {error}" if error else ""
    if description:
        detail += f" ({description})"
    if status >= 500 or status == 429:
        return TransientTokenError(
            f"http {status}{detail}",
            status=status,
            error=error,
            description=description,
            retry_after=retry_after,
            outcome_unknown=server_may_have_acted(status, headers, rotating=rotating),
        )
    return PermanentTokenError(
        f"http {status}{detail}", status=status, error=error, description=description
    )


def server_may_have_acted(status: int, headers: Mapping[str, str], *, rotating: bool) -> bool:
    """True when a 5xx/429 answer leaves open whether the server acted on the request.

    A gateway's 502/504 always does: the server behind it may have acted before the reply was
    lost. For a rotating grant every 5xx does (a server may rotate, then fail while rendering
    the answer), except a 503 with Retry-After, which is a refusal to start. A 429 never does.
    """
    if status in _GATEWAY_STATUSES:
        return True
    if not rotating or status < 500:
        return False
    return not (status == 503 and headers.get("Retry-After") is not None)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def _error_fields(document: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(error code, description) from an RFC 6749 §5.2 or a Twilio error body."""
    if document is None:
        return None, None
    if isinstance(document.get("error"), str):
        return _short(document["error"]), _short(document.get("error_description"))
    code = document.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return str(code), _short(document.get("message"))
    return None, None


def _short(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return SECRETS.scrub(value[:_DESCRIPTION_LIMIT])


def _expiry(
    expires_in: object, access_token: str, sent_at: float, default_lifetime: float
) -> float:
    """expires_at: sent_at + expires_in, or the JWT's exp if earlier, else the default lifetime."""
    candidates = []
    lifetime = _number(expires_in)
    if lifetime is not None and 0 < lifetime <= MAX_EXPIRES_IN:
        candidates.append(sent_at + lifetime)
    exp = jwt_exp(access_token)
    if exp is not None:
        candidates.append(exp)
    if not candidates:
        return sent_at + default_lifetime
    return min(candidates)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def jwt_exp(token: str) -> float | None:
    """The `exp` claim of a JWT access token (signature not checked: it is not ours), or None."""
    claims = _unverified_claims(token)
    if claims is None:
        return None
    exp = _number(claims.get("exp"))
    return exp if exp is not None and exp > 0 else None


def _unverified_claims(token: str) -> dict[str, Any] | None:
    """The payload of a compact JWS whose header and payload are JSON objects, else None.

    Decoded by hand rather than with pyjwt: the broker only reads `exp` from a token it does not
    verify, and importing pyjwt loads cryptography's OpenSSL bindings (about 9 MiB resident) in
    every broker, whatever its apps use.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header, payload = (json.loads(_b64url(part)) for part in parts[:2])
        _b64url(parts[2])
    except (ValueError, binascii.Error):
        return None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return None
    return payload


def _b64url(segment: str) -> bytes:
    """base64url without padding (RFC 7515 §2); raises ValueError on anything else."""
    if not segment.isascii() or "=" in segment:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
