"""Token files ("sinks") for programs that can only read a file: cron jobs, scripts, vendor tools.

One SinkWriter per app with sinks. It writes the token the app serves to each of its files when
that token changes, and only then, and empties the files when no token is servable: at the
token's serving deadline (scheduled on the injected clock), at startup before a token exists,
when the app is removed and when the broker stops. A reader therefore finds the current token or
an empty file, never an expired token. Every write replaces the file atomically (a temporary
file in the same directory, fsync, rename, fsync of the directory), so a reader never sees a
partial file. The writer follows the refresher through `add_listener`; which store is in use, and
which replica refreshed, does not matter: every replica adopts the same tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Protocol

from broker import policy
from broker.clock import Clock, Wake
from broker.logs import RateLimitedLog, get_logger
from broker.metrics import Metrics
from broker.model import AppSpec, SinkFormat, SinkSpec, TokenSet

log = get_logger(__name__)

# The writer looks at the clock at least this often, so a wall-clock step is noticed.
MAX_WAIT = 30.0
# A sink that keeps failing is logged at most this often (every failure is counted).
FAILURE_LOG_INTERVAL = 300.0

IoRunner = Callable[[Callable[[], None]], Awaitable[None]]


class TokenHolder(Protocol):
    """What a SinkWriter needs of an app's refresher."""

    spec: AppSpec

    @property
    def name(self) -> str:
        """The app's name."""
        ...

    def servable(self, min_ttl: float = 0.0) -> TokenSet | None:
        """The token the API would serve now, or None."""
        ...

    def servable_until(self) -> float:
        """The monotonic time after which the current token stops being servable."""
        ...

    def add_listener(self, callback: Callable[[TokenSet], None]) -> None:
        """Have `callback` called after each token the refresher adopts."""
        ...


async def _in_thread(work: Callable[[], None]) -> None:
    """File writes (and their fsyncs) run off the event loop, so serving never waits on a disk."""
    await asyncio.to_thread(work)


def render(sink_format: SinkFormat, token: TokenSet, now: float) -> bytes:
    """The file content of `token` in `sink_format` (no trailing newline)."""
    if sink_format is SinkFormat.RAW:
        return token.access_token.encode()
    if sink_format is SinkFormat.HEADER:
        scheme = "Bearer" if token.token_type.lower() == "bearer" else token.token_type
        return f"Authorization: {scheme} {token.access_token}".encode()
    # The API's answer body, as of the moment the file is written.
    return json.dumps(
        {
            "access_token": token.access_token,
            "token_type": token.token_type,
            "expires_at": int(token.expires_at),
            "expires_in": max(0, int(token.expires_at - now)),
            "scope": token.scope,
        }
    ).encode()


def write_atomically(sink: SinkSpec, data: bytes) -> None:
    """Replace the sink's file by one holding `data`, with the sink's mode and ownership.

    The content goes to a temporary file in the same directory, is fsynced, gets its mode and
    owner, and is renamed over the old file; the directory is fsynced so the rename survives a
    crash. A reader opens either the old file or the new one, never a partial one.
    """
    directory = sink.path.parent
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{sink.path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
            if sink.owner is not None or sink.group is not None:
                owner = -1 if sink.owner is None else sink.owner
                group = -1 if sink.group is None else sink.group
                os.fchown(out.fileno(), owner, group)
            os.fchmod(out.fileno(), sink.mode)
        os.replace(temporary, sink.path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def remove_leftovers(sink: SinkSpec) -> None:
    """Delete temporary files a crashed writer left beside the sink (they may hold a token)."""
    with contextlib.suppress(OSError):
        for leftover in sink.path.parent.glob(f".{sink.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()


class SinkWriter:
    """Keeps one app's token files in step with the token the app serves."""

    def __init__(
        self,
        holder: TokenHolder,
        clock: Clock,
        metrics: Metrics,
        *,
        run_io: IoRunner = _in_thread,
    ) -> None:
        self.app = holder.name
        self.sinks = holder.spec.sinks
        self._holder = holder
        self._policy = holder.spec.refresh
        self._clock = clock
        self._metrics = metrics
        self._run_io = run_io
        # What each file holds: a token's fingerprint, "" for empty, None when unknown (not yet
        # written, or the last write failed).
        self._shown: dict[Path, str | None] = {sink.path: None for sink in self.sinks}
        self._failures = 0
        self._failure_log = RateLimitedLog(FAILURE_LOG_INTERVAL)
        self._wake = Wake()
        holder.add_listener(self.notify)

    def notify(self, _: TokenSet) -> None:
        """The refresher adopted a token: look again now."""
        self._wake.set()

    async def run(self) -> None:
        """Write on every change, empty at every serving deadline, until cancelled."""
        for sink in self.sinks:
            await self._run_io(functools.partial(remove_leftovers, sink))
        while True:
            self._wake.clear()
            token = self._holder.servable()
            if await self._show(token):
                self._failures = 0
                wait = MAX_WAIT
            else:
                self._failures += 1
                wait = policy.backoff(self._failures)
            if token is not None:
                # The moment the API stops serving this token, the files stop holding it: the
                # refresher's deadline, by every clock (issue 20, M3), on the monotonic clock.
                wait = min(wait, self._holder.servable_until() - self._clock.monotonic())
            await self._wake.sleep(self._clock, max(0.0, wait))

    async def empty(self, keep: Collection[Path] = ()) -> None:
        """Empty every file (except those in `keep`): the app is removed or the broker stops."""
        for sink in self.sinks:
            if sink.path not in keep and self._shown[sink.path] != "":
                await self._write(sink, None)

    async def _show(self, token: TokenSet | None) -> bool:
        """Make every file hold `token` (None: be empty). False when a write failed."""
        wanted = "" if token is None else token.fingerprint
        ok = True
        for sink in self.sinks:
            if self._shown[sink.path] != wanted:
                ok = await self._write(sink, token) and ok
        return ok

    async def _write(self, sink: SinkSpec, token: TokenSet | None) -> bool:
        data = b"" if token is None else render(sink.format, token, self._clock.time())
        try:
            await self._run_io(functools.partial(write_atomically, sink, data))
        except Exception as exc:  # the loop must live on to empty the file at the deadline
            self._shown[sink.path] = None
            self._metrics.sink_writes.labels(app=self.app, outcome="error").inc()
            reason = (exc.strerror if isinstance(exc, OSError) else None) or type(exc).__name__
            if self._failure_log.allow((str(sink.path), reason), self._clock.monotonic()):
                log.error("sink.write_failed", app=self.app, path=str(sink.path), error=reason)
            return False
        if token is None:
            self._shown[sink.path] = ""
            self._metrics.sink_writes.labels(app=self.app, outcome="truncated").inc()
            log.info("sink.truncated", app=self.app, path=str(sink.path))
        else:
            self._shown[sink.path] = token.fingerprint
            self._metrics.sink_writes.labels(app=self.app, outcome="written").inc()
            log.info(
                "sink.written",
                app=self.app,
                path=str(sink.path),
                token_fingerprint=token.fingerprint,
            )
        return True


class SinkSet:
    """Every app's SinkWriter: attached as apps are built or reloaded, run, and stopped."""

    def __init__(self, clock: Clock, metrics: Metrics, *, run_io: IoRunner = _in_thread) -> None:
        self._clock = clock
        self._metrics = metrics
        self._run_io = run_io
        self._writers: dict[str, SinkWriter] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False

    @property
    def writers(self) -> dict[str, SinkWriter]:
        """The writer of each app that has sinks."""
        return self._writers

    async def attach(self, holder: TokenHolder) -> None:
        """Follow `holder` (a new or reloaded app); files its old spec had and the new lacks
        are emptied."""
        keep = {sink.path for sink in holder.spec.sinks}
        await self._stop(holder.name, keep=keep)
        if not holder.spec.sinks:
            return
        writer = SinkWriter(holder, self._clock, self._metrics, run_io=self._run_io)
        self._writers[holder.name] = writer
        if self._running:
            self._start(writer)

    async def detach(self, app: str) -> None:
        """The app is removed: stop its writer and empty its files."""
        await self._stop(app, keep=())

    def start(self) -> None:
        """Start every writer (and those attached later)."""
        self._running = True
        for writer in self._writers.values():
            self._start(writer)

    async def close(self) -> None:
        """Stop every writer and empty every file: nobody will empty them at their deadline."""
        self._running = False
        for app in list(self._writers):
            await self._stop(app, keep=())

    def _start(self, writer: SinkWriter) -> None:
        self._tasks[writer.app] = asyncio.create_task(writer.run(), name=f"sinks-{writer.app}")

    async def _stop(self, app: str, *, keep: Collection[Path]) -> None:
        writer = self._writers.pop(app, None)
        task = self._tasks.pop(app, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if writer is not None:
            await writer.empty(keep)
