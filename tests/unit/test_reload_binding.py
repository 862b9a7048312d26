"""A config reload that changes an app's client binding (issue 20, M6).

The new binding is a new name in the store: the old set is not used. An authorization-code app
answers 409 naming what changed and asking for `token-broker authorize`; the old binding's set
stays in the store, untouched.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.app import build_broker, reload_config
from broker.config import load_config
from broker.errors import NeedsAuthorization
from broker.model import AppState, TokenSet
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FakeTokenSource


def _write(path: Path, client_id: str) -> Path:
    (path.parent / "secret").write_text("s" * 32 + "\n")
    (path.parent / "store.key").write_text("k1 " + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n")
    config: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
        # (Never opened: the test hands the broker a MemoryStore.)
        "store": {"url": "redis://127.0.0.1:9", "encryption_key_file": "store.key"},
        "apps": {
            "app1": {
                "grant_type": "authorization_code",
                "token_url": "http://127.0.0.1:9/token",
                "authorize_url": "http://127.0.0.1:9/authorize",
                "redirect_uri": "http://127.0.0.1:9/callback",
                "client_id": client_id,
                "client_secret_file": "secret",
                "scopes": ["scim"],
            }
        },
        "clients": {},
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def _settle(clock: FakeClock) -> None:
    for _ in range(20):
        await clock.advance(0.1)


async def test_a_changed_client_id_asks_for_authorization_and_names_it(tmp_path: Path) -> None:
    """After a reload with another client id the app answers needs_authorization naming the
    changed binding; the old client's set is neither used nor touched."""
    path = _write(tmp_path / "config.yaml", "client-a")
    clock = FakeClock()
    store = MemoryStore(clock)
    broker = await build_broker(load_config(path), clock=clock, store=store, owner="r0")
    old = broker.core.refreshers["app1"]
    now = clock.time()
    grant = TokenSet("at-a", "Bearer", now, now + 3600, None, "rt-a", lineage=1, generation=1)
    await store.commit(old.store_name, grant)
    core = asyncio.create_task(broker.core.run())
    try:
        await _settle(clock)
        assert (await broker.core.get_token("app1")).access_token == "at-a"
        assert await reload_config(broker, _write(path, "client-b"))
        new = broker.core.refreshers["app1"]
        new.source = FakeTokenSource(clock)  # nothing may be requested
        await _settle(clock)
        assert new.store_name != old.store_name
        assert new.state is AppState.NEEDS_AUTHORIZATION
        with pytest.raises(NeedsAuthorization) as refused:
            await broker.core.get_token("app1")
        message = str(refused.value)
        assert "client binding changed (client_id)" in message
        assert "token-broker authorize" in message
        stored = await store.load(old.store_name)
        assert stored is not None and stored.access_token == "at-a"
        assert await store.load(new.store_name) is None
    finally:
        core.cancel()
        await asyncio.gather(core, return_exceptions=True)
        await broker.session.close()
