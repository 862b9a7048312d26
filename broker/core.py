"""The broker core: every app's refresher, the store watcher, readiness. Implements TokenService."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence

from broker.clock import Clock
from broker.errors import StoreUnavailable
from broker.logs import get_logger
from broker.metrics import Metrics
from broker.model import TokenSet
from broker.refresher import AppRefresher
from broker.service import AppStatus
from broker.store import TokenStore

log = get_logger(__name__)

STORE_RETRY_MIN = 0.5
# Short: a replica that reconnects late hears late of other replicas' spends and commits.
STORE_RETRY_MAX = 5.0


class BrokerCore:
    """Owns the refreshers of all apps and answers the API from memory."""

    def __init__(
        self,
        refreshers: Mapping[str, AppRefresher],
        store: TokenStore,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self.refreshers: dict[str, AppRefresher] = dict(refreshers)
        # Notices name the set they are about by its store name (app and client binding): a
        # notice of another binding (another fleet, or the old config) reaches no refresher.
        self._by_store_name = {r.store_name: r for r in self.refreshers.values()}
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False
        self.draining = False

    # ---- TokenService --------------------------------------------------------------------

    def app_names(self) -> Collection[str]:
        """Every configured app."""
        return self.refreshers.keys()

    def now(self) -> float:
        """Wall time from the injected clock."""
        return self._clock.time()

    def cached_token(self, app: str, min_ttl: float = 0.0) -> TokenSet | None:
        """The in-memory token of `app` if servable with `min_ttl` seconds left."""
        return self.refreshers[app].servable(min_ttl)

    def current_token(self, app: str) -> TokenSet | None:
        """The in-memory token of `app`, servable or not."""
        return self.refreshers[app].token

    def remaining(self, app: str) -> float:
        """Seconds the current token of `app` has left, by every clock."""
        return self.refreshers[app].remaining()

    def servable_until(self, app: str) -> float:
        """The monotonic time after which the current token of `app` stops being servable."""
        return self.refreshers[app].servable_until()

    async def get_token(self, app: str, min_ttl: float = 0.0) -> TokenSet:
        """A servable token for `app` (from memory unless none is servable)."""
        return await self.refreshers[app].get(min_ttl)

    async def force_refresh(self, app: str) -> TokenSet:
        """A forced, coalesced, rate-limited refresh of `app`."""
        return await self.refreshers[app].force()

    def status(self, app: str) -> AppStatus:
        """The state of `app` for the API."""
        return self.refreshers[app].status()

    def unready_apps(self) -> list[str]:
        """Required apps without a servable token; every app while draining."""
        if self.draining:
            return sorted(self.refreshers)
        return sorted(
            name
            for name, refresher in self.refreshers.items()
            if refresher.spec.required and refresher.servable() is None
        )

    def app_ready(self, app: str) -> bool:
        """`app` has a servable token and the broker is not draining."""
        return not self.draining and self.refreshers[app].servable() is not None

    # ---- lifecycle -----------------------------------------------------------------------

    def drain_bound(self) -> float:
        """The longest `drain()` waits: the longest of the apps' bounds (they drain side by side)."""
        return max((r.drain_bound() for r in self.refreshers.values()), default=0.0)

    async def drain(self, grace: float | None = None) -> None:
        """Stop scheduling refreshes; let spends in flight finish and persist.

        A refresh token sent to the server must not be dropped by a rolling deploy: its answer
        carries the rotated token, which is stored before the process exits. One not yet sent
        is not sent (its spend ends as aborted). The wait is bounded by `grace` seconds
        (default `drain_bound()`: the lease plus the read timeout) on the injected clock.
        """
        stops = [asyncio.ensure_future(r.stop()) for r in self.refreshers.values()]
        if not stops:
            return
        bound = self.drain_bound() if grace is None else grace
        pending = await self._wait_on_clock(stops, bound)
        if pending:
            log.warning("broker.refresh_still_in_flight", apps=len(pending), waited=bound)
        for task in pending:
            task.cancel()

    async def _wait_on_clock(
        self, tasks: Sequence[asyncio.Future[None]], seconds: float
    ) -> set[asyncio.Future[None]]:
        """Wait for `tasks` at most `seconds` on the injected clock; return those not done."""
        every = asyncio.ensure_future(asyncio.wait(tasks))
        timer = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({every, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            every.cancel()  # (leaves the tasks running)
        return {task for task in tasks if not task.done()}

    async def run(self) -> None:
        """Run every refresher and the store watcher until cancelled."""
        self._running = True
        await self._warm_start()
        for refresher in self.refreshers.values():
            self._start(refresher)
        try:
            await self._watch_store()
        finally:
            self._running = False
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _warm_start(self) -> None:
        """Load every app's stored set in one round trip, before the refreshers start."""
        try:
            stored = await self._store.load_many(list(self._by_store_name))
        except StoreUnavailable:
            return  # each refresher tries on its own, and serves once the store answers
        for name, token in stored.items():
            self._by_store_name[name].prime(token)

    def _start(self, refresher: AppRefresher, *, fresh: bool = False) -> None:
        self._tasks[refresher.name] = asyncio.create_task(
            refresher.run(fresh=fresh), name=f"app-{refresher.name}"
        )

    def add_app(self, refresher: AppRefresher, *, fresh: bool = False) -> None:
        """Serve a new app (config reload). `fresh`: fetch at once instead of a warm start."""
        previous = self.refreshers.get(refresher.name)
        if previous is not None:
            self._by_store_name.pop(previous.store_name, None)
        self.refreshers[refresher.name] = refresher
        self._by_store_name[refresher.store_name] = refresher
        if self._running:
            self._start(refresher, fresh=fresh)

    async def remove_app(self, name: str, *, grace: float | None = None) -> None:
        """Stop serving an app (config reload), after its refresh in flight, and drop its series.

        Waits as a drain does: at most `grace` s (default its `drain_bound()`), on the clock.
        """
        refresher = self.refreshers.pop(name, None)
        if refresher is not None:
            self._by_store_name.pop(refresher.store_name, None)
            bound = refresher.drain_bound() if grace is None else grace
            await self._wait_on_clock([asyncio.ensure_future(refresher.stop())], bound)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._metrics.forget_apps([name])

    async def _watch_store(self) -> None:
        """Follow the store's change notifications; on reconnect, re-read every app."""
        delay = STORE_RETRY_MIN
        was_down = False
        while True:
            try:
                await self._store.ping()
                self._metrics.store_up.set(1)
                if was_down:
                    log.info("store.reconnected")
                    was_down = False
                for refresher in self.refreshers.values():
                    refresher.notify_store_changed()
                delay = STORE_RETRY_MIN
                async for notice in self._store.updates():
                    refresher_for_app = self._by_store_name.get(notice.app)
                    if refresher_for_app is not None:
                        refresher_for_app.on_notice(notice)
                await self._clock.sleep(STORE_RETRY_MIN)  # the feed ended: re-subscribe
            except StoreUnavailable as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc
                self._metrics.store_up.set(0)
                if not was_down:
                    log.warning("store.unavailable", error=str(exc), retry_in=delay)
                    was_down = True
                await self._clock.sleep(delay)
                delay = min(STORE_RETRY_MAX, delay * 2)
