"""Pure timing decisions: when a refresh is due, whether a token is servable, how long to back off.

Every function takes `now` (or a token's own times) and returns a number; nothing here reads a
clock or sleeps, so the rules are table-tested directly.
"""

from __future__ import annotations

from broker.model import RefreshPolicy, TokenSet

# Never refresh before this share of the lifetime has passed: a short-lived token must not
# cause a refresh storm.
MIN_REFRESH_FRACTION = 0.25
# The safety margin is at most this share of the lifetime.
MAX_MARGIN_FRACTION = 0.1
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0
# After a permanent error (bad credentials, dead grant) retrying is slow: the fix is an operator's.
PERMANENT_RETRY = 300.0
# Even a capped wait leaves this long between attempts, so a flapping server is not hammered.
MIN_RETRY = 0.5
# Each replica adds a stagger of its own (at most this share of the lifetime, and at most
# STAGGER_MAX seconds) after the fleet's shared due time, so the replicas do not all reach for
# the lease in the same millisecond. It is small because the earliest replica sets the pace.
STAGGER_FRACTION = 0.01
STAGGER_MAX = 2.0
# A fingerprint is 12 hex digits: 48 bits, mapped onto [-1, 1] for the fleet's jitter sample.
_FINGERPRINT_SPAN = float(16**12 - 1)


def safety_margin(policy: RefreshPolicy, lifetime: float) -> float:
    """Seconds of validity below which a token is not served: the policy's, at most lifetime/10."""
    return max(0.0, min(policy.safety_margin, lifetime * MAX_MARGIN_FRACTION))


def is_servable(
    remaining: float, lifetime: float, policy: RefreshPolicy, min_ttl: float = 0.0
) -> bool:
    """True when `remaining` seconds are more than the safety margin and at least `min_ttl`."""
    return remaining > safety_margin(policy, lifetime) and remaining >= min_ttl


def serve_deadline(token: TokenSet, policy: RefreshPolicy) -> float:
    """The wall time after which `token` is no longer served."""
    return token.expires_at - safety_margin(policy, token.lifetime)


def refresh_window(token: TokenSet, policy: RefreshPolicy) -> tuple[float, float]:
    """(earliest, latest): the wall times between which a refresh of `token` may be due.

    Never before a quarter of the lifetime has passed (no storm for short tokens), never after
    the token stops being served.
    """
    earliest = token.issued_at + MIN_REFRESH_FRACTION * max(token.lifetime, 0.0)
    return earliest, max(earliest, serve_deadline(token, policy))


def refresh_due(token: TokenSet, policy: RefreshPolicy, jitter_sample: float = 0.0) -> float:
    """Wall time at which `token` should be refreshed, drawn inside the allowed window.

    The nominal time is the earlier of `issued_at + at_fraction * lifetime` and
    `expires_at - min_remaining`. The jitter spreads due times over `2 * jitter * lifetime`
    around it; `jitter_sample` in [-1, 1] picks the place. Near an edge of the window
    (`refresh_window`) the spread slides inside it instead of being clipped, so the jitter
    never vanishes, whatever the lifetime.
    """
    lifetime = max(token.lifetime, 0.0)
    nominal = min(
        token.issued_at + policy.at_fraction * lifetime, token.expires_at - policy.min_remaining
    )
    earliest, latest = refresh_window(token, policy)
    spread = min(2.0 * policy.jitter * lifetime, latest - earliest)
    low = max(earliest, min(nominal - spread / 2.0, latest - spread))
    return low + (max(-1.0, min(1.0, jitter_sample)) + 1.0) / 2.0 * spread


def fleet_jitter_sample(token: TokenSet) -> float:
    """A jitter sample in [-1, 1] that every replica derives alike from the token itself.

    Replicas holding the same token agree on its due time, so the fleet refreshes at the pace of
    one broker; different tokens (apps, generations) still land at different places.
    """
    return int(token.fingerprint, 16) / _FINGERPRINT_SPAN * 2.0 - 1.0


def replica_stagger(lifetime: float, stagger_sample: float) -> float:
    """Seconds this replica waits after the fleet's due time; `stagger_sample` in [0, 1]."""
    limit = min(STAGGER_MAX, STAGGER_FRACTION * max(lifetime, 0.0))
    return max(0.0, min(1.0, stagger_sample)) * limit


def fleet_refresh_due(token: TokenSet, policy: RefreshPolicy, stagger_sample: float) -> float:
    """When this replica refreshes `token`: the fleet's shared due time plus its own stagger.

    With per-replica jitter the earliest of N replicas would set the pace, and the fleet would
    refresh more often than one broker (the minimum of N draws sits near the window's lower
    edge). Deriving the jitter from the token keeps one due time for the whole fleet.
    """
    due = refresh_due(token, policy, fleet_jitter_sample(token))
    _, latest = refresh_window(token, policy)
    return min(latest, due + replica_stagger(token.lifetime, stagger_sample))


def backoff(attempt: int, jitter_sample: float = 1.0) -> float:
    """Capped exponential backoff for the `attempt`-th consecutive failure (1-based), with jitter.

    `jitter_sample` in [0, 1] scales the delay between half and all of its nominal value.
    """
    nominal = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** max(0, attempt - 1))
    return nominal * (0.5 + 0.5 * max(0.0, min(1.0, jitter_sample)))


def retry_delay(
    *,
    attempt: int,
    permanent: bool,
    retry_after: float | None,
    token: TokenSet | None,
    now: float,
    policy: RefreshPolicy,
    jitter_sample: float = 1.0,
) -> float:
    """Seconds to wait before the next attempt after a failure.

    `Retry-After` is honoured and permanent errors wait long, except that the broker never waits
    past the moment its current token would fall inside the safety margin.
    """
    delay = PERMANENT_RETRY if permanent else backoff(attempt, jitter_sample)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, retry_after)
    if token is not None and token.expires_at > now:
        delay = min(delay, serve_deadline(token, policy) - now)
    return max(MIN_RETRY, delay)
