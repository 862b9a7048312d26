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


def refresh_due(token: TokenSet, policy: RefreshPolicy, jitter_sample: float = 0.0) -> float:
    """Wall time at which `token` should be refreshed.

    The earlier of `issued_at + at_fraction * lifetime` and `expires_at - min_remaining`, never
    before a quarter of the lifetime has passed, moved by `jitter_sample` (in [-1, 1]) * jitter *
    lifetime, and never after the token stops being servable.
    """
    lifetime = max(token.lifetime, 0.0)
    due = min(
        token.issued_at + policy.at_fraction * lifetime, token.expires_at - policy.min_remaining
    )
    due += max(-1.0, min(1.0, jitter_sample)) * policy.jitter * lifetime
    earliest = token.issued_at + MIN_REFRESH_FRACTION * lifetime
    latest = serve_deadline(token, policy)
    return max(earliest, min(due, latest))


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
