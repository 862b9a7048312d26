"""A spend record no replica acknowledged is not sent (issue 20, H4), and
`store.require_replica_ack` defaults by the store URL's scheme."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog.testing

from broker.config import load_config, summarize
from broker.errors import ConfigError, NotDurable, TransientTokenError
from broker.fleet import Blocked, Fetched, FleetProtocol, Timing
from broker.model import TokenSet
from broker.store.memory import MemoryStore
from tests.support.config import write_config
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FLEET_APP, CurrentSet, fleet_protocol, spendable_grant

APP = FLEET_APP


def _grant(clock: FakeClock) -> TokenSet:
    return spendable_grant(clock, "at-ack-1", "rt-ack-1")


def _protocol(store: MemoryStore, clock: FakeClock, holder: CurrentSet) -> FleetProtocol:
    return fleet_protocol(store, clock, holder, timing=Timing(objection=0.0))


class TestSpendWithoutAcknowledgement:
    async def test_no_replica_acknowledged_the_record_nothing_is_sent(
        self, fake_clock: FakeClock
    ) -> None:
        """mark_sent raising NotDurable: the refresh token is never presented, the spend is
        ended as aborted (the token stays spendable), the outcome is Blocked with the reason,
        and `spend.not_durable` is logged."""
        store = MemoryStore(fake_clock, require_replica_ack=True)
        store.replicas_acknowledge = False
        token = _grant(fake_clock)
        await store.commit(APP, token)
        protocol = _protocol(store, fake_clock, CurrentSet(token))
        presented: list[str | None] = []

        async def fetch(refresh_token: str | None) -> TokenSet:
            presented.append(refresh_token)
            raise AssertionError("a refresh token was sent without a replica's acknowledgement")

        with structlog.testing.capture_logs() as logs:
            outcome = await protocol.refresh(fetch, is_due=lambda _: True, servable_left=10.0)
        assert presented == []
        assert isinstance(outcome, Blocked)
        assert "no store replica acknowledged the spend record" in outcome.reason
        assert not outcome.unreadable
        assert APP not in store.state.spends  # aborted: removed, the token is not unknown
        assert not protocol.outcome_unknown(token)
        assert [e["event"] for e in logs if e["event"] == "spend.not_durable"] == [
            "spend.not_durable"
        ]

    async def test_once_a_replica_acknowledges_the_token_is_spent(
        self, fake_clock: FakeClock
    ) -> None:
        """The same replica spends the token normally once a replica acknowledges again."""
        store = MemoryStore(fake_clock, require_replica_ack=True)
        store.replicas_acknowledge = False
        token = _grant(fake_clock)
        await store.commit(APP, token)
        holder = CurrentSet(token)
        protocol = _protocol(store, fake_clock, holder)
        presented: list[str | None] = []

        async def fetch(refresh_token: str | None) -> TokenSet:
            presented.append(refresh_token)
            now = fake_clock.time()
            return TokenSet("at-ack-2", "Bearer", now, now + 60, None, "rt-ack-2")

        first = await protocol.refresh(fetch, is_due=lambda _: True, servable_left=10.0)
        assert isinstance(first, Blocked)
        store.replicas_acknowledge = True
        second = await protocol.refresh(fetch, is_due=lambda _: True, servable_left=10.0)
        assert isinstance(second, Fetched)
        assert presented == ["rt-ack-1"]

    async def test_the_memory_store_applies_the_record_then_raises(
        self, fake_clock: FakeClock
    ) -> None:
        """Like WAIT after the script, the record is written (on the primary) before the
        missing acknowledgement is reported."""
        store = MemoryStore(fake_clock, require_replica_ack=True)
        store.replicas_acknowledge = False
        token = _grant(fake_clock)
        await store.commit(APP, token)
        lease = await store.acquire_lease(APP, "r0", 10.0)
        await store.begin_spend(APP, owner="r0", fence=lease.fence, token=token)
        with pytest.raises(NotDurable):
            await store.mark_sent(APP, owner="r0", fence=lease.fence)
        assert store.state.spends[APP].state == "sent"


class TestCommitAndAbortWithoutAcknowledgement:
    """Issue 20 (swarm seeds 21255, 23291): a commit and an abort are waited for too. Without
    an acknowledgement the set is kept and served, and the abort is written again."""

    async def test_an_unacknowledged_commit_is_served_and_asked_again(
        self, fake_clock: FakeClock
    ) -> None:
        """The rotated set is committed on the primary and served (Fetched, stored);
        `commit.not_durable` is logged once; every sync repeats the commit until a replica
        acknowledges it, which ends `commit_unacknowledged` (the drain waits on it)."""
        store = MemoryStore(fake_clock, require_replica_ack=True)
        token = _grant(fake_clock)
        await store.commit(APP, token)
        holder = CurrentSet(token)
        protocol = _protocol(store, fake_clock, holder)

        async def fetch(refresh_token: str | None) -> TokenSet:
            store.replicas_acknowledge = False  # the replica goes away while on the wire
            now = fake_clock.time()
            return TokenSet("at-ack-2", "Bearer", now, now + 60, None, "rt-ack-2")

        with structlog.testing.capture_logs() as logs:
            outcome = await protocol.refresh(fetch, is_due=lambda _: True, servable_left=10.0)
            assert isinstance(outcome, Fetched) and outcome.persisted
            holder.token = outcome.token
            assert protocol.commit_unacknowledged
            assert await protocol.sync()
            assert protocol.commit_unacknowledged
        assert [e["event"] for e in logs].count("commit.not_durable") == 1
        assert store.state.tokens[APP].rank == outcome.token.rank  # on the primary
        store.replicas_acknowledge = True
        assert await protocol.sync()
        assert not protocol.commit_unacknowledged

    async def test_an_unacknowledged_abort_stays_unwritten_until_one_holds_it(
        self, fake_clock: FakeClock
    ) -> None:
        """A spend the server refused without acting (429) is aborted; no replica
        acknowledges the abort: it stays unwritten (`abort_unwritten`, which the drain waits
        on) and each sync writes it again until one does."""
        store = MemoryStore(fake_clock, require_replica_ack=True)
        token = _grant(fake_clock)
        await store.commit(APP, token)
        protocol = _protocol(store, fake_clock, CurrentSet(token))

        async def fetch(refresh_token: str | None) -> TokenSet:
            store.replicas_acknowledge = False
            raise TransientTokenError("http 429", status=429)

        with pytest.raises(TransientTokenError):
            await protocol.refresh(fetch, is_due=lambda _: True, servable_left=10.0)
        assert APP not in store.state.spends  # applied on the primary
        assert protocol.abort_unwritten
        assert await protocol.sync()  # the store answers: the sync reads on
        assert protocol.abort_unwritten
        store.replicas_acknowledge = True
        assert await protocol.sync()
        assert not protocol.abort_unwritten


def _config(tmp_path: Path, url: str, **store: object) -> Path:
    section: dict[str, object] = {"url": url, **store}
    if not url.startswith("memory://"):
        section["encryption_key_file"] = "store.key"
    return write_config(tmp_path, store=section)


class TestConfig:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("memory://", False),
            ("redis://127.0.0.1:6379/0", False),
            ("rediss://redis.internal:6380/0", False),
            ("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster", True),
            ("redis+cluster://10.0.0.1:7000,10.0.0.2:7000", True),
        ],
    )
    def test_the_default_follows_the_scheme(self, tmp_path: Path, url: str, expected: bool) -> None:
        """On by default where a failover replaces the primary by itself (Sentinel, Cluster),
        off for a single redis:// URL and memory://; the timeout defaults to 0.5 s."""
        store = load_config(_config(tmp_path, url)).store
        assert store.require_replica_ack is expected
        assert store.replica_ack_timeout == 0.5

    def test_a_plain_redis_url_may_turn_it_on_with_a_timeout(self, tmp_path: Path) -> None:
        """A redis:// primary with replicas of its own may require their acknowledgement."""
        store = load_config(
            _config(
                tmp_path,
                "redis://127.0.0.1:6379/0",
                require_replica_ack=True,
                replica_ack_timeout=0.25,
            )
        ).store
        assert (store.require_replica_ack, store.replica_ack_timeout) == (True, 0.25)

    def test_check_config_says_so(self, tmp_path: Path) -> None:
        """check-config's summary names the acknowledgement and its timeout when required."""
        on = load_config(_config(tmp_path, "redis+cluster://10.0.0.1:7000"))
        assert "a replica acknowledges each spend (WAIT, 0.5s)" in summarize(on)
        off = load_config(_config(tmp_path, "redis://127.0.0.1:6379/0"))
        assert "acknowledges" not in summarize(off)

    def test_a_wrong_url_is_the_one_mistake(self, tmp_path: Path) -> None:
        """With a mistyped scheme the scheme-dependent checks are left out: the timeout is not
        also reported as set without the acknowledgement."""
        with pytest.raises(ConfigError) as caught:
            load_config(
                _config(tmp_path, "redis+sentinal://10.0.0.1:26379/m", replica_ack_timeout=1)
            )
        assert caught.value.key == "store.url"

    def test_sentinel_may_turn_it_off(self, tmp_path: Path) -> None:
        """An operator may accept the split-brain risk on Sentinel (documented)."""
        store = load_config(
            _config(tmp_path, "redis+sentinel://10.0.0.1:26379/m", require_replica_ack=False)
        ).store
        assert store.require_replica_ack is False

    @pytest.mark.parametrize(
        ("url", "settings", "key", "reason"),
        [
            (
                "memory://",
                {"require_replica_ack": True},
                "store.require_replica_ack",
                "no replicas",
            ),
            (
                "redis://127.0.0.1:6379/0",
                {"require_replica_ack": "yes"},
                "store.require_replica_ack",
                "true or false",
            ),
            (
                "redis+cluster://10.0.0.1:7000",
                {"replica_ack_timeout": "10s"},
                "store.replica_ack_timeout",
                "at most 5s",
            ),
            (
                "redis+cluster://10.0.0.1:7000",
                {"replica_ack_timeout": 0},
                "store.replica_ack_timeout",
                "positive",
            ),
            (
                "redis://127.0.0.1:6379/0",
                {"replica_ack_timeout": 1},
                "store.replica_ack_timeout",
                "only when store.require_replica_ack is true",
            ),
        ],
    )
    def test_invalid_settings_name_their_key(
        self, tmp_path: Path, url: str, settings: dict[str, object], key: str, reason: str
    ) -> None:
        """Each invalid setting is a ConfigError naming the key and why."""
        with pytest.raises(ConfigError) as caught:
            load_config(_config(tmp_path, url, **settings))
        assert caught.value.key == key
        assert reason in caught.value.reason
