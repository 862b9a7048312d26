"""SIGTERM with a spend in flight (issue 20, H5), with a real broker process, redis-server and
the rotating test OAuth server: a refresh token already sent is awaited past the old 15 s
drain and its answer stored before exit 0; one only announced is never sent."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.integration.test_rotation_faults import (
    LIFETIME,
    check_grant_intact,
    events,
    rotating_fleet,
    stored_set,
)
from tests.support.oauth_server import OAuthTestServer
from tests.support.redis_server import RedisServer
from tests.support.store_keys import bound_key

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# The server's answer to the refresh that SIGTERM lands on: past the old 15 s drain.
SLOW_ANSWER = 17.0


async def _until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.005)


class TestSigtermDrain:
    async def test_a_sent_refresh_held_past_15_s_is_awaited_and_stored(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """SIGTERM the moment the refresh token reaches a server that rotates and then takes
        17 s to answer: the broker waits (past the old 15 s bound), stores the rotated set,
        exits 0, and the next process spends the rotated token."""
        fleet = await rotating_fleet(tmp_path, oauth_server, redis_server.url, size=1)
        (replica,) = fleet.replicas
        try:
            await fleet.start()
            seeded = await stored_set(replica.files, redis_server.url)
            assert seeded is not None
            oauth_server.post_delays = [SLOW_ANSWER]
            await _until(lambda: oauth_server.count("refresh_token") == 1, 15.0, "a refresh")
            (grant,) = oauth_server.grants.values()
            rotated = grant.current_refresh  # the server rotated before its slow answer
            signalled = time.monotonic()
            signalled_at = time.time()
            replica.process.signal(signal.SIGTERM)
            code = await asyncio.to_thread(replica.process.wait, 40.0)
            drained = time.monotonic() - signalled
            stored = await stored_set(replica.files, redis_server.url)
            refreshed = events(replica, "token.refreshed", since=signalled_at)
            stopped = events(replica, "broker.stopped", since=signalled_at)
            replica.process.start()  # the rolling deploy's new pod
            await _until(lambda: oauth_server.count("refresh_token") == 2, 20.0, "a new refresh")
        finally:
            await fleet.stop_async()
        assert code == 0, replica.process.output()[-4000:]
        assert drained > 15.0, f"exited {drained:.1f} s after SIGTERM, before the answer"
        assert refreshed and stopped, "the answer was not stored before the exit"
        assert stored is not None and stored.generation == seeded.generation + 1
        assert stored.refresh_token == rotated
        refreshes = [
            r for r in oauth_server.requests if r.form.get("grant_type") == "refresh_token"
        ]
        assert refreshes[-1].form["refresh_token"] == rotated, "the rotated token was not spent"
        check_grant_intact(oauth_server)
        print(
            f"\nsigterm with a {SLOW_ANSWER:.0f} s answer on the wire: exit 0 after {drained:.2f} s"
        )

    async def test_an_announced_spend_is_not_sent_after_sigterm(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """A broker starting on an expired set waits the long objection window (6 s) before
        sending; SIGTERM inside it: the spend ends aborted, the lease is released, nothing is
        sent, the exit is prompt; the next process spends the token once."""
        fleet = await rotating_fleet(tmp_path, oauth_server, redis_server.url, size=1)
        (replica,) = fleet.replicas
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            await asyncio.sleep(LIFETIME + 0.5)  # the stored access token has expired
            replica.process.start()
            await _until(
                lambda: client.hget(bound_key(client, "spend"), "state") == b"announced",
                20.0,
                "an announced spend",
            )
            signalled = time.monotonic()
            replica.process.signal(signal.SIGTERM)
            code = await asyncio.to_thread(replica.process.wait, 20.0)
            stopped_in = time.monotonic() - signalled
            sent_before_restart = oauth_server.count("refresh_token")
            spend_left = client.exists(bound_key(client, "spend"))
            lease_left = client.exists(bound_key(client, "lease"))
            abandoned = events(replica, "refresh.abandoned_for_shutdown")
            replica.process.start()
            await _until(lambda: oauth_server.count("refresh_token") == 1, 20.0, "a refresh")
            await replica.process.wait_ready(replica.files.metrics)
        finally:
            client.close()
            await fleet.stop_async()
        assert code == 0, replica.process.output()[-4000:]
        assert sent_before_restart == 0, "a refresh token was sent after SIGTERM"
        assert stopped_in < 4.0, f"stopping took {stopped_in:.1f} s: the window was waited out"
        assert abandoned, "no refresh.abandoned_for_shutdown logged"
        assert not spend_left, "the announced spend was left behind"
        assert not lease_left, "the lease was not released"
        check_grant_intact(oauth_server)
        print(
            f"\nsigterm inside the objection window: nothing sent, exit 0 after {stopped_in:.2f} s"
        )
