"""When one app's next refresh attempt is, and why: a frozen value and pure transitions.

The refresher keeps a `Schedule` and replaces it after each outcome with `next_schedule`; it
never sets a flag by hand. Times are monotonic seconds (the refresher's clock), except `now`
and `serve_deadline`, which are the fleet's wall clock. Table-tested in
tests/unit/test_schedule.py.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import assert_never

from broker import policy
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
from broker.model import AppState

# Shortest wait before trying again after the lease was busy or lost.
LEASE_RETRY = 0.25
# How often a refresh blocked on the store is tried again (a reconnect also wakes it).
BLOCKED_RETRY = 5.0
# While another replica holds the lease (which covers a whole spend, about 12 s), the store is
# looked at again at least this often: the holder's notice usually comes first, but a
# subscription still reconnecting after an outage misses it.
BUSY_POLL = 1.0
# The loop wakes at least this often: it re-reads the wall clock and checks the store.
MAX_SLEEP = 30.0


class Why(enum.StrEnum):
    """Why the next attempt is when it is."""

    DUE = "due"  # the token's due time (at once without one, or once it was refused)
    BACKOFF = "backoff"  # a failure, ours or the fleet's
    BLOCKED = "blocked"  # the store cannot confirm a lease
    BUSY = "busy"  # another replica holds the lease
    OVER_BUDGET = "over budget"  # the fleet-wide request budget is spent
    AT_RISK = "at risk"  # a spend with no known outcome: look at the store again
    NEEDS_AUTHORIZATION = "needs authorization"  # nothing is tried until a new grant


@dataclass(frozen=True, slots=True)
class Schedule:
    """The next attempt (`at`, monotonic) and why, with what holds until a new set comes.

    `backoff`, `permanent` and `blocked` last until a set is adopted; `over_budget` until a
    refresh of ours succeeds; `needs_authorization` (the reason) until a new grant is adopted.
    `fresh_credentials`: the next attempt ignores the fleet's shared backoff once. `shown`:
    the app's state as the API shows it, settled when an attempt starts and ends (`app_state`),
    when a person is asked to authorize, and when a set from the store is adopted between
    attempts (a warm start, another replica's refresh: `fresh`).
    """

    at: float = 0.0
    why: Why = Why.DUE
    backoff: bool = False
    permanent: bool = False
    blocked: str | None = None
    over_budget: bool = False
    needs_authorization: str | None = None
    fresh_credentials: bool = False
    shown: AppState = AppState.REFRESHING


@dataclass(frozen=True, slots=True)
class Failed:
    """A refresh of ours failed: try again in `delay` seconds (policy.retry_delay)."""

    delay: float
    permanent: bool


@dataclass(frozen=True, slots=True)
class Now:
    """What the transitions read of the moment: the clocks and the token's serving window."""

    mono: float
    wall: float
    # Seconds the current token may still be served: read only after a block or an unknown
    # outcome (the refresher measures it only for those).
    servable_left: float
    # The wall time the current token stops being served; None without a live token.
    serve_deadline: float | None = None
    # An unknown spend may still be retried once inside the server's grace window.
    may_retry: bool = False


Step = Fetched | Adopted | Busy | Deferred | OverBudget | ReuseDetected | Blocked | OutcomeUnknown


def next_schedule(schedule: Schedule, step: Step | Failed, now: Now) -> Schedule:
    """The schedule after an attempt ended with `step`.

    `Fetched` and `Adopted` are scheduled by `adopted` (the refresher adopts the set first).
    """
    match step:
        case Fetched():
            return replace(schedule, over_budget=False)
        case Adopted():
            return schedule
        case Busy(wait=wait):
            # Another replica is refreshing: its notice wakes us; else look again soon.
            return replace(
                schedule, at=now.mono + max(LEASE_RETRY, min(wait, BUSY_POLL)), why=Why.BUSY
            )
        case Deferred():
            # Back off with the fleet: wait for the shared `not_before`, but never so long
            # that the current token falls inside the safety margin.
            wait = step.not_before - now.wall
            if now.serve_deadline is not None:
                wait = min(wait, now.serve_deadline - now.wall)
            return replace(
                schedule,
                at=now.mono + max(policy.MIN_RETRY, wait),
                why=Why.BACKOFF,
                backoff=True,
                permanent=step.permanent,
            )
        case OverBudget(retry_after=retry_after):
            return replace(
                schedule,
                at=now.mono + max(LEASE_RETRY, retry_after),
                why=Why.OVER_BUDGET,
                backoff=True,
                over_budget=True,
            )
        case ReuseDetected(reason=reason):
            return replace(
                schedule,
                at=now.mono + MAX_SLEEP,
                why=Why.NEEDS_AUTHORIZATION,
                backoff=True,
                permanent=True,
                needs_authorization=schedule.needs_authorization or f"permanent: {reason}",
            )
        case Blocked(reason=reason, unreadable=unreadable):
            # Soon once nothing is servable, to serve again as soon as the store is back; an
            # unreadable set is not fixed by retrying (its replacement's notice wakes us).
            retry = BLOCKED_RETRY if unreadable else max(LEASE_RETRY, now.servable_left)
            return replace(
                schedule, at=now.mono + min(BLOCKED_RETRY, retry), why=Why.BLOCKED, blocked=reason
            )
        case OutcomeUnknown():
            # Nothing to request: look at the store again on the next turn, and no later than
            # when the token stops being servable, so that the state turns to
            # needs_authorization then. A grace retry still allowed is tried at once (H2).
            left = now.servable_left
            wait = min(MAX_SLEEP, max(LEASE_RETRY, left)) if left > 0 else MAX_SLEEP
            if now.may_retry:
                wait = LEASE_RETRY
            return replace(schedule, at=now.mono + wait, why=Why.AT_RISK)
        case Failed(delay=delay, permanent=permanent):
            return replace(
                schedule, at=now.mono + delay, why=Why.BACKOFF, backoff=True, permanent=permanent
            )
        case _:
            assert_never(step)


def adopted(schedule: Schedule, at: float, *, new_grant: bool) -> Schedule:
    """A set was adopted, due at `at`: the backoff and any block end.

    `new_grant`: the set is of a grant newer than one a person was asked to authorize again.
    """
    return replace(
        schedule,
        at=at,
        why=Why.DUE,
        backoff=False,
        permanent=False,
        blocked=None,
        needs_authorization=None if new_grant else schedule.needs_authorization,
    )


def needing_authorization(schedule: Schedule, reason: str | None) -> Schedule:
    """Nothing is tried until a person authorizes again (the first reason is kept)."""
    return replace(
        schedule,
        why=Why.NEEDS_AUTHORIZATION,
        needs_authorization=schedule.needs_authorization or reason or "needs authorization",
    )


def purged(schedule: Schedule, mono: float) -> Schedule:
    """The current token was refused upstream: due now, unless a backoff holds."""
    if schedule.backoff or schedule.at <= mono:
        return schedule
    return replace(schedule, at=mono, why=Why.DUE)


def credentials_changed(schedule: Schedule) -> Schedule:
    """A secret or key file changed: try now, past the fleet's shared backoff once."""
    return replace(schedule, at=0.0, why=Why.DUE, backoff=False, fresh_credentials=True)


def app_state(
    schedule: Schedule, *, failures: int, has_token: bool, at_risk: bool, servable: bool
) -> AppState:
    """The app's state between attempts, as the API and the metrics show it.

    `at_risk`: a spend of the current token has no known outcome.
    """
    if schedule.needs_authorization is not None:
        return AppState.NEEDS_AUTHORIZATION
    if at_risk:
        return AppState.FAILING if servable else AppState.NEEDS_AUTHORIZATION
    if failures or schedule.blocked:
        return AppState.FAILING
    return AppState.FRESH if has_token else AppState.REFRESHING
