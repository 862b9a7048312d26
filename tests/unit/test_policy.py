"""The refresh policy is a pure function of time: table tests."""

from __future__ import annotations

import pytest

from broker import policy
from broker.model import RefreshPolicy, TokenSet

DEFAULT = RefreshPolicy()


def token(issued_at: float, lifetime: float) -> TokenSet:
    return TokenSet("at", "Bearer", issued_at=issued_at, expires_at=issued_at + lifetime)


class TestRefreshDue:
    @pytest.mark.parametrize(
        ("lifetime", "jitter", "expected_offset"),
        [
            (3600, 0.0, 2700),  # 0.75 of an hour (before expires - 5m = 3300)
            (600, 0.0, 300),  # expires - min_remaining (300) is earlier than 0.75 (450)
            (60, 0.0, 15),  # min_remaining would be before issue: floored at a quarter
            (3600, 1.0, 2700 + 180),  # +5% of the lifetime
            (3600, -1.0, 2700 - 180),  # -5% of the lifetime
            (4, 0.0, 1),  # a 4 s token: never before a quarter (1 s)
        ],
    )
    def test_due_time_follows_the_contract(
        self, lifetime: float, jitter: float, expected_offset: float
    ) -> None:
        """Due at the earlier of at_fraction and min_remaining, floored at a quarter, plus jitter."""
        t = token(1000.0, lifetime)
        assert policy.refresh_due(t, DEFAULT, jitter) == pytest.approx(1000.0 + expected_offset)

    def test_jitter_never_pushes_due_past_the_serving_deadline(self) -> None:
        """Even with maximal jitter, a refresh is due before the token stops being served."""
        p = RefreshPolicy(at_fraction=0.95, min_remaining=1, jitter=0.4, safety_margin=30)
        t = token(0.0, 100.0)
        assert policy.refresh_due(t, p, 1.0) <= policy.serve_deadline(t, p)

    def test_jitter_never_pulls_due_before_a_quarter(self) -> None:
        """Negative jitter does not cause a refresh before a quarter of the lifetime."""
        p = RefreshPolicy(at_fraction=0.26, jitter=0.4)
        assert policy.refresh_due(token(0.0, 100.0), p, -1.0) == pytest.approx(25.0)


class TestServable:
    @pytest.mark.parametrize(
        ("lifetime", "age", "min_ttl", "servable"),
        [
            (3600, 0, 0, True),
            (3600, 3569, 0, True),  # 31 s left, margin 30 s
            (3600, 3570, 0, False),  # exactly the margin left: not served
            (3600, 3700, 0, False),  # expired
            (10, 8.9, 0, True),  # margin capped at lifetime/10 = 1 s
            (10, 9.0, 0, False),
            (3600, 0, 3600, True),  # min_ttl equal to what is left
            (3600, 1, 3600, False),  # min_ttl more than what is left
        ],
    )
    def test_servable_only_above_margin_and_min_ttl(
        self, lifetime: float, age: float, min_ttl: float, servable: bool
    ) -> None:
        """A token is served only with more than the (capped) margin and at least min_ttl left."""
        assert policy.is_servable(lifetime - age, lifetime, DEFAULT, min_ttl) is servable


class TestBackoff:
    @pytest.mark.parametrize(
        ("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (30, 30.0)]
    )
    def test_exponential_and_capped(self, attempt: int, expected: float) -> None:
        """Backoff doubles per attempt and is capped at half a minute."""
        assert policy.backoff(attempt, 1.0) == expected

    def test_jitter_halves_at_most(self) -> None:
        """Jitter scales the delay between half and all of its nominal value."""
        assert policy.backoff(3, 0.0) == 2.0


class TestRetryDelay:
    def test_retry_after_is_honoured(self) -> None:
        """A Retry-After longer than the backoff is waited out."""
        t = token(0.0, 3600.0)
        delay = policy.retry_delay(
            attempt=1, permanent=False, retry_after=120, token=t, now=100, policy=DEFAULT
        )
        assert delay == 120

    def test_retry_after_never_outlasts_the_current_token(self) -> None:
        """The broker does not wait so long that its token would fall inside the safety margin."""
        t = token(0.0, 3600.0)
        delay = policy.retry_delay(
            attempt=1, permanent=False, retry_after=3000, token=t, now=3000, policy=DEFAULT
        )
        assert delay == pytest.approx(3600 - 30 - 3000)

    def test_permanent_errors_wait_long(self) -> None:
        """Without a token to protect, a permanent error waits minutes, not seconds."""
        delay = policy.retry_delay(
            attempt=1, permanent=True, retry_after=None, token=None, now=0, policy=DEFAULT
        )
        assert delay == policy.PERMANENT_RETRY

    def test_never_zero(self) -> None:
        """Even past the deadline, attempts are spaced by a minimum delay."""
        t = token(0.0, 10.0)
        delay = policy.retry_delay(
            attempt=1, permanent=False, retry_after=None, token=t, now=9.5, policy=DEFAULT
        )
        assert delay == policy.MIN_RETRY
