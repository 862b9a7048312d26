"""The refresh schedule is a pure function of the outcome and the moment: table tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from broker import policy
from broker.errors import TransientTokenError
from broker.fleet import (
    Adopted,
    Blocked,
    Busy,
    Deferred,
    Fetched,
    OutcomeUnknown,
    OverBudget,
    ReuseDetected,
)
from broker.model import AppState, TokenSet
from broker.schedule import (
    BLOCKED_RETRY,
    BUSY_POLL,
    LEASE_RETRY,
    MAX_SLEEP,
    Failed,
    Now,
    Schedule,
    Step,
    Why,
    adopted,
    app_state,
    credentials_changed,
    needing_authorization,
    next_schedule,
    purged,
)

SET = TokenSet("at", "Bearer", issued_at=0.0, expires_at=60.0, refresh_token="rt")
# Monotonic 100 s, wall 1000 s, 20 s of serving left; the token is served until wall 1030.
NOW = Now(mono=100.0, wall=1000.0, servable_left=20.0, serve_deadline=1030.0)
IDLE = Schedule(at=150.0)
BACKING_OFF = Schedule(at=130.0, why=Why.BACKOFF, backoff=True, permanent=True)
ASKED = Schedule(at=130.0, why=Why.NEEDS_AUTHORIZATION, needs_authorization="revoked")
Transition = Callable[[Schedule], Schedule]


class TestNextSchedule:
    @pytest.mark.parametrize(
        ("before", "step", "now", "expected"),
        [
            # A new set of ours: the budget refusal is over (the set scheduled the rest).
            (replace(IDLE, over_budget=True), Fetched(SET, True, 0.0), NOW, IDLE),
            # Adopted from the store by the protocol: adopting scheduled it already.
            (IDLE, Adopted(SET), NOW, IDLE),
            # Busy: the holder's notice wakes us; else look again within BUSY_POLL...
            (IDLE, Busy(wait=12.0), NOW, replace(IDLE, at=100.0 + BUSY_POLL, why=Why.BUSY)),
            # ...but never sooner than LEASE_RETRY.
            (IDLE, Busy(wait=0.0), NOW, replace(IDLE, at=100.0 + LEASE_RETRY, why=Why.BUSY)),
            # Busy keeps a backoff (and its permanence) that a failure started.
            (
                BACKING_OFF,
                Busy(wait=0.5),
                NOW,
                replace(BACKING_OFF, at=100.5, why=Why.BUSY),
            ),
            # Deferred: the fleet's not_before, when the token outlives it...
            (
                IDLE,
                Deferred(not_before=1010.0, failures=2, error="e", permanent=False),
                NOW,
                Schedule(at=110.0, why=Why.BACKOFF, backoff=True),
            ),
            # ...capped by the token's serving deadline...
            (
                IDLE,
                Deferred(not_before=1100.0, failures=2, error="e", permanent=True),
                NOW,
                Schedule(at=130.0, why=Why.BACKOFF, backoff=True, permanent=True),
            ),
            # ...not capped without a live token, and never sooner than MIN_RETRY.
            (
                IDLE,
                Deferred(not_before=1100.0, failures=2, error="e", permanent=False),
                replace(NOW, serve_deadline=None),
                Schedule(at=200.0, why=Why.BACKOFF, backoff=True),
            ),
            (
                IDLE,
                Deferred(not_before=990.0, failures=2, error="e", permanent=False),
                NOW,
                Schedule(at=100.0 + policy.MIN_RETRY, why=Why.BACKOFF, backoff=True),
            ),
            # Over budget: the budget's retry_after, a backoff.
            (
                IDLE,
                OverBudget(retry_after=7.0),
                NOW,
                Schedule(at=107.0, why=Why.OVER_BUDGET, backoff=True, over_budget=True),
            ),
            # Reuse detected: the grant is lost; ask a person, look again in MAX_SLEEP.
            (
                IDLE,
                ReuseDetected(reason="invalid_grant", refresh_fp="f"),
                NOW,
                Schedule(
                    at=100.0 + MAX_SLEEP,
                    why=Why.NEEDS_AUTHORIZATION,
                    backoff=True,
                    permanent=True,
                    needs_authorization="permanent: invalid_grant",
                ),
            ),
            # ...keeping the first reason a person was given.
            (
                ASKED,
                ReuseDetected(reason="invalid_grant", refresh_fp="f"),
                NOW,
                replace(ASKED, at=100.0 + MAX_SLEEP, backoff=True, permanent=True),
            ),
            # Blocked: again once nothing is servable (here 20 s), at most BLOCKED_RETRY...
            (
                IDLE,
                Blocked(reason="store down"),
                NOW,
                Schedule(at=100.0 + BLOCKED_RETRY, why=Why.BLOCKED, blocked="store down"),
            ),
            (
                IDLE,
                Blocked(reason="store down"),
                replace(NOW, servable_left=2.0),
                Schedule(at=102.0, why=Why.BLOCKED, blocked="store down"),
            ),
            (
                IDLE,
                Blocked(reason="store down"),
                replace(NOW, servable_left=-5.0),
                Schedule(at=100.0 + LEASE_RETRY, why=Why.BLOCKED, blocked="store down"),
            ),
            # ...and an unreadable set every BLOCKED_RETRY, whatever is servable.
            (
                IDLE,
                Blocked(reason="unreadable", unreadable=True),
                replace(NOW, servable_left=-5.0),
                Schedule(at=100.0 + BLOCKED_RETRY, why=Why.BLOCKED, blocked="unreadable"),
            ),
            # Unknown outcome: look again when the token stops being servable...
            (
                IDLE,
                OutcomeUnknown(reason="lost", refresh_fp="f"),
                NOW,
                Schedule(at=120.0, why=Why.AT_RISK),
            ),
            # ...within MAX_SLEEP, and every MAX_SLEEP once nothing is servable...
            (
                IDLE,
                OutcomeUnknown(reason="lost", refresh_fp="f"),
                replace(NOW, servable_left=500.0),
                Schedule(at=100.0 + MAX_SLEEP, why=Why.AT_RISK),
            ),
            (
                IDLE,
                OutcomeUnknown(reason="lost", refresh_fp="f", error=TransientTokenError("x")),
                replace(NOW, servable_left=0.0),
                Schedule(at=100.0 + MAX_SLEEP, why=Why.AT_RISK),
            ),
            # ...but at once while a grace retry is still allowed.
            (
                IDLE,
                OutcomeUnknown(reason="lost", refresh_fp="f"),
                replace(NOW, may_retry=True),
                Schedule(at=100.0 + LEASE_RETRY, why=Why.AT_RISK),
            ),
            # A failure of ours: the policy's delay, a backoff.
            (IDLE, Failed(delay=4.0, permanent=False), NOW, Schedule(104.0, Why.BACKOFF, True)),
            (
                IDLE,
                Failed(delay=300.0, permanent=True),
                NOW,
                Schedule(400.0, Why.BACKOFF, backoff=True, permanent=True),
            ),
            # A block lasts through other outcomes, until a set is adopted.
            (
                replace(IDLE, blocked="store down"),
                Failed(delay=4.0, permanent=False),
                NOW,
                Schedule(104.0, Why.BACKOFF, backoff=True, blocked="store down"),
            ),
        ],
    )
    def test_each_outcome_schedules_the_next_attempt(
        self, before: Schedule, step: Step | Failed, now: Now, expected: Schedule
    ) -> None:
        """Each outcome sets when the next attempt is and why, and keeps what must last."""
        assert next_schedule(before, step, now) == expected


class TestTransitions:
    @pytest.mark.parametrize(
        ("before", "new_grant", "expected"),
        [
            (BACKING_OFF, False, Schedule(at=500.0)),
            (Schedule(blocked="down", over_budget=True), False, Schedule(500.0, over_budget=True)),
            (ASKED, False, replace(ASKED, at=500.0, why=Why.DUE)),
            (ASKED, True, Schedule(at=500.0)),
        ],
    )
    def test_an_adopted_set_ends_the_backoff_and_the_block(
        self, before: Schedule, new_grant: bool, expected: Schedule
    ) -> None:
        """A set adopted is due at its time; the backoff and the block end; a call for
        authorization ends only with a new grant; a budget refusal only with a refresh."""
        assert adopted(before, 500.0, new_grant=new_grant) == expected

    def test_authorization_keeps_the_first_reason(self) -> None:
        """The first reason a person was given stays; a missing reason says what is needed."""
        assert needing_authorization(IDLE, None).needs_authorization == "needs authorization"
        assert needing_authorization(ASKED, "other").needs_authorization == "revoked"
        assert needing_authorization(IDLE, "gone") == replace(
            IDLE, why=Why.NEEDS_AUTHORIZATION, needs_authorization="gone"
        )

    @pytest.mark.parametrize(
        ("before", "expected"),
        [
            (IDLE, replace(IDLE, at=100.0)),  # due now
            (Schedule(at=90.0, why=Why.BUSY), Schedule(at=90.0, why=Why.BUSY)),  # due already
            (BACKING_OFF, BACKING_OFF),  # the backoff stands
        ],
    )
    def test_a_purge_makes_the_token_due_now_unless_backing_off(
        self, before: Schedule, expected: Schedule
    ) -> None:
        """A refused token is due now; a backoff the fleet holds stands."""
        assert purged(before, 100.0) == expected

    def test_new_credentials_try_at_once_past_the_shared_backoff(self) -> None:
        """Changed credentials: try now, and ignore the fleet's shared backoff once."""
        assert credentials_changed(BACKING_OFF) == Schedule(
            at=0.0, why=Why.DUE, permanent=True, fresh_credentials=True
        )


class TestAppState:
    @pytest.mark.parametrize(
        ("schedule", "failures", "has_token", "at_risk", "servable", "expected"),
        [
            (IDLE, 0, True, False, True, AppState.FRESH),
            (IDLE, 0, False, False, False, AppState.REFRESHING),
            (IDLE, 2, True, False, True, AppState.FAILING),
            (replace(IDLE, blocked="down"), 0, True, False, True, AppState.FAILING),
            (IDLE, 0, True, True, True, AppState.FAILING),
            (IDLE, 0, True, True, False, AppState.NEEDS_AUTHORIZATION),
            (ASKED, 0, True, False, True, AppState.NEEDS_AUTHORIZATION),
        ],
    )
    def test_the_state_follows_from_the_schedule(
        self,
        schedule: Schedule,
        failures: int,
        has_token: bool,
        at_risk: bool,
        servable: bool,
        expected: AppState,
    ) -> None:
        """Authorization first; an unknown spend fails until nothing is servable; failures
        or a block fail; else fresh with a token."""
        state = app_state(
            schedule, failures=failures, has_token=has_token, at_risk=at_risk, servable=servable
        )
        assert state is expected

    @pytest.mark.parametrize(
        "transition",
        [
            lambda s: next_schedule(s, Busy(wait=1.0), NOW),
            lambda s: next_schedule(s, Failed(4.0, permanent=False), NOW),
            lambda s: adopted(s, 150.0, new_grant=True),
            lambda s: purged(s, 100.0),
            credentials_changed,
        ],
    )
    def test_the_shown_state_waits_for_the_next_settling(self, transition: Transition) -> None:
        """Scheduling keeps the state shown: it changes only when the refresher settles it
        (an attempt's start or end, a call for authorization)."""
        failing = replace(IDLE, shown=AppState.FAILING)
        assert transition(failing).shown is AppState.FAILING
