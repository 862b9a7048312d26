"""Log levels say how much a line needs a person: success info, transient warning, permanent error."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, MutableMapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.errors import PermanentTokenError, TokenUnavailable, TransientTokenError
from broker.logs import audit, get_logger
from broker.metrics import Metrics
from broker.model import AppSpec, GrantType, RefreshPolicy
from broker.observe import Observer
from broker.refresher import AppRefresher
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FakeTokenSource


def refresher(clock: FakeClock, source: FakeTokenSource, grant: GrantType) -> AppRefresher:
    spec = AppSpec(
        name="app1",
        token_url="http://127.0.0.1/token",
        grant_type=grant,
        refresh=RefreshPolicy(min_remaining=5, safety_margin=3),
    )
    return AppRefresher(
        spec,
        source,
        MemoryStore(clock),
        clock,
        Observer(Metrics()),
        owner="r1",
        rng=random.Random(1),
    )


@pytest.fixture
async def tasks() -> AsyncIterator[list[asyncio.Task[None]]]:
    running: list[asyncio.Task[None]] = []
    yield running
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


def levels(logs: Sequence[MutableMapping[str, Any]], event: str) -> list[object]:
    return [line["log_level"] for line in logs if line["event"] == event]


class TestAuditLevels:
    @pytest.mark.parametrize("level", ["info", "warning", "error"])
    def test_audit_writes_at_the_level_asked(self, level: str) -> None:
        """audit(level=...) keeps `audit: true` and writes at that level."""
        with capture_logs() as logs:
            audit(get_logger("t"), "token.refresh_failed", level=level, app="a")  # type: ignore[arg-type]
        assert logs == [
            {"event": "token.refresh_failed", "audit": True, "app": "a", "log_level": level}
        ]

    def test_audit_defaults_to_info(self) -> None:
        """Without a level an audit event is info (a success, a change)."""
        with capture_logs() as logs:
            audit(get_logger("t"), "token.refreshed", app="a")
        assert logs[0]["log_level"] == "info"


class TestRefresherLevels:
    async def test_success_is_info(self, fake_clock: FakeClock) -> None:
        """token.refreshed is info."""
        with capture_logs() as logs:
            await refresher(
                fake_clock, FakeTokenSource(fake_clock), GrantType.CLIENT_CREDENTIALS
            ).get()
        assert levels(logs, "token.refreshed") == ["info"]

    @pytest.mark.parametrize(
        ("failure", "level"),
        [
            pytest.param(
                PermanentTokenError("rejected", status=401, error="invalid_client"),
                "error",
                id="permanent-invalid_client",
            ),
            pytest.param(
                TransientTokenError("HTTP 503", status=503), "warning", id="transient-503"
            ),
        ],
    )
    async def test_failure_levels(
        self, fake_clock: FakeClock, failure: Exception, level: str
    ) -> None:
        """token.refresh_failed is an error when permanent, a warning when transient."""
        source = FakeTokenSource(fake_clock)
        source.failure = failure  # type: ignore[assignment]
        with capture_logs() as logs, pytest.raises(TokenUnavailable):
            await refresher(fake_clock, source, GrantType.CLIENT_CREDENTIALS).get()
        assert levels(logs, "token.refresh_failed") == [level]

    async def test_needs_authorization_is_an_error(
        self, fake_clock: FakeClock, tasks: list[asyncio.Task[None]]
    ) -> None:
        """app.needs_authorization (no grant stored) is an error: a person must act."""
        app = refresher(fake_clock, FakeTokenSource(fake_clock), GrantType.AUTHORIZATION_CODE)
        with capture_logs() as logs:
            tasks.append(asyncio.create_task(app.run()))
            for _ in range(20):
                await asyncio.sleep(0)
        assert levels(logs, "app.needs_authorization") == ["error"]
