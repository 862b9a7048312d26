"""The outcomes of one refresh attempt under the fleet protocol (broker/fleet/protocol.py)."""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import TokenEndpointError, TransientTokenError
from broker.model import TokenSet


@dataclass(frozen=True, slots=True)
class Adopted:
    """The store had a newer set that is not yet due: adopted, nothing was requested."""

    token: TokenSet


@dataclass(frozen=True, slots=True)
class Fetched:
    """We got a new set. `persisted` False: it could not be stored yet (write it back later)."""

    token: TokenSet
    persisted: bool
    sent_mono: float


@dataclass(frozen=True, slots=True)
class Busy:
    """Another replica holds the lease (for up to `wait` seconds): wait for its notice."""

    wait: float


@dataclass(frozen=True, slots=True)
class Blocked:
    """A refresh token may not be spent now (the store cannot confirm a lease): wait.

    `unreadable`: the store answered, but its set is under a key this replica lacks; only a
    new set (whose notice wakes the refresher) or a restart with the key changes that.
    """

    reason: str
    unreadable: bool = False


@dataclass(frozen=True, slots=True)
class OutcomeUnknown:
    """The refresh token was (or may have been) spent with no answer: it is not spent again.

    `error` is set when this replica sent the request itself.
    """

    reason: str
    refresh_fp: str
    error: TransientTokenError | None = None


@dataclass(frozen=True, slots=True)
class ReuseDetected:
    """The server answered `invalid_grant` to a refresh token this replica sent: proof that
    the token was presented twice (the protocol let it through), so the grant is revoked or
    about to be. Never swallowed by adopting another set: a person must authorize again."""

    reason: str
    refresh_fp: str


@dataclass(frozen=True, slots=True)
class Deferred:
    """Another replica's failed attempt says: nobody tries again before `not_before` (fleet time)."""

    not_before: float
    failures: int
    error: str
    permanent: bool


@dataclass(frozen=True, slots=True)
class OverBudget:
    """The app's fleet-wide request budget is spent: try again in `retry_after` seconds."""

    retry_after: float


Outcome = (
    Adopted | Fetched | Busy | Blocked | OutcomeUnknown | ReuseDetected | Deferred | OverBudget
)


class NoGrant(TokenEndpointError):
    """There is nothing to refresh with (an authorization-code app without a refresh token)."""
