"""The broker core: every app's refresher, the store watcher, readiness. Implements TokenService."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Collection, Mapping, Sequence

from broker import events
from broker.clock import Clock, wait_within
from broker.errors import StoreUnavailable
from broker.events import EventHook
from broker.logs import get_logger
from broker.model import TokenSet
from broker.refresher import AppRefresher
from broker.service import AppStatus
from broker.store import HEARTBEAT, TokenStore

log = get_logger(__name__)

STORE_RETRY_MIN = 0.5
# Short: a replica that reconnects late hears late of other replicas' spends and commits.
# Not for a replica that holds what a store that forgot may lack (`AppRefresher.must_reach_store`:
# a refresh token on the wire, a set the store did not take): it retries every STORE_RETRY_MIN.
# After a store that forgot comes back, another replica writes its older set back and spends
# it after the long objection window (6 s); only this replica's reconnect (its write-back, its
# veto) stops that. With the backoff grown to 5 s in the outage, a holder cut off from the store
# for 2.5 to 6 s after its return came back after the spend (door
# `forgotten_then_down_then_its_spender_cut_off` with `cut_off=3.0`).
STORE_RETRY_MAX = 5.0
# A subscription can go half-open (a NAT, firewall or proxy forgot its connection): no error
# ever comes, the notices just stop (issue 20, M2: 45 s of silence lost 9 notices on real
# Redis). So the channel is never quiet for long: a replica that heard nothing for
# HEARTBEAT_AFTER seconds (times 1 to 1.5, at random, so that one replica's heartbeat usually
# answers for the whole fleet) publishes a heartbeat, and again every HEARTBEAT_AFTER seconds;
# a subscription that heard nothing, not even those, for SILENCE_DEADLINE seconds is broken:
# re-subscribe and re-read every app, as after an outage. The deadline plus the first
# reconnect delay stays below the long objection window (6 s): a spender whose subscription
# went deaf as its token left is back, and vetoes, before another replica's spend of that token
# announced meanwhile can be sent.
HEARTBEAT_AFTER = 2.0
SILENCE_DEADLINE = 5.0
# A wait of the silence guard that ends this much later than asked: the process itself was
# paused (a GC pause, a stalled event loop, a stopped container). What silence it saw was not
# heard by a running process: the notices published meanwhile wait in its socket, unread, and
# dropping the subscription now would throw them away (among them an abort that clears a
# spend it remembers as sent: it would then veto the next spend of that token for good).
PAUSED_AFTER = 1.0


class BrokerCore:
    """Owns the refreshers of all apps and answers the API from memory."""

    def __init__(
        self,
        refreshers: Mapping[str, AppRefresher],
        store: TokenStore,
        clock: Clock,
        on_event: EventHook,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.refreshers: dict[str, AppRefresher] = dict(refreshers)
        # Refreshers a config reload is removing, while `remove_app` waits for them: a SIGTERM
        # meanwhile drains them too (one may have a refresh token on the wire). A dict, in the
        # order the removals began: a set's order follows memory addresses, and a simulated
        # drain must replay alike.
        self._retiring: dict[AppRefresher, None] = {}
        # Notices name the set they are about by its store name (app and client binding): a
        # notice of another binding (another fleet, or the old config) reaches no refresher.
        self._by_store_name = {r.store_name: r for r in self.refreshers.values()}
        self._store = store
        self._clock = clock
        # The events of the core and of its apps' refreshers (metrics: broker/observe.py).
        self.on_event = on_event
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self._heard_at = 0.0  # monotonic time of the last notice (or heartbeat) heard
        # The silence guard's (`_keep_talking`): how long the channel may be quiet before it
        # publishes a heartbeat, when it last woke from a pause, and its current wait.
        self._quiet_limit = HEARTBEAT_AFTER
        self._resumed_at = -math.inf
        self._quiet_wait = (0.0, 0.0)
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

    async def token_refused(self, app: str, token: TokenSet) -> TokenSet:
        """The upstream refused `token` of `app`: a fleet-wide purge; the token to retry with."""
        return await self.refreshers[app].refused(token)

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

    def readiness(self) -> list[tuple[str, bool]]:
        """Every app and whether it is ready (`app_ready`), for the metrics (`track_readiness`)."""
        draining = self.draining
        return [
            (name, not draining and refresher.servable() is not None)
            for name, refresher in self.refreshers.items()
        ]

    # ---- lifecycle -----------------------------------------------------------------------

    def drain_bound(self) -> float:
        """The longest `drain()` waits: the longest of the apps' bounds (they drain side by side)."""
        draining = [*self.refreshers.values(), *self._retiring]
        return max((r.drain_bound() for r in draining), default=0.0)

    async def drain(self, grace: float | None = None) -> None:
        """Stop scheduling refreshes; let spends in flight finish and persist.

        A refresh token sent to the server must not be dropped by a rolling deploy: its answer
        carries the rotated token, which is stored before the process exits (written back,
        again and again, while the store cannot take it). One not yet sent
        is not sent (its spend ends as aborted). The wait is bounded by `grace` seconds
        (default `drain_bound()`: the lease plus the read timeout) on the injected clock.
        """
        # A refresher that a config reload is removing is drained too: its sent request's
        # answer may be the only copy of the rotated set (swarm seed 8892: SIGTERM during a
        # reload that was waiting for a spend in flight; the process exited without it).
        draining = [*self.refreshers.values(), *self._retiring]
        stops = [asyncio.ensure_future(r.stop(write_back=True)) for r in draining]
        if not stops:
            return
        bound = self.drain_bound() if grace is None else grace
        pending = await self._wait_on_clock(stops, bound)
        if pending:
            log.warning("broker.refresh_still_in_flight", apps=len(pending), waited=bound)
        for refresher, stop in zip(draining, stops, strict=True):
            if stop in pending and refresher.fleet.abort_unwritten:
                # The store stayed unreachable for the whole drain: a spend this process
                # marked sent but never sent may keep its `sent` record, which no other
                # replica can tell from a request on the wire (they report the outcome
                # unknown). Only this process knows the token never left; say so before exiting.
                log.error(
                    "spend.abort_unwritten",
                    app=refresher.name,
                    owner=refresher.fleet.owner,
                    fence=refresher.fleet.memory.aborted_fence,
                    waited=bound,
                )
        for task in pending:
            task.cancel()

    async def _wait_on_clock(
        self, tasks: Sequence[asyncio.Future[None]], seconds: float
    ) -> set[asyncio.Future[None]]:
        """Wait for `tasks` at most `seconds` on the injected clock; return those not done."""
        every = asyncio.ensure_future(asyncio.wait(tasks))
        try:
            await wait_within(self._clock, every, seconds)
        finally:
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
            self._retiring[refresher] = None
            try:
                await self._wait_on_clock([asyncio.ensure_future(refresher.stop())], bound)
            finally:
                self._retiring.pop(refresher, None)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.on_event(events.AppRemoved(name))

    async def _watch_store(self) -> None:
        """Follow the store's notices; on reconnect, and after a silent subscription, re-read
        every app (a notice may have gone out while this replica could not hear it)."""
        delay = STORE_RETRY_MIN
        was_down = False
        while True:
            subscribed_at = math.inf
            try:
                await self._store.ping()
                self.on_event(events.StoreReachable(up=True))
                if was_down:
                    log.info("store.reconnected")
                    was_down = False
                for refresher in self.refreshers.values():
                    refresher.notify_store_changed(reconnected=True)
                subscribed_at = self._clock.monotonic()
                silent_for = await self._follow_notices()
            except StoreUnavailable as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc
                if self._heard_at > subscribed_at:
                    delay = STORE_RETRY_MIN  # the subscription worked: start the backoff over
                self.on_event(events.StoreReachable(up=False))
                self._store_lost()
                if not was_down:
                    log.warning("store.unavailable", error=str(exc), retry_in=delay)
                    was_down = True
                await self._clock.sleep(delay)
                delay = self._next_retry(delay)
                continue
            if self._heard_at > subscribed_at:
                delay = STORE_RETRY_MIN  # the subscription worked: start the backoff over
            if silent_for is None:
                await self._clock.sleep(STORE_RETRY_MIN)  # the feed ended: re-subscribe
                continue
            # Half-open: no error will ever come. Drop it, and re-sync as after an outage.
            self.on_event(events.SubscriptionStale())
            log.warning("store.subscription_stale", silent_for=round(silent_for, 1), retry_in=delay)
            self._store_lost()
            was_down = True
            await self._clock.sleep(delay)
            delay = self._next_retry(delay)

    def _next_retry(self, delay: float) -> float:
        """The watcher's next reconnect delay after `delay`: doubled up to STORE_RETRY_MAX,
        unless an app holds what the store may lack (`must_reach_store`): then the shortest."""
        if any(refresher.must_reach_store for refresher in self.refreshers.values()):
            return STORE_RETRY_MIN
        return min(STORE_RETRY_MAX, delay * 2)

    def _store_lost(self) -> None:
        """The subscription broke (or went silent): tell every refresher, whose next spends
        wait for the replicas cut off with this one (a store restart drops every connection)."""
        for refresher in self.refreshers.values():
            refresher.notify_store_lost()

    async def _follow_notices(self) -> float | None:
        """Hand every notice to its app's refresher while heartbeats keep the channel talking.

        Returns None when the feed ends, or the seconds of silence once the subscription heard
        nothing for SILENCE_DEADLINE (it is half-open); raises StoreUnavailable when it breaks.
        """
        self._heard_at = self._clock.monotonic()
        reader = asyncio.create_task(self._read_notices())
        guard = asyncio.create_task(self._keep_talking())
        try:
            await asyncio.wait({reader, guard}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            guard.cancel()
            await asyncio.gather(reader, guard, return_exceptions=True)
        if reader.done() and not reader.cancelled():
            reader.result()  # StoreUnavailable, or the feed ended
            return None
        return guard.result()

    async def _read_notices(self) -> None:
        """Dispatch notices to their apps' refreshers, noting when anything was heard."""
        async for notice in self._store.updates():
            self._heard_at = self._clock.monotonic()
            if notice.kind == HEARTBEAT:
                continue
            refresher = self._by_store_name.get(notice.app)
            if refresher is not None:
                refresher.on_notice(notice)

    async def _keep_talking(self) -> float:
        """Publish a heartbeat whenever the channel has been quiet for a while; return the
        silence once it reaches SILENCE_DEADLINE."""
        # The guard's state is the core's, not the loop's locals: the simulation takes a wait
        # that only ends in another wait (a heartbeat was heard meanwhile) without waking the
        # loop, as the loop would have (tests/simulation/world.py, `_GuardTimer`).
        self._quiet_limit = HEARTBEAT_AFTER * (1 + 0.5 * self._rng.random())
        self._resumed_at = -math.inf  # when this process last woke from a pause
        beat: asyncio.Future[None] | None = None
        try:
            while True:
                now = self._clock.monotonic()
                quiet = now - max(self._heard_at, self._resumed_at)
                if quiet >= SILENCE_DEADLINE:
                    return quiet
                if quiet < self._quiet_limit:
                    wait = self._quiet_limit - quiet
                else:
                    if beat is None or beat.done():
                        # Apart from the deadline's count: a publish that waits for a
                        # connection must not hold the deadline back.
                        beat = asyncio.create_task(self._heartbeat())
                        self._quiet_limit = HEARTBEAT_AFTER * (1 + 0.5 * self._rng.random())
                    wait = min(HEARTBEAT_AFTER, SILENCE_DEADLINE - quiet)
                # At least 10 ms: a remainder lost to rounding (1e-16 added to a monotonic
                # time of 1000 s is no time at all) must not spin.
                self._quiet_wait = (now, max(0.01, wait))  # (from when, how long)
                await self._clock.sleep(self._quiet_wait[1])
                now, asked = self._quiet_wait
                if self._clock.monotonic() - now - asked > PAUSED_AFTER:
                    # We were paused: let the reader catch up on what is buffered, and count
                    # the silence from now (a half-open subscription is found 5 s later).
                    self._resumed_at = self._clock.monotonic()
        finally:
            if beat is not None:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)

    async def _heartbeat(self) -> None:
        """Publish one heartbeat. A failure is for the deadline to judge (a store that is down
        breaks the subscription too)."""
        # (Not contextlib.suppress, whose context manager costs more than the rest here: a
        # heartbeat goes out every two seconds, and the simulation runs thousands of them.)
        try:  # noqa: SIM105
            await self._store.heartbeat()
        except StoreUnavailable:
            pass
