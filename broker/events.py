"""What the core reports: one event per thing that happened, handed to one hook.

The refresher, the fleet protocol and the core decide; they do not count or audit. They call
their `EventHook` with these values, and broker/observe.py turns each into its metrics and
audit lines (stamina's instrumentation hooks are the model). A test or the simulation may hand
in any other hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from broker.model import AppState, TokenSet


@dataclass(frozen=True, slots=True)
class Refreshed:
    """A refresh of ours got a new set (`duration`: seconds since the attempt started)."""

    app: str
    token: TokenSet
    duration: float


@dataclass(frozen=True, slots=True)
class RefreshFailed:
    """A refresh of ours failed; `failures` in a row, the next try in `retry_in` seconds."""

    app: str
    error: str
    permanent: bool
    status: int | None
    failures: int
    retry_in: float
    duration: float


@dataclass(frozen=True, slots=True)
class AnswerLost:
    """A request of ours was sent and its answer lost: counted as a transient failure."""

    app: str
    failures: int
    duration: float


@dataclass(frozen=True, slots=True)
class GrantAtRisk:
    """A spend of the grant's refresh token has no known outcome (told once per token)."""

    app: str
    reason: str
    grace: float


@dataclass(frozen=True, slots=True)
class GrantReused:
    """The server refused our own sent refresh token as reused: the grant is lost."""

    app: str
    reason: str
    failures: int
    duration: float


@dataclass(frozen=True, slots=True)
class AuthorizationNeeded:
    """The app needs `token-broker authorize` (told once, until a new grant is adopted)."""

    app: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class Blocked:
    """A refresh may not be spent now (the store cannot confirm a lease)."""

    app: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unblocked:
    """Nothing blocks refreshing (any outcome but a block, or a set read from the store)."""

    app: str


@dataclass(frozen=True, slots=True)
class OverBudget:
    """The fleet-wide request budget refused an attempt."""

    app: str


@dataclass(frozen=True, slots=True)
class TokenAdopted:
    """A set became the app's current one (refreshed, read from the store, or carried)."""

    app: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class TokenRefused:
    """An upstream refused an access token; `outcome` is the store's answer (or
    `unrecorded` without a store)."""

    app: str
    outcome: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class ExpiryLowered:
    """After the store's clock stepped back, the stored set's expiry was lowered `by` seconds
    to this replica's deadline in the new frame (`AppRefresher.lower_stored_expiry`)."""

    app: str
    by: float


@dataclass(frozen=True, slots=True)
class LeaseAsked:
    """The app's lease was asked for: `outcome` is the answer."""

    app: str
    outcome: str


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The app's state (as the API shows it) is `state`."""

    app: str
    state: AppState


@dataclass(frozen=True, slots=True)
class ScheduleChanged:
    """The app's next refresh attempt is at wall time `at` (None: none is planned)."""

    app: str
    at: float | None


@dataclass(frozen=True, slots=True)
class StoreReachable:
    """The store answered (`up`) or did not."""

    up: bool


@dataclass(frozen=True, slots=True)
class SubscriptionStale:
    """The store's notice subscription went silent (half-open) and is dropped."""


@dataclass(frozen=True, slots=True)
class AppRemoved:
    """A config reload removed the app: its series go."""

    app: str


Event = (
    Refreshed
    | RefreshFailed
    | AnswerLost
    | GrantAtRisk
    | GrantReused
    | AuthorizationNeeded
    | Blocked
    | Unblocked
    | OverBudget
    | TokenAdopted
    | TokenRefused
    | ExpiryLowered
    | LeaseAsked
    | StateChanged
    | ScheduleChanged
    | StoreReachable
    | SubscriptionStale
    | AppRemoved
)

EventHook = Callable[[Event], None]
