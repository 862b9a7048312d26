"""Issue 20, M4: which 5xx/429 answers leave a rotating grant's outcome unknown."""

from __future__ import annotations

import pytest

from broker.errors import TransientTokenError
from broker.oauth.parse import classify_error, server_may_have_acted

SENT = 1_700_000_000.0
WITH_RETRY_AFTER = {"Retry-After": "5"}
NO_HEADERS: dict[str, str] = {}


class TestServerMayHaveActed:
    """The classification table: status, Retry-After, rotating / not rotating."""

    @pytest.mark.parametrize(
        ("status", "headers", "rotating", "unknown"),
        [
            # A rotating grant: any 5xx may follow a rotation, except a 503 with Retry-After.
            (500, NO_HEADERS, True, True),
            (500, WITH_RETRY_AFTER, True, True),
            (501, NO_HEADERS, True, True),
            (502, NO_HEADERS, True, True),
            (503, NO_HEADERS, True, True),
            (503, WITH_RETRY_AFTER, True, False),
            (504, WITH_RETRY_AFTER, True, True),
            (599, NO_HEADERS, True, True),
            (429, NO_HEADERS, True, False),
            (429, WITH_RETRY_AFTER, True, False),
            # Client credentials, or a transactional server: only a gateway's 502/504.
            (500, NO_HEADERS, False, False),
            (503, NO_HEADERS, False, False),
            (503, WITH_RETRY_AFTER, False, False),
            (502, NO_HEADERS, False, True),
            (504, NO_HEADERS, False, True),
            (429, NO_HEADERS, False, False),
        ],
    )
    def test_table(
        self, status: int, headers: dict[str, str], rotating: bool, unknown: bool
    ) -> None:
        """Each row: whether the answer leaves open that the server acted."""
        assert server_may_have_acted(status, headers, rotating=rotating) is unknown
        error = classify_error(status, headers, b"", sent_at=SENT, rotating=rotating)
        assert isinstance(error, TransientTokenError)
        assert error.outcome_unknown is unknown

    def test_retry_after_still_read_when_unknown(self) -> None:
        """An unknown 500 keeps its Retry-After for the backoff."""
        error = classify_error(500, {"Retry-After": "9"}, b"", sent_at=SENT, rotating=True)
        assert isinstance(error, TransientTokenError)
        assert error.retry_after == 9
        assert error.outcome_unknown

    def test_default_is_not_rotating(self) -> None:
        """Without `rotating`, a 500 is the old 'did not act' (client credentials)."""
        error = classify_error(500, {}, b"", sent_at=SENT)
        assert isinstance(error, TransientTokenError)
        assert not error.outcome_unknown
