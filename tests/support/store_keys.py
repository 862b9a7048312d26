"""The Redis keys a test's brokers use for an app: its name and client binding (issue 20, M6).

The binding hashes the test server's URL (a new port each run), the client id, the grant and
the scopes, so tests find it in the store rather than compute it.
"""

from __future__ import annotations

import redis


def stored_name(client: redis.Redis, app: str = "app1", prefix: str = "tb-test") -> str:
    """The one `app@binding` name the store holds keys of (AssertionError unless exactly one)."""
    keys = [
        k.decode() if isinstance(k, bytes) else str(k)
        for k in client.keys(f"{prefix}:{{{app}@*}}:*")
    ]
    names = {key.split("{", 1)[1].split("}", 1)[0] for key in keys}
    if len(names) != 1:
        raise AssertionError(f"expected one client binding of {app} in the store: {sorted(names)}")
    return names.pop()


def bound_key(client: redis.Redis, kind: str, app: str = "app1", prefix: str = "tb-test") -> str:
    """The key of `app`'s `kind` (token, lease, spend, ...) under its client binding."""
    return f"{prefix}:{{{stored_name(client, app, prefix)}}}:{kind}"


def stored_name_at(redis_url: str, app: str = "app1", prefix: str = "tb-test") -> str:
    """`stored_name`, asked of the Redis at `redis_url`."""
    client = redis.Redis.from_url(redis_url)
    try:
        return stored_name(client, app, prefix)
    finally:
        client.close()
