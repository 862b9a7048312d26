"""The refresh policy is a pure function of time: table tests."""

from __future__ import annotations

import pytest

from broker import policy
from broker.model import RefreshPolicy, TokenSet

DEFAULT = RefreshPolicy()


def token(issued_at: float, lifetime: float) -> TokenSet:
    return TokenSet("at", "Bearer", issued_at=issued_at, expires_at=issued_at + lifetime)


# The lifetimes the policy must fit: a minute to a month.
LIFETIMES = [60, 120, 300, 400, 600, 1200, 3600, 4 * 3600, 86400, 7 * 86400, 30 * 86400]
# The old defaults (min_remaining 5 m), which pushed short lifetimes onto the quarter floor.
OLD_DEFAULT = RefreshPolicy(min_remaining=300.0)


class TestRefreshDue:
    @pytest.mark.parametrize(
        ("lifetime", "jitter", "expected_offset"),
        [
            (3600, 0.0, 2700),  # 0.75 of an hour
            (3600, 1.0, 2700 + 180),  # +5% of the lifetime
            (3600, -1.0, 2700 - 180),  # -5% of the lifetime
            (60, 0.0, 45),  # a minute: 0.75 too (no fixed min_remaining by default)
            (4, 0.0, 3),  # a 4 s token as well
        ],
    )
    def test_due_time_follows_the_contract(
        self, lifetime: float, jitter: float, expected_offset: float
    ) -> None:
        """Due at at_fraction of the lifetime, moved by the jitter sample times jitter."""
        t = token(1000.0, lifetime)
        assert policy.refresh_due(t, DEFAULT, jitter) == pytest.approx(1000.0 + expected_offset)

    def test_min_remaining_moves_due_earlier(self) -> None:
        """When min_remaining before expiry is earlier than at_fraction, it wins."""
        p = RefreshPolicy(min_remaining=300.0, jitter=0.0)
        assert policy.refresh_due(token(0.0, 600.0), p) == pytest.approx(300.0)

    @pytest.mark.parametrize("lifetime", LIFETIMES)
    def test_default_due_fraction_is_three_quarters_at_every_lifetime(
        self, lifetime: float
    ) -> None:
        """From a minute to a month, the defaults refresh at 0.75 +- jitter of the lifetime."""
        t = token(0.0, lifetime)
        for sample in (-1.0, -0.5, 0.0, 0.5, 1.0):
            fraction = policy.refresh_due(t, DEFAULT, sample) / lifetime
            assert 0.75 - DEFAULT.jitter - 1e-9 <= fraction <= 0.75 + DEFAULT.jitter + 1e-9
        assert policy.refresh_due(t, DEFAULT, 0.0) / lifetime == pytest.approx(0.75)
        # 1 / 0.75: about 1.33 token requests per lifetime.
        assert lifetime / policy.refresh_due(t, DEFAULT, 0.0) == pytest.approx(4 / 3)

    @pytest.mark.parametrize("lifetime", LIFETIMES)
    @pytest.mark.parametrize(
        "p",
        [
            DEFAULT,
            OLD_DEFAULT,  # min_remaining puts short lifetimes on the quarter floor
            RefreshPolicy(at_fraction=0.99, jitter=0.2),  # nominal beyond the serving deadline
            RefreshPolicy(at_fraction=0.1, jitter=0.2),  # nominal before the quarter
        ],
        ids=["default", "min_remaining-5m", "late", "early"],
    )
    def test_jitter_is_present_at_every_lifetime(self, lifetime: float, p: RefreshPolicy) -> None:
        """The jitter spreads due times by 2 * jitter * lifetime even at an edge of the window."""
        t = token(0.0, lifetime)
        spread = policy.refresh_due(t, p, 1.0) - policy.refresh_due(t, p, -1.0)
        assert spread == pytest.approx(2 * p.jitter * lifetime)

    @pytest.mark.parametrize("lifetime", LIFETIMES)
    @pytest.mark.parametrize("sample", [-1.0, -0.3, 0.0, 0.7, 1.0])
    def test_due_stays_inside_the_window(self, lifetime: float, sample: float) -> None:
        """Whatever the policy, due is never before a quarter nor after the serving deadline."""
        for p in (DEFAULT, OLD_DEFAULT, RefreshPolicy(at_fraction=0.99, jitter=0.49)):
            t = token(50.0, lifetime)
            earliest, latest = policy.refresh_window(t, p)
            assert earliest == pytest.approx(50.0 + lifetime / 4)
            assert latest == pytest.approx(policy.serve_deadline(t, p))
            assert earliest <= policy.refresh_due(t, p, sample) <= latest

    def test_a_window_narrower_than_the_jitter_is_used_whole(self) -> None:
        """A jitter wider than the window spreads due times over the whole window."""
        p = RefreshPolicy(jitter=0.49)
        t = token(0.0, 100.0)
        assert policy.refresh_due(t, p, -1.0) == pytest.approx(25.0)
        assert policy.refresh_due(t, p, 1.0) == pytest.approx(90.0)

    def test_jitter_never_pushes_due_past_the_serving_deadline(self) -> None:
        """Even with maximal jitter, a refresh is due before the token stops being served."""
        p = RefreshPolicy(at_fraction=0.95, min_remaining=1, jitter=0.4, safety_margin=30)
        t = token(0.0, 100.0)
        assert policy.refresh_due(t, p, 1.0) <= policy.serve_deadline(t, p)

    def test_jitter_never_pulls_due_before_a_quarter(self) -> None:
        """Negative jitter does not cause a refresh before a quarter of the lifetime."""
        p = RefreshPolicy(at_fraction=0.26, jitter=0.4)
        assert policy.refresh_due(token(0.0, 100.0), p, -1.0) == pytest.approx(25.0)


class TestFleetRefreshDue:
    def test_every_replica_derives_the_same_jitter_from_the_token(self) -> None:
        """The fleet's jitter sample depends on the token only, and lies in [-1, 1]."""
        a = TokenSet("token-a", "Bearer", issued_at=0.0, expires_at=3600.0)
        b = TokenSet("token-b", "Bearer", issued_at=0.0, expires_at=3600.0)
        assert policy.fleet_jitter_sample(a) == policy.fleet_jitter_sample(a)
        assert policy.fleet_jitter_sample(a) != policy.fleet_jitter_sample(b)
        samples = [
            policy.fleet_jitter_sample(TokenSet(f"t{i}", "Bearer", 0.0, 1.0)) for i in range(200)
        ]
        assert all(-1.0 <= s <= 1.0 for s in samples)
        assert min(samples) < -0.8
        assert max(samples) > 0.8  # spread over the whole range, not bunched

    @pytest.mark.parametrize("lifetime", LIFETIMES)
    def test_replicas_differ_only_by_a_small_stagger(self, lifetime: float) -> None:
        """Two replicas' due times for one token differ by at most 1% of the lifetime (<= 2 s)."""
        t = TokenSet(f"token-{lifetime}", "Bearer", issued_at=0.0, expires_at=float(lifetime))
        first = policy.fleet_refresh_due(t, DEFAULT, 0.0)
        last = policy.fleet_refresh_due(t, DEFAULT, 1.0)
        assert first == policy.refresh_due(t, DEFAULT, policy.fleet_jitter_sample(t))
        assert 0 < last - first <= min(policy.STAGGER_MAX, 0.01 * lifetime) + 1e-9
        fraction = first / lifetime
        assert 0.70 - 1e-9 <= fraction <= 0.80 + 1e-9

    def test_stagger_never_passes_the_serving_deadline(self) -> None:
        """A due time at the end of the window stays there, whatever the stagger."""
        p = RefreshPolicy(at_fraction=0.99, jitter=0.0)
        t = token(0.0, 100.0)
        assert policy.fleet_refresh_due(t, p, 1.0) == pytest.approx(policy.serve_deadline(t, p))


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
