"""A config reload that replaces an app's refresher (issue 20, Low): the new refresher takes a
new owner name, so a store record under the old name is not mistaken for its own, and keeps
what the old one knew of spends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.app import Broker, build_broker, reload_config
from broker.config import load_config
from broker.model import TokenSet
from broker.store import SpendStart
from broker.store.memory import MemoryStore, _Spend
from tests.support.broker_process import BrokerFiles
from tests.support.config import Document, edit_config

STORED = TokenSet("at-1", "Bearer", 0.0, 3600.0, None, "rt-1", lineage=1, generation=4)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A broker built (not started) on memory://, its app1 set stored."""
    path = BrokerFiles(tmp_path, token_url="http://127.0.0.1:9/token").write()
    built = await build_broker(load_config(path))
    await built.store.commit("app1", STORED)
    try:
        yield built
    finally:
        await built.session.close()


def edit(broker: Broker, path: Path, **app1: Any) -> Path:
    """Change app1's settings in the config file."""

    def change(config: Document) -> None:
        for key, value in app1.items():
            if key == "refresh":
                config["apps"]["app1"]["refresh"].update(value)
            else:
                config["apps"]["app1"][key] = value

    return edit_config(path, change)


class TestReloadOfAChangedApp:
    async def test_the_new_refresher_has_a_new_owner_name(
        self, broker: Broker, tmp_path: Path
    ) -> None:
        """The old refresher's record (an unknown spend a grace retry restored, under no
        fence) answers UNKNOWN to the new refresher, which has a name of its own. Under the old
        name too: fence 0 names no spend, so no caller takes that record for its own ended
        spend (the old store did, for its retrier: swarm seed 177)."""
        store = broker.store
        assert isinstance(store, MemoryStore)
        old = broker.core.refreshers["app1"]
        old_owner = old.fleet._owner
        fp = STORED.refresh_fingerprint or ""
        store.state.spends["app1"] = _Spend(
            0, old_owner, fp, STORED.rank, state="unknown", retries=1
        )
        assert await reload_config(
            broker, edit(broker, tmp_path / "config.yaml", refresh={"safety_margin": 7})
        )
        new = broker.core.refreshers["app1"]
        assert new is not old
        new_owner = new.fleet._owner
        assert new_owner != old_owner and new_owner.startswith(old_owner)
        lease = await store.acquire_lease("app1", new_owner, 30.0)
        answer = await store.begin_spend("app1", owner=new_owner, fence=lease.fence, token=STORED)
        assert answer is SpendStart.UNKNOWN
        await store.release_lease("app1", new_owner, lease.fence)
        lease = await store.acquire_lease("app1", old_owner, 30.0)
        assert (
            await store.begin_spend("app1", owner=old_owner, fence=lease.fence, token=STORED)
            is SpendStart.UNKNOWN
        )

    async def test_the_spend_memory_is_carried_over(self, broker: Broker, tmp_path: Path) -> None:
        """Unknown spends, other replicas' sent tokens, a token still on the wire, the highest
        rank seen: all known to the new refresher after a reload of the same grant."""
        old = broker.core.refreshers["app1"].fleet
        old.memory.unknown.add("fp-unknown")
        old.memory.foreign["fp-foreign"] = (1.0, "other-replica")
        old.in_flight = "fp-on-the-wire"
        old.note_rank((1, 9))
        assert await reload_config(
            broker, edit(broker, tmp_path / "config.yaml", refresh={"safety_margin": 7})
        )
        new = broker.core.refreshers["app1"].fleet
        assert "fp-unknown" in new.memory.unknown
        assert new.memory.foreign["fp-foreign"] == (1.0, "other-replica")
        assert new.memory.foreign["fp-on-the-wire"][1] == old._owner
        assert new._seen_rank == (1, 9)

    async def test_another_grant_keeps_the_spends_but_not_the_ranks(
        self, broker: Broker, tmp_path: Path
    ) -> None:
        """A changed client id is another grant: the ranks of the old one say nothing about
        it, so only the spend memory (keyed by refresh-token fingerprint) is kept."""
        old = broker.core.refreshers["app1"].fleet
        old.memory.unknown.add("fp-unknown")
        old.note_rank((1, 9))
        assert await reload_config(
            broker, edit(broker, tmp_path / "config.yaml", client_id="another-client")
        )
        new = broker.core.refreshers["app1"].fleet
        assert "fp-unknown" in new.memory.unknown
        assert new._seen_rank == (0, 0)
