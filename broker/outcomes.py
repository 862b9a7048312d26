"""What an app's refresher makes of an attempt's end: the counts, the errors, the schedule.

A part of `AppRefresher` (broker/refresher.py): each outcome is accounted for here, and the
next attempt scheduled by the pure broker/schedule.py. The `TYPE_CHECKING` block names what
it uses of the rest of the refresher.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING, assert_never

from broker import events, policy
from broker.clock import Clock
from broker.errors import PermanentTokenError, TokenEndpointError, TransientTokenError
from broker.events import EventHook
from broker.fleet import (
    Adopted,
    Blocked,
    Busy,
    Deferred,
    Fetched,
    FleetProtocol,
    NoGrant,
    Outcome,
    OutcomeUnknown,
    OverBudget,
    ReuseDetected,
)
from broker.logs import SECRETS, get_logger
from broker.model import AppSpec, AppState, TokenSet
from broker.schedule import (
    Failed,
    Now,
    Schedule,
    app_state,
    needing_authorization,
    next_schedule,
)

log = get_logger("broker.refresher")


class Outcomes:
    """Accounting for each attempt's outcome (a part of AppRefresher)."""

    if TYPE_CHECKING:
        spec: AppSpec
        token: TokenSet | None
        binding_changed: str | None
        failures: int
        last_error: str | None
        last_refresh_at: float | None
        schedule: Schedule
        fleet: FleetProtocol
        _clock: Clock
        _rng: random.Random
        _emit: EventHook
        _unsynced: bool
        _view_known: bool
        _reused_lineage: int
        _announced_unknown: set[str]
        _blocked_logged: str | None

        @property
        def name(self) -> str: ...
        @property
        def grant_spends(self) -> bool: ...
        def next_refresh_at(self) -> float | None: ...
        def servable(self, min_ttl: float = 0.0) -> TokenSet | None: ...
        def _servable_left(self) -> float: ...
        def _adopt(
            self, token: TokenSet, *, source: str, sent_mono: float | None = None
        ) -> None: ...
        async def _newer_after_invalid_grant(self) -> bool: ...

    def _init_outcomes(self) -> None:
        """The outcome part's state (called once by AppRefresher.__init__)."""
        self._announced_unknown = set()
        # The lineage whose refresh token the server refused as reused: its sets are dead, and
        # adopting one (the other presentation's commit) does not clear needs_authorization.
        self._reused_lineage = 0
        self._blocked_logged = None

    def _record_outcome(self, outcome: Outcome, started: float) -> None:
        """Account for what the attempt did, then schedule the next one (broker/schedule)."""
        duration = self._clock.monotonic() - started
        match outcome:
            case Fetched():
                self._adopt(outcome.token, source="refresh", sent_mono=outcome.sent_mono)
                self._unsynced = not outcome.persisted
                self._view_known = outcome.persisted
                self.failures = 0
                self.last_error = None
                self.last_refresh_at = self._clock.time()
                self._emit(events.Refreshed(self.name, outcome.token, duration))
            case Deferred():
                self.failures = max(self.failures, outcome.failures)
                self.last_error = outcome.error
            case OverBudget():
                self._emit(events.OverBudget(self.name))
                if not self.schedule.over_budget:
                    log.warning(
                        "refresh.over_budget",
                        app=self.name,
                        limit_per_minute=self.spec.max_token_requests_per_minute,
                        retry_in=round(outcome.retry_after, 3),
                    )
            case ReuseDetected():
                # Our own sent refresh token was refused as spent: the grant is lost. Not
                # swallowed by adopting a newer stored set: that set came from the other
                # presentation of the same token, revoked with the grant.
                self.failures += 1
                self.last_error = f"permanent: {outcome.reason}"
                self._emit(events.GrantReused(self.name, outcome.reason, self.failures, duration))
                if self.token is not None:
                    self._reused_lineage = max(self._reused_lineage, self.token.lineage)
            case Blocked():
                self.last_error = f"refresh blocked: {outcome.reason}"
                self._emit(events.Blocked(self.name, outcome.reason))
                if self._blocked_logged != outcome.reason:
                    log.warning("refresh.blocked", app=self.name, reason=outcome.reason)
            case OutcomeUnknown():
                self._record_unknown(outcome, duration)
            case Adopted() | Busy():
                pass  # adopted by the protocol already; or another replica is refreshing
            case _:
                assert_never(outcome)
        if not isinstance(outcome, Blocked):
            self._emit(events.Unblocked(self.name))
        self._blocked_logged = outcome.reason if isinstance(outcome, Blocked) else None
        self._reschedule(next_schedule(self.schedule, outcome, self._now(outcome)))

    def _now(self, outcome: Outcome | None = None) -> Now:
        """The moment as `next_schedule` reads it.

        The servable time left is measured only for the outcomes that read it (a block, an
        unknown outcome): each measurement may lower the token's deadline for good
        (`remaining`), so it is taken where it always was, and nowhere else.
        """
        wall = self._clock.time()
        token = self.token
        deadline = None
        if token is not None and token.expires_at > wall:
            deadline = policy.serve_deadline(token, self.spec.refresh)
        measure = isinstance(outcome, Blocked | OutcomeUnknown)
        return Now(
            mono=self._clock.monotonic(),
            wall=wall,
            servable_left=self._servable_left() if measure else 0.0,
            serve_deadline=deadline,
            may_retry=isinstance(outcome, OutcomeUnknown)
            and self.fleet.may_retry(outcome.refresh_fp),
        )

    def _record_unknown(self, outcome: OutcomeUnknown, duration: float) -> None:
        """The grant is at risk: say so at once, keep serving, and keep watching the store."""
        self.last_error = (
            f"grant at risk: {outcome.reason}; if no replica stored a newer set, "
            "run token-broker authorize"
        )
        if outcome.error is not None:
            self.failures += 1
            self._emit(events.AnswerLost(self.name, self.failures, duration))
        if outcome.refresh_fp not in self._announced_unknown:
            self._announced_unknown.add(outcome.refresh_fp)
            grace = self.spec.refresh.reuse_grace
            self._emit(events.GrantAtRisk(self.name, outcome.reason, grace))

    async def _record_failure(self, exc: TokenEndpointError, started: float) -> None:
        permanent = isinstance(exc, PermanentTokenError | NoGrant)
        if (
            isinstance(exc, PermanentTokenError)
            and exc.is_invalid_grant
            and await self._newer_after_invalid_grant()
        ):
            return  # another replica rotated the refresh token first; its set is ours now
        # Consecutive failures of the fleet: the shared record's count carries on here.
        self.failures = max(self.failures, self.fleet.shared_failures) + 1
        self.last_error = _describe(exc)
        duration = self._clock.monotonic() - started
        retry_after = exc.retry_after if isinstance(exc, TransientTokenError) else None
        now = self._clock.time()
        delay = policy.retry_delay(
            attempt=self.failures,
            permanent=permanent,
            retry_after=retry_after,
            token=self.token,
            now=now,
            policy=self.spec.refresh,
            jitter_sample=self._rng.random(),
        )
        self._reschedule(next_schedule(self.schedule, Failed(delay, permanent), self._now()))
        if not isinstance(exc, NoGrant):
            await self.fleet.share_failure(
                failures=self.failures,
                not_before=now + delay,
                error=self.last_error,
                permanent=permanent,
            )
        if self.grant_spends and (
            isinstance(exc, NoGrant)
            or (isinstance(exc, PermanentTokenError) and exc.is_invalid_grant)
        ):
            self._enter_needs_authorization(self.last_error)
        self._emit(
            events.RefreshFailed(
                self.name, self.last_error, permanent, exc.status, self.failures, delay, duration
            )
        )

    def _no_stored_set(self) -> str:
        """Why there is nothing to serve for an authorization-code app, and what to do."""
        if self.binding_changed:
            return (
                f"the app's client binding changed ({self.binding_changed}); the stored token "
                "set belongs to the old binding and is not used: run token-broker authorize"
            )
        return (
            "no token set stored for this client binding (token URL, client id, grant, "
            "scopes, audience); run token-broker authorize"
        )

    def _enter_needs_authorization(self, reason: str | None) -> None:
        self._reschedule(needing_authorization(self.schedule, reason))
        self._set_state(AppState.NEEDS_AUTHORIZATION)

    def _reschedule(self, schedule: Schedule) -> None:
        """Take `schedule`; a first call for authorization is announced and shown at once."""
        asked = self.schedule.needs_authorization is None
        self.schedule = schedule
        if asked and schedule.needs_authorization is not None:
            self._emit(events.AuthorizationNeeded(self.name, schedule.needs_authorization))
            self._set_state(AppState.NEEDS_AUTHORIZATION)

    def _settle(self) -> None:
        """At an attempt's end, and when a set from the store is adopted between attempts,
        the state shown follows from the schedule (app_state)."""
        asked = self.schedule.needs_authorization is not None
        at_risk = not asked and self.fleet.outcome_unknown(self.token)
        # (servable() only where app_state reads it: it may lower the token's deadline.)
        state = app_state(
            self.schedule,
            failures=self.failures,
            has_token=self.token is not None,
            at_risk=at_risk,
            servable=at_risk and self.servable() is not None,
        )
        self._set_state(state)

    def _set_state(self, state: AppState) -> None:
        if state is not self.schedule.shown or state is AppState.REFRESHING:
            self.schedule = replace(self.schedule, shown=state)
            self._emit(events.StateChanged(self.name, state))
        # Every attempt starts and ends here: the schedule the metric shows follows it.
        self._emit(events.ScheduleChanged(self.name, self.next_refresh_at()))


def _describe(exc: TokenEndpointError) -> str:
    """A short, secret-free description for `last_error` and logs."""
    kind = "permanent" if isinstance(exc, PermanentTokenError | NoGrant) else "transient"
    return f"{kind}: {SECRETS.scrub(str(exc))[:200]}"
