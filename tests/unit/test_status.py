"""The status document (broker/status.py): one row per app from the store's facts, the right
state word for each situation, valid against the schema docs/contract.md prints, rendered as a
table and in full without a token, a fingerprint or a secret; and GET /v1/status off by default."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.api.health import build_metrics_app
from broker.app import Broker, build_broker, fleet_status
from broker.cli import EXIT_USAGE, main
from broker.config import load_config
from broker.errors import StoreUnavailable
from broker.metrics import Metrics
from broker.model import AppSpec, GrantType, RefreshPolicy, TokenSet
from broker.status import (
    STATUS_SCHEMA,
    AppTarget,
    ReplicaView,
    collect,
    render_detail,
    render_table,
)
from broker.store import SpendEnd
from broker.store.memory import MemoryStore
from tests.support.broker_process import BrokerFiles
from tests.support.fake_clock import FakeClock

ROOT = Path(__file__).resolve().parents[2]
NAME = "app1@0123456789abcdef"
SPEC = AppSpec(
    name="app1",
    token_url="https://idp.example/token",
    grant_type=GrantType.AUTHORIZATION_CODE,
    refresh=RefreshPolicy(safety_margin=30.0),
    max_token_requests_per_minute=10,
)
ACCESS = "access-token-value-0123456789"
REFRESH = "refresh-token-value-0123456789"
VALIDATOR = jsonschema_rs.Draft7Validator(STATUS_SCHEMA)


def stored_set(clock: FakeClock) -> TokenSet:
    """A set issued now, living an hour, at rank (7, 3)."""
    now = clock.time()
    return TokenSet(ACCESS, "Bearer", now, now + 3600, None, REFRESH, lineage=7, generation=3)


@pytest.fixture
async def store(fake_clock: FakeClock) -> MemoryStore:
    """A memory store holding app1's set."""
    memory = MemoryStore(fake_clock)
    await memory.commit(NAME, stored_set(fake_clock))
    return memory


async def row_of(store: MemoryStore, replica: ReplicaView | None = None) -> dict[str, Any]:
    """The document's one row, after checking the document against the schema."""
    document = await collect(
        store,
        [AppTarget(SPEC, NAME)],
        {"app1": replica} if replica is not None else None,
        source="store",
    )
    VALIDATOR.validate(document)
    (row,) = document["apps"]
    assert isinstance(row, dict)
    return row


def printed_forms(document: dict[str, Any]) -> str:
    """Everything status can print of a document: JSON, table, each app in full."""
    now = float(document["now"])
    return "\n".join(
        [json.dumps(document), render_table(document)]
        + [render_detail(row, now) for row in document["apps"]]
    )


class TestRows:
    async def test_fresh(self, store: MemoryStore, fake_clock: FakeClock) -> None:
        """A stored set and nothing going on: fresh, with its rank, expiry and the fleet's due
        time (in whole seconds, inside the refresh window)."""
        row = await row_of(store)
        assert row["state"] == "fresh"
        token = row["token"]
        assert (token["lineage"], token["generation"], token["version"]) == (7, 3, 1)
        assert token["expires_in"] == 3600
        due = token["refresh_due_at"]
        assert due == int(due)
        assert fake_clock.time() + 900 <= due <= fake_clock.time() + 3570
        assert row["lease"] is None and row["spend"] is None and row["failure"] is None
        assert row["budget"] == {"limit_per_minute": 10, "used": 0, "left": 10}

    async def test_refreshing_with_the_lease_and_a_sent_spend(
        self, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """The lease holder's spend, sent 5 s ago: refreshing, holder, fence and age shown."""
        lease = await store.acquire_lease(NAME, "pod-a-1-cafe", 30.0)
        await store.begin_spend(
            NAME, owner="pod-a-1-cafe", fence=lease.fence, token=stored_set(fake_clock)
        )
        await store.mark_sent(NAME, owner="pod-a-1-cafe", fence=lease.fence)
        await fake_clock.advance(5.0)
        row = await row_of(store)
        assert row["state"] == "refreshing"
        assert row["lease"]["holder"] == "pod-a-1-cafe"
        assert row["lease"]["fence"] == lease.fence == row["fence"]
        assert row["lease"]["expires_in"] == pytest.approx(25.0)
        assert row["spend"]["state"] == "sent"
        assert row["spend"]["age"] == pytest.approx(5.0)
        assert (row["spend"]["lineage"], row["spend"]["generation"]) == (7, 3)

    async def test_outcome_unknown_outranks_everything(
        self, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """An unknown spend is the most urgent word, even during a backoff."""
        lease = await store.acquire_lease(NAME, "pod-a", 30.0)
        await store.begin_spend(
            NAME, owner="pod-a", fence=lease.fence, token=stored_set(fake_clock)
        )
        await store.mark_sent(NAME, owner="pod-a", fence=lease.fence)
        await store.end_spend(NAME, owner="pod-a", fence=lease.fence, outcome=SpendEnd.UNKNOWN)
        await store.record_failure(
            NAME, failures=2, not_before=fake_clock.time() + 60, error="x", permanent=False
        )
        row = await row_of(store)
        assert row["state"] == "outcome_unknown"
        assert row["spend"]["state"] == "unknown"

    async def test_backoff_with_error_count_and_budget(
        self, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """A shared failure whose not_before is ahead: backoff, its error, count and wait;
        the budget counts the requests of the last minute only."""
        now = fake_clock.time()
        await store.take_budget(NAME, 10, now - 61)
        for offset in (30, 10):
            await store.take_budget(NAME, 10, now - offset)
        await store.record_failure(
            NAME, failures=3, not_before=now + 42, error="transient: http 503", permanent=False
        )
        row = await row_of(store)
        assert row["state"] == "backoff"
        assert row["failure"]["retry_in"] == 42
        assert row["failure"]["failures"] == 3
        assert row["failure"]["error"] == "transient: http 503"
        assert row["budget"] == {"limit_per_minute": 10, "used": 2, "left": 8}

    async def test_backoff_over_no_token_and_a_lapsed_failure(self, fake_clock: FakeClock) -> None:
        """Nothing stored: no_token; a failure whose not_before passed is shown, not backoff."""
        empty = MemoryStore(fake_clock)
        assert (await row_of(empty))["state"] == "no_token"
        await empty.record_failure(
            NAME, failures=1, not_before=fake_clock.time() + 5, error="e", permanent=True
        )
        assert (await row_of(empty))["state"] == "backoff"
        await fake_clock.advance(6)
        row = await row_of(empty)
        assert row["state"] == "no_token"
        assert row["failure"]["retry_in"] == 0 and row["failure"]["permanent"]

    async def test_expired(self, store: MemoryStore, fake_clock: FakeClock) -> None:
        """A stored set past its expiry, nothing else: expired."""
        await fake_clock.advance(3601)
        assert (await row_of(store))["state"] == "expired"

    async def test_the_replica_view_is_added(self, store: MemoryStore) -> None:
        """What this replica knows (its state, readiness, next attempt, error) is in the row."""
        view = ReplicaView("failing", False, 1_700_000_100.0, "transient: http 500")
        row = await row_of(store, view)
        assert row["replica"] == {
            "state": "failing",
            "ready": False,
            "next_refresh_at": 1_700_000_100.0,
            "last_error": "transient: http 500",
        }
        assert "fresh (here: failing)" in render_table({"now": 1_700_000_000.0, "apps": [row]})


class TestNothingSecret:
    async def test_no_token_or_fingerprint_in_any_form(
        self, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """JSON, table and detail show neither token nor either fingerprint the store keeps."""
        token = stored_set(fake_clock)
        lease = await store.acquire_lease(NAME, "pod-a", 30.0)
        await store.begin_spend(NAME, owner="pod-a", fence=lease.fence, token=token)
        document = await collect(store, [AppTarget(SPEC, NAME)], source="store")
        text = printed_forms(document)
        for value in (ACCESS, REFRESH, token.fingerprint, token.refresh_fingerprint or "?"):
            assert value not in text


class TestSchemaInTheContract:
    def test_contract_prints_the_schema(self) -> None:
        """docs/contract.md's status schema is STATUS_SCHEMA, word for word."""
        text = (ROOT / "docs" / "contract.md").read_text()
        block = re.search(r"<!-- status-schema -->\n```json\n(.*?)\n```", text, re.S)
        assert block is not None
        assert json.loads(block.group(1)) == STATUS_SCHEMA


class TestStatusEndpoint:
    @pytest.fixture
    async def broker(self, tmp_path: Path) -> AsyncIterator[Broker]:
        """A broker built (not started) on memory://, app1's set stored under its name."""
        files = BrokerFiles(tmp_path, token_url="http://127.0.0.1:9/token")
        built = await build_broker(load_config(files.write()))
        refresher = built.core.refreshers["app1"]
        now = built.clock.time()
        await built.store.commit(
            refresher.store_name, TokenSet(ACCESS, "Bearer", now, now + 600, None, None, 1, 1)
        )
        try:
            yield built
        finally:
            await built.session.close()

    async def test_off_by_default(self, broker: Broker) -> None:
        """Without a status provider (server.status_endpoint false) the path is 404."""
        assert broker.config.server.status_endpoint is False
        async with TestClient(TestServer(build_metrics_app(broker.core, Metrics()))) as client:
            response = await client.get("/v1/status")
            assert response.status == 404

    async def test_on_it_answers_the_document(self, broker: Broker) -> None:
        """With it on, the store's row and this replica's view, valid against the schema."""
        app = build_metrics_app(broker.core, Metrics(), status=lambda: fleet_status(broker))
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/v1/status")
            assert response.status == 200
            document = await response.json()
        VALIDATOR.validate(document)
        (row,) = document["apps"]
        assert document["source"] == "replica"
        assert row["state"] == "fresh" and 590 < row["token"]["expires_in"] <= 600
        assert row["replica"]["state"] == "refreshing"  # built, not started: nothing adopted
        assert ACCESS not in json.dumps(document)

    async def test_store_down_is_503(self, broker: Broker) -> None:
        """A store that cannot be read answers 503 store_unavailable, not a partial table."""
        store = broker.store
        assert isinstance(store, MemoryStore)
        store.fail = True
        app = build_metrics_app(broker.core, Metrics(), status=lambda: fleet_status(broker))
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/v1/status")
            assert response.status == 503
            assert (await response.json())["error"] == "store_unavailable"
        with pytest.raises(StoreUnavailable):
            await fleet_status(broker)


class TestCommand:
    def test_memory_store_is_refused_naming_the_endpoint(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """memory:// lives in one process: exit 2, pointing at GET /v1/status."""
        config = BrokerFiles(tmp_path, token_url="http://127.0.0.1:9/token").write()
        assert main(["status", "--config", str(config)]) == EXIT_USAGE
        assert "/v1/status" in capsys.readouterr().err

    def test_unknown_app_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--app names an app of the config, or the command exits 2 naming --app."""
        files = BrokerFiles(tmp_path, "http://127.0.0.1:9/token", store_url="redis://127.0.0.1:9")
        assert main(["status", "--config", str(files.write()), "--app", "nope"]) == EXIT_USAGE
        assert "--app" in capsys.readouterr().err
