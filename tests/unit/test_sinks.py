"""SinkWriter and SinkSet with a fake clock and a fake refresher; files are real, in tmp_path."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker import policy
from broker.metrics import Metrics
from broker.model import AppSpec, RefreshPolicy, SinkFormat, SinkSpec, TokenSet
from broker.sinks import SinkSet, SinkWriter, render
from tests.support.fake_clock import FakeClock

LIFETIME = 100.0
MARGIN = 5.0  # the safety margin: deadlines fall between the writer's 30 s rechecks


async def inline(work: Callable[[], None]) -> None:
    """Runs file work at once on the loop, so the fake clock alone decides the order."""
    work()


class FakeHolder:
    """Implements TokenHolder: a token adopted by the test, servable by the fake clock."""

    def __init__(self, spec: AppSpec, clock: FakeClock) -> None:
        self.spec = spec
        self._clock = clock
        self.token: TokenSet | None = None
        self._listeners: list[Callable[[TokenSet], None]] = []

    @property
    def name(self) -> str:
        return self.spec.name

    def servable(self, min_ttl: float = 0.0) -> TokenSet | None:
        token = self.token
        if token is None:
            return None
        remaining = token.expires_at - self._clock.time()
        return token if policy.is_servable(remaining, token.lifetime, self.spec.refresh) else None

    def servable_until(self) -> float:
        token = self.token
        if token is None:
            return float("-inf")
        deadline = policy.serve_deadline(token, self.spec.refresh)
        return self._clock.monotonic() + deadline - self._clock.time()

    def add_listener(self, callback: Callable[[TokenSet], None]) -> None:
        self._listeners.append(callback)

    def adopt(self, token: TokenSet) -> None:
        self.token = token
        for listener in self._listeners:
            listener(token)


def new_token(
    clock: FakeClock, name: str = "access-token-one", lifetime: float = LIFETIME
) -> TokenSet:
    now = clock.time()
    return TokenSet(name + "-" + "x" * 30, "Bearer", now, now + lifetime, "read")


def app_spec(*sinks: SinkSpec, name: str = "app1") -> AppSpec:
    return AppSpec(
        name=name,
        token_url="https://auth.example/token",
        refresh=RefreshPolicy(safety_margin=MARGIN),
        sinks=sinks,
    )


def writes(metrics: Metrics, outcome: str, app: str = "app1") -> float:
    value = metrics.registry.get_sample_value(
        "token_broker_sink_writes_total", {"app": app, "outcome": outcome}
    )
    return value or 0.0


class Harness:
    """A writer running on the fake clock over one or more sinks."""

    def __init__(self, holder: FakeHolder, clock: FakeClock, metrics: Metrics) -> None:
        self.holder = holder
        self.clock = clock
        self.metrics = metrics
        self.writer = SinkWriter(holder, clock, metrics, run_io=inline)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.writer.run())
        await self.clock.settle()

    async def adopt(self, token: TokenSet) -> None:
        self.holder.adopt(token)
        await self.clock.settle()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def make(fake_clock: FakeClock, metrics: Metrics) -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def build(*sinks: SinkSpec) -> Harness:
        harness = Harness(FakeHolder(app_spec(*sinks), fake_clock), fake_clock, metrics)
        made.append(harness)
        return harness

    yield build
    for harness in made:
        await harness.stop()


class TestRender:
    def test_formats(self, fake_clock: FakeClock) -> None:
        """raw is the bare token, header an Authorization line, json the API's body."""
        token = new_token(fake_clock)
        assert render(SinkFormat.RAW, token, fake_clock.time()) == token.access_token.encode()
        assert (
            render(SinkFormat.HEADER, token, fake_clock.time())
            == f"Authorization: Bearer {token.access_token}".encode()
        )
        assert json.loads(render(SinkFormat.JSON, token, fake_clock.time() + 40)) == {
            "access_token": token.access_token,
            "token_type": "Bearer",
            "expires_at": int(token.expires_at),
            "expires_in": 60,
            "scope": "read",
        }

    def test_header_keeps_a_non_bearer_token_type(self, fake_clock: FakeClock) -> None:
        """A lower-case bearer is written as Bearer; another type is kept as the server gave it."""
        token = new_token(fake_clock)
        lower = TokenSet(token.access_token, "bearer", token.issued_at, token.expires_at)
        dpop = TokenSet(token.access_token, "DPoP", token.issued_at, token.expires_at)
        now = fake_clock.time()
        assert render(SinkFormat.HEADER, lower, now).startswith(b"Authorization: Bearer ")
        assert render(SinkFormat.HEADER, dpop, now).startswith(b"Authorization: DPoP ")


class TestSinkWriter:
    async def test_empties_the_file_at_startup_when_no_token_is_servable(
        self, tmp_path: Path, make: Callable[..., Harness], metrics: Metrics
    ) -> None:
        """A file left from an earlier run is emptied at once when there is no token yet."""
        path = tmp_path / "token"
        path.write_text("an-old-token-from-before")
        harness = make(SinkSpec(path))
        await harness.start()
        assert path.read_bytes() == b""
        assert writes(metrics, "truncated") == 1

    async def test_writes_each_format_and_mode_when_a_token_is_adopted(
        self, tmp_path: Path, make: Callable[..., Harness], fake_clock: FakeClock
    ) -> None:
        """Each sink gets the token in its format, with its mode."""
        raw = SinkSpec(tmp_path / "raw", SinkFormat.RAW, 0o640)
        header = SinkSpec(tmp_path / "header", SinkFormat.HEADER, 0o600)
        as_json = SinkSpec(tmp_path / "json", SinkFormat.JSON, 0o644)
        harness = make(raw, header, as_json)
        await harness.start()
        token = new_token(fake_clock)
        await harness.adopt(token)
        assert raw.path.read_text() == token.access_token
        assert header.path.read_text() == f"Authorization: Bearer {token.access_token}"
        assert json.loads(as_json.path.read_text())["access_token"] == token.access_token
        modes = {s.path.name: stat.S_IMODE(os.stat(s.path).st_mode) for s in (raw, header, as_json)}
        assert modes == {"raw": 0o640, "header": 0o600, "json": 0o644}

    async def test_writes_only_when_the_token_changes(
        self, tmp_path: Path, make: Callable[..., Harness], fake_clock: FakeClock, metrics: Metrics
    ) -> None:
        """The same token adopted again, or time passing, does not rewrite the file."""
        path = tmp_path / "token"
        harness = make(SinkSpec(path))
        await harness.start()
        first = new_token(fake_clock, "first")
        await harness.adopt(first)
        inode = os.stat(path).st_ino
        await harness.adopt(first)
        await fake_clock.advance(40)
        assert os.stat(path).st_ino == inode
        assert writes(metrics, "written") == 1
        second = new_token(fake_clock, "second")
        await harness.adopt(second)
        assert path.read_text() == second.access_token
        assert os.stat(path).st_ino != inode
        assert writes(metrics, "written") == 2

    async def test_empties_the_file_at_the_serving_deadline(
        self, tmp_path: Path, make: Callable[..., Harness], fake_clock: FakeClock, metrics: Metrics
    ) -> None:
        """The token stays until the API would stop serving it, and not a moment longer."""
        path = tmp_path / "token"
        harness = make(SinkSpec(path))
        await harness.start()
        token = new_token(fake_clock)
        await harness.adopt(token)
        deadline = policy.serve_deadline(token, harness.holder.spec.refresh)
        await fake_clock.advance(deadline - fake_clock.time() - 0.001)
        assert path.read_text() == token.access_token
        await fake_clock.advance(0.001)
        assert harness.holder.servable() is None
        assert path.read_bytes() == b""
        assert writes(metrics, "truncated") == 2  # at startup, and at the deadline

    async def test_a_token_that_is_not_servable_is_never_written(
        self, tmp_path: Path, make: Callable[..., Harness], fake_clock: FakeClock
    ) -> None:
        """A token adopted already inside its safety margin leaves the file empty."""
        path = tmp_path / "token"
        harness = make(SinkSpec(path))
        await harness.start()
        now = fake_clock.time()
        await harness.adopt(TokenSet("late-" + "x" * 30, "Bearer", now - 96, now + 4))
        assert path.read_bytes() == b""

    async def test_leaves_no_temporary_file_and_removes_a_crashed_ones(
        self, tmp_path: Path, make: Callable[..., Harness], fake_clock: FakeClock
    ) -> None:
        """Only the sink is in its directory after writes; a crash's leftover is deleted."""
        path = tmp_path / "token"
        (tmp_path / ".token.abc123.tmp").write_text("a token a crash left behind")
        (tmp_path / "unrelated").write_text("kept")
        harness = make(SinkSpec(path))
        await harness.start()
        await harness.adopt(new_token(fake_clock, "one"))
        await harness.adopt(new_token(fake_clock, "two"))
        names = sorted(p.name for p in tmp_path.iterdir())  # noqa: ASYNC240 - a test's tmp_path
        assert names == ["token", "unrelated"]

    async def test_a_failed_write_is_counted_logged_by_path_and_retried(
        self, tmp_path: Path, make: Callable[..., Harness], fake_clock: FakeClock, metrics: Metrics
    ) -> None:
        """A missing directory: error metric, a log line naming the path (no token); retried."""
        path = tmp_path / "not-yet" / "token"
        harness = make(SinkSpec(path))
        token = new_token(fake_clock)
        with capture_logs() as logs:
            await harness.start()
            await harness.adopt(token)
        failed = [line for line in logs if line["event"] == "sink.write_failed"]
        assert failed[0]["path"] == str(path)
        assert failed[0]["error"] == "No such file or directory"
        assert token.access_token not in repr(logs)
        assert writes(metrics, "error") >= 1
        path.parent.mkdir()
        await fake_clock.advance(30)  # at most the backoff cap
        assert path.read_text() == token.access_token


class TestSinkSet:
    async def test_detach_empties_the_files_of_a_removed_app(
        self, tmp_path: Path, fake_clock: FakeClock, metrics: Metrics
    ) -> None:
        """When an app is removed its files are emptied: nobody would empty them later."""
        path = tmp_path / "token"
        holder = FakeHolder(app_spec(SinkSpec(path)), fake_clock)
        sinks = SinkSet(fake_clock, metrics, run_io=inline)
        await sinks.attach(holder)
        sinks.start()
        holder.adopt(new_token(fake_clock))
        await fake_clock.settle()
        assert path.read_bytes() != b""
        await sinks.detach("app1")
        assert path.read_bytes() == b""
        assert sinks.writers == {}

    async def test_reattach_empties_only_the_paths_the_new_spec_dropped(
        self, tmp_path: Path, fake_clock: FakeClock, metrics: Metrics
    ) -> None:
        """A reloaded app keeps its remaining files; a dropped file is emptied."""
        kept, dropped = tmp_path / "kept", tmp_path / "dropped"
        old = FakeHolder(app_spec(SinkSpec(kept), SinkSpec(dropped)), fake_clock)
        sinks = SinkSet(fake_clock, metrics, run_io=inline)
        await sinks.attach(old)
        sinks.start()
        token = new_token(fake_clock)
        old.adopt(token)
        await fake_clock.settle()
        new = FakeHolder(app_spec(SinkSpec(kept)), fake_clock)
        new.token = token
        await sinks.attach(new)
        await fake_clock.settle()
        assert dropped.read_bytes() == b""
        assert kept.read_text() == token.access_token
        await sinks.close()

    async def test_close_empties_every_file(
        self, tmp_path: Path, fake_clock: FakeClock, metrics: Metrics
    ) -> None:
        """On shutdown every file is emptied (its deadline would pass with nobody to act)."""
        a, b = tmp_path / "a", tmp_path / "b"
        holders = [
            FakeHolder(app_spec(SinkSpec(a), name="app1"), fake_clock),
            FakeHolder(app_spec(SinkSpec(b), name="app2"), fake_clock),
        ]
        sinks = SinkSet(fake_clock, metrics, run_io=inline)
        for holder in holders:
            await sinks.attach(holder)
        sinks.start()
        for holder in holders:
            holder.adopt(new_token(fake_clock))
        await fake_clock.settle()
        assert a.read_bytes() != b"" and b.read_bytes() != b""
        await sinks.close()
        assert a.read_bytes() == b"" and b.read_bytes() == b""

    async def test_an_app_without_sinks_gets_no_writer(
        self, fake_clock: FakeClock, metrics: Metrics
    ) -> None:
        """Apps without sinks cost nothing."""
        sinks = SinkSet(fake_clock, metrics, run_io=inline)
        await sinks.attach(FakeHolder(app_spec(), fake_clock))
        assert sinks.writers == {}
