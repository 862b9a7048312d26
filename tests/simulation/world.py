"""A simulated world for the fleet protocol: one clock, one store, one authorization server.

Everything runs in one asyncio loop on simulated time. Replicas are the real BrokerCore and
AppRefresher (with the real fleet protocol) over per-replica views of one MemoryStore; the views
and the token sources inject the faults a schedule asks for. Nothing sleeps in real time and
nothing depends on the order of real I/O, so a seed replays exactly.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import contextvars
import functools
import itertools
import json
import random
import selectors
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Sequence,
)
from dataclasses import dataclass, field, replace
from heapq import heapify, heappop, heappush
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from prometheus_client.registry import Collector, CollectorRegistry

from broker.clock import Clock
from broker.core import PAUSED_AFTER, SILENCE_DEADLINE, BrokerCore
from broker.dpop import DpopKeyMissing, ProofKey, ProofKeys, generate_key, jwk_thumbprint
from broker.errors import (
    PermanentTokenError,
    StoreUnavailable,
    TransientTokenError,
    UnreadableTokenSet,
)
from broker.events import EventHook
from broker.fleet import Timing
from broker.fleetclock import FleetClock
from broker.metrics import Metrics
from broker.model import (
    PROTOCOL_VERSION,
    AppSpec,
    DpopAlgorithm,
    GrantType,
    RefreshPolicy,
    TokenSet,
    fingerprint,
)
from broker.oauth.parse import classify_error
from broker.observe import Observer
from broker.refresher import AppRefresher
from broker.store import (
    HEARTBEAT,
    Commit,
    FleetSignals,
    Notice,
    Notices,
    Refusal,
    SpendLedger,
    SpendStart,
    TokenSets,
    bound_name,
    client_binding,
)
from broker.store.memory import MemoryState, MemoryStore
from tests.support.virtual_time import NAN, Handle, Timer, VirtualTimers

APP = "scim"
# asyncio's own bounds (Python 3.11, asyncio.base_events), for SimLoop's copy of its loop
# iteration: the timer heap is rebuilt without its cancelled timers once it holds more than
# this many and more than this fraction is cancelled; a loop never waits longer than a day.
_MIN_SCHEDULED_TIMER_HANDLES = 100
_MIN_CANCELLED_TIMER_HANDLES_FRACTION = 0.5
_MAXIMUM_SELECT_TIMEOUT = 24 * 3600
T = TypeVar("T")


class _NoIO(selectors.SelectSelector):
    """A selector for a loop with no real I/O: "waiting" moves the simulated clock instead.

    It keeps the loop's self-pipe registered (as asyncio requires) but never polls it. (SimLoop's
    own loop iteration moves the clock itself and never calls `select`.)
    """

    loop: SimLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Nothing is ready: jump the clock to the next timer (the loop asked to wait that long)."""
        assert self.loop is not None
        if timeout is None:
            raise RuntimeError("simulation deadlock: nothing runs and nothing waits on the clock")
        self.loop.now += timeout
        return []


class SimLoop(VirtualTimers, asyncio.SelectorEventLoop):
    """An event loop on simulated time: whenever nothing can run, time jumps to the next timer.

    Every task runs until it waits; only then does the clock move, straight to the earliest
    wake-up. So a run is a pure function of its seed, costs nothing while "waiting", and the
    asyncio timers (`asyncio.sleep`) are the world's scheduler.

    Its time and timers are a VirtualTimers (tests/support/virtual_time.py, the unit tests'
    FakeClock's too), its ready callbacks a deque of its own: it reads no private field of
    asyncio's (it overrides one private method, `_run_once`, the iteration that asyncio's
    run_forever calls; writing run_forever instead would take asyncio's private async
    generator hooks and thread id). Its loop iteration is asyncio's (Python 3.11) in the same order: the same timer
    heap, the same clean-up of cancelled timers, the same batches of ready callbacks; only the
    I/O poll, which never finds anything here, and the debug checks are left out. (The loop's
    own work is most of a schedule's cost: tens of thousands of wake-ups.)
    """

    def __init__(self) -> None:
        VirtualTimers.__init__(self, 0.0)
        self.ready: collections.deque[Handle] = collections.deque()
        self._halting = False  # stop() was called: end the iteration after this batch
        self._open = True
        self._resolution = time.get_clock_info("monotonic").resolution
        selector = _NoIO()
        asyncio.SelectorEventLoop.__init__(self, selector)
        selector.loop = self
        # Never in debug mode: futures and tasks ask this at every creation (in C), so answer
        # with a C callable instead of a Python method.
        self.get_debug = False.__bool__  # type: ignore[method-assign]
        # The next call_soon runs its callback at once (a sleep's timer, in `_run_once`).
        self._step_now = False
        # The loop's turns so far, and the handle that runs the last arrivals of notices queued
        # in a turn with the turn (`arrive_soon`).
        self._turn = 0
        self._arrivals: tuple[int, Handle, list[Inbox]] | None = None
        # BaseEventLoop.create_future without its Python frame (every wait makes a future).
        self.create_future = functools.partial(asyncio.Future, loop=self)  # type: ignore[method-assign]

    def time(self) -> float:
        """Simulated seconds since the world began."""
        return self.now

    @property
    def idle(self) -> bool:
        """Nothing is ready to run now: only the clock can wake anything."""
        return not self.ready

    def only_wakes_ready(self) -> bool:
        """Every callback waiting to run now only wakes something (resolves a sleep's future,
        or moves a notice along: `Inbox._arrive`, `Inbox._deliver`), and no task step is among
        them: what any of them does commutes with a reader's own note of a heartbeat (its
        subscription's state, its core's `_heard_at`), which may then be made at once instead
        of in the reader's step behind them (`Inbox._deliver`)."""
        for handle in self.ready:
            kind = handle.__class__
            if kind is not _WakeTimer and kind is not _WakeHandle and kind is not _GuardTimer:
                return False
        return True

    def sleeper(
        self, seconds: float, guard: ReplicaClock | None = None
    ) -> tuple[asyncio.Future[None], Timer]:
        """What asyncio.sleep(seconds) awaits: a future, resolved by a timer due then. (The
        timer needs no context of its own: it only resolves the future.) `guard`: the clock
        of a core whose silence guard waits (a _GuardTimer)."""
        # (schedule, inlined: this is most of the timers.)
        future = self.create_future()
        when = self.now + seconds
        if guard is None:
            timer = _WakeTimer(self, when, _wake_sleeper, (future,), _TIMER_CONTEXT)
        else:
            timer = _GuardTimer(self, when, _wake_sleeper, (future,), _TIMER_CONTEXT)
            timer.core = guard.core  # type: ignore[assignment]
            timer.host = guard
        heappush(self.heap, (when, NAN + 0.0, timer))
        return future, timer

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> Handle:
        """asyncio's call_soon, on this loop's own ready queue."""
        if self._step_now:
            self._step_now = False
            if context is not None:  # (a future's callbacks always have theirs)
                # A task's step, run at once for its sleep's timer (as _run_once runs it).
                try:
                    context.run(callback, *args)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self._callback_failed(Handle(callback, args, context), exc)
                return None  # type: ignore[return-value]  # (a future's callbacks ignore it)
        if not self._open:
            raise RuntimeError("Event loop is closed")
        handle = Handle(callback, args, context)
        self.ready.append(handle)
        return handle

    call_soon_threadsafe = call_soon  # type: ignore[assignment]  # (one thread: no wake-up)

    def call_later(  # type: ignore[override]
        self, delay: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> Timer:
        """asyncio's call_later (due at `now + delay`, as asyncio computes it)."""
        return self.call_at(self.now + delay, callback, *args, context=context)

    def call_at(  # type: ignore[override]
        self, when: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> Timer:
        """asyncio's call_at, on this loop's VirtualTimers."""
        if not self._open or when is None:
            raise RuntimeError("the simulated loop runs only while open, at a given time")
        # (schedule, inlined. The world's sleeps and the inboxes' deliveries make their own.)
        timer = Timer(self, when, callback, args, context)
        heappush(self.heap, (when, NAN + 0.0, timer))
        return timer

    def stop(self) -> None:
        """asyncio's stop: the loop ends after the callbacks ready now."""
        self._halting = True
        super().stop()

    def close(self) -> None:
        """asyncio's close: nothing may be scheduled after it."""
        super().close()
        self._open = False

    def _run_once(self) -> None:
        """asyncio's loop iteration (BaseEventLoop._run_once), repeated until the loop stops
        (what run_forever would do), with the poll replaced by the jump in simulated time.
        (Inlined whole: the loop's own turns are a large part of a schedule's cost.)"""
        ready = self.ready
        resolution = self._resolution
        while True:
            self._turn += 1
            heap = self.heap
            count = len(heap)
            if (
                count > _MIN_SCHEDULED_TIMER_HANDLES
                and self.cancelled_count / count > _MIN_CANCELLED_TIMER_HANDLES_FRACTION
            ):
                kept = []
                for entry in heap:
                    if entry[2].is_cancelled:
                        entry[2].scheduled = False
                    else:
                        kept.append(entry)
                heapify(kept)
                self.heap = heap = kept
                self.cancelled_count = 0
            else:
                while heap and heap[0][2].is_cancelled:
                    self.cancelled_count -= 1
                    heappop(heap)[2].scheduled = False
            if not ready and not self._halting:
                if not heap:
                    raise RuntimeError(
                        "simulation deadlock: nothing runs and nothing waits on the clock"
                    )
                # What the poll would have waited: the clock moves by just that (asyncio's
                # min(max(0, wait), _MAXIMUM_SELECT_TIMEOUT), without the two calls).
                wait = heap[0][0] - self.now
                if wait > 0:
                    self.now += wait if wait < _MAXIMUM_SELECT_TIMEOUT else _MAXIMUM_SELECT_TIMEOUT
            end_time = self.now + resolution
            while heap:
                if heap[0][0] >= end_time:
                    break
                timer = heappop(heap)[2]
                timer.scheduled = False
                ready.append(timer)
            handle: Handle | None
            for _ in range(len(ready)):
                handle = ready.popleft()
                if handle.is_cancelled:
                    continue
                if handle.callback is _wake_sleeper and not ready and SHORTCUTS:
                    # _wake_sleeper, inlined for a sleep's timer that is the last callback of
                    # its turn (most timers), and the step of the one task that awaits its
                    # future run at once, inside it (`_step_now`: see call_soon), when that
                    # changes nothing: nothing else would run before that step, nor would the
                    # loop's turn in between move the clock, pop a timer (none is due now, the
                    # earliest is not cancelled) or rebuild its heap. The step then runs with
                    # the same loop state, in the same order, as in the next turn, and a sleep
                    # costs no handle nor turn of its own. (A sleep's future has exactly that
                    # one callback, so nothing else is queued by resolving it.)
                    future: asyncio.Future[None] = handle.args[0]  # type: ignore[index]
                    if future.cancelled():
                        continue
                    self._step_now = not self._halting and (
                        not heap
                        or (
                            heap[0][0] >= end_time
                            and not heap[0][2].is_cancelled
                            and (
                                len(heap) <= _MIN_SCHEDULED_TIMER_HANDLES
                                or self.cancelled_count / len(heap)
                                <= _MIN_CANCELLED_TIMER_HANDLES_FRACTION
                            )
                        )
                    )
                    if (
                        self._step_now
                        and handle.__class__ is _GuardTimer
                        and _guard_waits_again(handle)
                    ):
                        self._step_now = False  # (the guard's step, taken: see _GuardTimer)
                        continue
                    try:
                        future.set_result(None)
                    except (SystemExit, KeyboardInterrupt):
                        raise
                    except BaseException as exc:
                        self._callback_failed(handle, exc)
                    finally:
                        self._step_now = False
                    continue
                # handle.run(), inlined (its frame is a tenth of a schedule's cost).
                try:
                    handle.context.run(handle.callback, *handle.args)  # type: ignore[arg-type,misc]
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self._callback_failed(handle, exc)
            handle = None  # (no cycle through a callback's exception)
            if self._halting:
                self._halting = False
                return

    def arrive_soon(self, inbox: Inbox) -> None:
        """call_soon(inbox._arrive), where a notice published to every subscriber queues one
        handle for all of them: arrivals queued one right after another in the same turn run
        one right after another in the next, with nothing between them, so one handle runs
        them all in that order (a heartbeat cost one handle per replica)."""
        ready = self.ready
        arrivals = self._arrivals
        if (
            SHORTCUTS
            and arrivals is not None
            and arrivals[0] == self._turn
            and ready
            and ready[-1] is arrivals[1]
        ):
            arrivals[2].append(inbox)
            return
        inboxes = [inbox]
        handle = _WakeHandle(_arrive_all, (inboxes,), _TIMER_CONTEXT)
        ready.append(handle)
        self._arrivals = (self._turn, handle, inboxes)

    def _callback_failed(self, handle: Handle, exc: BaseException) -> None:
        """What asyncio does when a callback raises: report it to the loop's handler."""
        self.call_exception_handler(
            {"message": f"Exception in callback {handle.callback!r}", "exception": exc}
        )


class _WakeTimer(Timer):
    """A timer that only wakes something: a sleep's (`_wake_sleeper`) or a notice's delivery
    (`Inbox._deliver`); see SimLoop.only_wakes_ready."""

    __slots__ = ()


class _WakeHandle(Handle):
    """A handle that only moves notices along (`_arrive_all`); see SimLoop.only_wakes_ready."""

    __slots__ = ()


class _GuardTimer(_WakeTimer):
    """The timer of a wait of a core's silence guard (BrokerCore._keep_talking, which waits on
    its replica's clock `host`): a sleep's timer, which SimLoop._run_once may take as the
    guard's step itself (`_guard_waits_again`)."""

    __slots__ = ("core", "host")

    core: BrokerCore
    host: ReplicaClock


# The silence guard's code: a wait of a task running it gets a _GuardTimer (ReplicaClock.sleep).
# (A test that replaces the guard replaces its code: its waits are plain sleeps.)
_GUARD_CODE = BrokerCore._keep_talking.__code__


def _guard_waits_again(timer: _GuardTimer) -> bool:
    """The guard's step at the end of its wait, taken here without waking its task, when all
    that step would do is wait again (a notice or a heartbeat was heard meanwhile: about one
    guard step per replica for every heartbeat of the fleet): then note the new wait on the
    core as the guard does, and push the same timer again, due when the guard's new sleep's
    timer would be. Its task still awaits the same future, behind the same timer (a cancel
    still finds it), and reads its wait from the core when it next wakes.

    Only when the step would run at once, inside this turn (SimLoop._run_once, `_step_now`),
    so that the push is where the step's own push would be; and only when the step would do
    exactly that: the process not frozen (ReplicaClock.sleep would thaw first), not paused
    (the guard would note it), the silence below both the guard's limit (it would publish a
    heartbeat) and the deadline (it would return). The arithmetic is the guard's own, in its
    order, on the same clock readings: the run is the same to the last bit."""
    core = timer.core
    loop = timer.queue
    if timer.host.frozen.until > loop.now:
        return False
    mono = core._clock.monotonic()  # (the guard reads it twice; it is the same both times)
    now, asked = core._quiet_wait
    if mono - now - asked > PAUSED_AFTER:
        return False
    now = mono
    quiet = now - max(core._heard_at, core._resumed_at)
    if quiet >= SILENCE_DEADLINE or quiet >= core._quiet_limit:
        return False
    core._quiet_wait = (now, max(0.01, core._quiet_limit - quiet))
    when = loop.now + core._quiet_wait[1]  # (ReplicaClock.sleep's sleeper)
    timer.due = when
    timer.scheduled = True
    heappush(loop.heap, (when, NAN + 0.0, timer))
    return True


def run_simulated(main: Coroutine[object, object, T]) -> T:
    """Run `main` to completion on a fresh SimLoop."""
    with asyncio.Runner(loop_factory=SimLoop) as runner:
        return runner.run(main)


_TIMER_CONTEXT = contextvars.Context()

# The loop's shortcuts, each of which leaves every run as it was (test_loop.py compares runs
# with and without them): readers take heartbeats without being woken (Inbox.heartbeat), a
# sleep's timer runs its task's step at once (SimLoop._run_once), a silence guard's wait that
# ends in another wait is taken without its task (_guard_waits_again), and the arrivals of one
# notice run in one handle (SimLoop.arrive_soon). False: asyncio's way, a handle for every step.
SHORTCUTS = True


def _arrive_all(inboxes: list[Inbox]) -> None:
    """Inbox._arrive of each, in the order they were queued (SimLoop.arrive_soon)."""
    for inbox in inboxes:
        inbox._arrive()


def _wake_sleeper(future: asyncio.Future[None]) -> None:
    """A sleep's timer (SimLoop.sleeper): resolve its future. (As the last callback of a turn
    it is run by SimLoop._run_once itself, which may run the step of the one task that awaits
    the future at once.)"""
    if not future.cancelled():
        future.set_result(None)


# How long a notice takes from the store to a subscriber's reader.
NOTICE_DELAY = 0.002
# The longest hop of a store command, each way (StoreLink._hop: 1 to 5 ms).
REPLY_HOP = 0.005
# Timers in simulated time add floats: a wait of N seconds on a replica's clock (monotonic base
# 1000 s per index) may end within this of N in world time, either side.
TIMER_ROUNDING = 1e-9


class SimTime:
    """The one true clock of the world: the running SimLoop's time, and sleeping on it."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        if not isinstance(loop, SimLoop):
            raise RuntimeError("the simulated world runs on a SimLoop (run_simulated)")
        self._loop = loop

    @property
    def now(self) -> float:
        """Simulated seconds since the world began."""
        return self._loop.now

    async def sleep(self, seconds: float) -> None:
        """Wait until the world's time has moved `seconds` on."""
        if seconds > 0:
            # asyncio.sleep(seconds), inlined: the world's most frequent wait.
            future, timer = self._loop.sleeper(seconds)
            try:
                await future
            except BaseException:
                timer.cancel()  # (a timer that ran is no longer scheduled: nothing to cancel)
                raise
        else:
            await asyncio.sleep(0)

    async def settle(self) -> None:
        """Run every task that can run now, until all wait on the clock (or on each other)."""
        loop = self._loop
        for _ in range(10_000):
            await asyncio.sleep(0)
            if loop.idle:
                return

    async def advance_to(self, target: float) -> None:
        """Move time to `target`: everything due until then runs, in time order, and settles."""
        if target > self._loop.now:
            await self.sleep(target - self._loop.now)  # (asyncio.sleep's timer, its due time)
        await self.settle()


class ReplicaClock:
    """A replica's view of time: the true clock plus its own wall offset and monotonic base."""

    def __init__(
        self, world: SimTime, wall_offset: float, mono_base: float, frozen: Frozen | None = None
    ) -> None:
        self._world = world
        self._loop = world._loop
        self.wall_offset = wall_offset
        self._mono_base = mono_base
        self.frozen = frozen if frozen is not None else Frozen(world)
        self.core: BrokerCore | None = None  # the core of the replica whose clock this is

    def time(self) -> float:
        """Wall time as this replica's (possibly wrong) clock reads it."""
        return WALL_EPOCH + self._loop.now + self.wall_offset

    def monotonic(self) -> float:
        """Monotonic time: true elapsed time from an arbitrary base."""
        return self._mono_base + self._loop.now

    async def sleep(self, seconds: float) -> None:
        """Sleep on the world's clock (and past it while the process is frozen)."""
        if seconds > 0:
            # SimTime.sleep, inlined: every replica's waits come here.
            task = asyncio.current_task(self._loop) if self.core is not None else None
            if task is not None and task.get_coro().cr_code is _GUARD_CODE:  # type: ignore[union-attr]
                # The core's silence guard waits: its timer may take its step (_GuardTimer).
                future, timer = self._loop.sleeper(seconds, self)
            else:
                future, timer = self._loop.sleeper(seconds)
            try:
                await future
            except BaseException:
                timer.cancel()
                raise
        else:
            await asyncio.sleep(0)
        if self.frozen.until > self._loop.now:
            await self.frozen.thaw()


WALL_EPOCH = 1_800_000_000.0


class StoreClock:
    """The store's clock (lease expiry, `TIME`): true time, plus any step it took.

    Redis expires keys on its own wall clock, so a step moves lease deadlines and record ages
    as well as `TIME`.
    """

    def __init__(self, world: SimTime) -> None:
        self._world = world
        self.step = 0.0

    def time(self) -> float:
        """The store host's wall time."""
        return WALL_EPOCH + self._world.now + self.step

    def monotonic(self) -> float:
        """The store's elapsed time (it follows its wall clock)."""
        return self._world.now + self.step

    async def sleep(self, seconds: float) -> None:
        """Sleep on the world's clock."""
        await self._world.sleep(seconds)


# ---- the authorization server ---------------------------------------------------------------


@dataclass
class Presentation:
    """One refresh token presented to the server."""

    refresh_token: str
    at: float
    replica: str
    outcome: str  # rotated, grace, reuse, rejected, refused (429/500/down: not processed)
    reply_lost: bool = False
    # Why the reply was lost: "wire" (the network lost it), "sender_died" (the process was
    # killed with the request out) or "gave_up" (the client cancelled a request it had sent:
    # avoidable, never excused by the invariants).
    lost_by: str | None = None
    issued: str | None = None  # the refresh token a rotation issued in its place


@dataclass
class ServerFaults:
    """What the server does wrong right now."""

    down: bool = False
    status: int | None = None  # 429 or 500: answered without acting
    retry_after: float | None = None
    slow: float = 0.0  # extra seconds before the server acts
    stall_next: float = 0.0  # extra seconds before the server acts on the next refresh only
    lose_replies: float = 0.0  # probability the reply to a processed request is lost
    # The status a refresh is answered with after the server rotated (failed while rendering).
    error_after_acting: int | None = None


class SimAuthServer:
    """Rotates the refresh token on every use, with RFC 9700 reuse detection.

    `grace` > 0 accepts a spent refresh token again for that many seconds (Okta, Auth0).
    """

    def __init__(
        self,
        world: SimTime,
        rng: random.Random,
        *,
        lifetime: float,
        grace: float,
        dpop_jkt: str | None = None,
    ) -> None:
        self._world = world
        self._rng = rng
        self.lifetime = lifetime
        self.grace = grace
        # DPoP: the key the operator's authorization was proved with (None: bearer tokens),
        # each refresh token's key, and the refreshes proved with another key (never allowed).
        self.dpop_jkt = dpop_jkt
        self.bound: dict[str, str] = {}
        self.wrong_key = 0
        self.faults = ServerFaults()
        self._serial = itertools.count(1)
        self.valid_refresh: str | None = None
        self.spent: dict[str, float] = {}
        self.revoked = False
        self.revoked_at: float | None = None
        self.expiry: dict[str, float] = {}  # access token → true expiry (world time)
        self.presentations: list[Presentation] = []
        self.requests = 0  # every request that reached the server and was acted on
        self.in_flight_when_cancelled = 0  # refresh requests whose sender died before arrival
        # Refresh requests a replica abandoned while draining for SIGTERM (never allowed: the
        # drain waits for a spend in flight and persists its answer).
        self.dropped_on_sigterm = 0
        # Spends marked sent by a replica after its SIGTERM (never allowed: stopping sends
        # nothing new, it only sees through a request already sent).
        self.sent_after_sigterm = 0
        # Replicas whose SIGTERM drain ended before its bound while they held the only copy of
        # the newest set (never allowed: the drain stores it, waiting for the store to take it).
        self.unstored_on_sigterm = 0
        self.cc_requests = 0
        self.late: set[asyncio.Future[None]] = set()  # cancelled requests still on their way
        # Every refresh token sent: (world time, replica, refresh token), for scripted faults.
        self.sends: list[tuple[float, str, str]] = []
        self.phases = SpendPhases()  # the moments inside spends, for aimed faults

    def authorize(self) -> TokenSet:
        """The operator's one-time authorization: a fresh grant."""
        self.revoked = False
        self.valid_refresh = self._new_refresh()
        access = self._new_access()
        if self.dpop_jkt is not None:
            self.bound[self.valid_refresh] = self.dpop_jkt
        return TokenSet(
            access,
            "Bearer" if self.dpop_jkt is None else "DPoP",
            WALL_EPOCH + self._world.now,
            WALL_EPOCH + self.expiry[access],
            None,
            self.valid_refresh,
            lineage=1,
            generation=1,
            dpop_jkt=self.dpop_jkt,
        )

    def _new_refresh(self) -> str:
        return f"rt-{next(self._serial):05d}-{'r' * 16}"

    def _new_access(self) -> str:
        access = f"at-{next(self._serial):05d}-{'a' * 16}"
        self.expiry[access] = self._world.now + self.lifetime
        return access

    def refresh(
        self, refresh_token: str, replica: str, sent_wall: float, jkt: str | None = None
    ) -> TokenSet:
        """Act on a refresh_token grant (raises PermanentTokenError for a dead grant).

        `jkt`: the key the request's DPoP proof was signed with; a refresh token bound to
        another key is refused without being used (RFC 9449 §5).
        """
        bound = self.bound.get(refresh_token)
        if bound is not None and jkt != bound:
            self.wrong_key += 1
            raise PermanentTokenError("invalid_dpop_proof", status=400, error="invalid_dpop_proof")
        self.requests += 1
        record = Presentation(refresh_token, self._world.now, replica, "rotated")
        self.presentations.append(record)
        if self.revoked:
            record.outcome = "rejected"
            raise PermanentTokenError("invalid_grant", status=400, error="invalid_grant")
        if refresh_token == self.valid_refresh:
            self.spent[refresh_token] = self._world.now
            self.valid_refresh = record.issued = self._new_refresh()
        elif refresh_token in self.spent:
            if self.grace > 0 and self._world.now - self.spent[refresh_token] <= self.grace:
                record.outcome = "grace"
            else:
                record.outcome = "reuse"
                self.revoked = True
                self.revoked_at = self._world.now
                raise PermanentTokenError("invalid_grant", status=400, error="invalid_grant")
        else:
            record.outcome = "rejected"
            raise PermanentTokenError("invalid_grant", status=400, error="invalid_grant")
        access = self._new_access()
        if jkt is not None and self.valid_refresh is not None:
            self.bound[self.valid_refresh] = jkt
        return TokenSet(
            access,
            "Bearer" if jkt is None else "DPoP",
            sent_wall,
            sent_wall + self.lifetime,
            None,
            self.valid_refresh,
            dpop_jkt=jkt,
        )

    @staticmethod
    def proof_key(proof: str | None) -> str | None:
        """The thumbprint of the key a DPoP proof's header carries (None: no proof)."""
        if proof is None:
            return None
        header = json.loads(base64.urlsafe_b64decode(proof.split(".")[0] + "=="))
        return jwk_thumbprint(header["jwk"])


class SimSource:
    """One replica's token endpoint client: network latency, and the server's faults."""

    def __init__(
        self,
        world: SimTime,
        server: SimAuthServer,
        clock: Clock,
        rng: random.Random,
        dpop: ProofKeys | None = None,
    ) -> None:
        self._world = world
        self._server = server
        self._clock = clock
        self._rng = rng
        # The replica's DPoP keys (the fleet's key file): a proof is made at send time.
        self.dpop = dpop
        self.replica = ""
        self.dead = False
        self.draining = False  # SIGTERM received: a request in flight must be seen through
        self.frozen = Frozen(world)  # the process is paused (shared with its clock and view)
        # Called once when the server next acts on a refresh token of ours (SIGTERM mid-spend).
        self.on_spend: Callable[[], None] | None = None

    async def fetch(
        self, refresh_token: str | None = None, *, dpop_jkt: str | None = None
    ) -> TokenSet:
        """Send the request; the server acts when it arrives; the reply may be lost.

        A real server acts on a request that reached it whether or not its client still
        waits: a request the client gives up on (cancels) is still acted on when it arrives,
        and its reply is lost. Only a request whose sender died is treated as maybe-never-sent.

        A paused process sends nothing: a request leaves once its process runs (a pause that
        began before it left holds it back). Once it left, the pause holds back only the
        reading of the reply: the request reaches the server and is acted on as it arrives.
        """
        if self.frozen.until > self._world.now:
            await self.frozen.thaw()
        server = self._server
        if self.dead:
            raise TransientTokenError("simulated: the process is dead")
        sent_wall = self._clock.time()
        proof = None
        if self.dpop is not None:
            # As OAuthClient: a set bound to a key this replica lacks is not sent at all.
            try:
                key = self.dpop.find(dpop_jkt if refresh_token is not None else None)
            except DpopKeyMissing as exc:
                raise PermanentTokenError(str(exc), error="dpop_key_missing") from None
            proof = key.proof("POST", "http://sim/token", sent_wall)
        jkt = server.proof_key(proof)
        faults = server.faults
        if faults.down:
            await self._world.sleep(0.01)
            raise TransientTokenError("token endpoint unreachable: connection refused")
        delay = 0.02 + self._rng.random() * 0.05 + faults.slow
        if refresh_token is not None:
            server.sends.append((self._world.now, self.replica, refresh_token))
            delay += faults.stall_next
            faults.stall_next = 0.0
        arrives_at = self._world.now + delay
        try:
            # On the wire: the sender's pause does not hold it back (swarm seed 53285: a
            # request sent 19 ms before a 44 s pause reached the server only after the pause,
            # after another replica's grace retry, and past the grace window).
            await self._world.sleep(delay)
        except asyncio.CancelledError:
            # The sender died (or gave up) with the request on the wire.
            if refresh_token is not None:
                if self.dead:
                    # Nobody can know whether the server got it.
                    server.in_flight_when_cancelled += 1
                else:
                    # The client gave up: the request still arrives and is acted on.
                    late = asyncio.ensure_future(
                        self._act_later(refresh_token, sent_wall, arrives_at, jkt)
                    )
                    server.late.add(late)
                    late.add_done_callback(server.late.discard)
                server.dropped_on_sigterm += self.draining and not self.dead
            raise
        faults = server.faults
        if faults.status is not None:
            raise TransientTokenError(
                f"http {faults.status}", status=faults.status, retry_after=faults.retry_after
            )
        lost = self._rng.random() < faults.lose_replies
        record: Presentation | None = None
        if refresh_token is None:
            server.cc_requests += 1
            token = TokenSet(
                server._new_access(),
                "Bearer" if jkt is None else "DPoP",
                sent_wall,
                sent_wall + server.lifetime,
                dpop_jkt=jkt,
            )
        else:
            try:
                token = server.refresh(refresh_token, self.replica, sent_wall, jkt)
            except PermanentTokenError:
                await self._world.sleep(0.02)
                raise
            record = server.presentations[-1]
            if record.outcome == "rotated":
                server.phases.reached("acted", self.replica)
            if lost:
                record.reply_lost, record.lost_by = True, "wire"
            elif faults.error_after_acting is not None and record.outcome == "rotated":
                # Rotated, then failed while rendering: the new token is in no answer.
                status = faults.error_after_acting
                record.reply_lost, record.lost_by = True, "server_error"
                await self._world.sleep(0.02)
                raise classify_error(status, {}, b"", sent_at=sent_wall, rotating=True)
            if self.on_spend is not None:
                on_spend, self.on_spend = self.on_spend, None
                on_spend()
        try:
            await self._world.sleep(0.02 + self._rng.random() * 0.05)
            if self.frozen.until > self._world.now:
                await self.frozen.thaw()
        except asyncio.CancelledError:
            # The caller gave up (or died) after the server acted: that reply is lost too.
            if record is not None:
                record.reply_lost = True
                record.lost_by = "sender_died" if self.dead else "gave_up"
                server.dropped_on_sigterm += self.draining and not self.dead
            raise
        if lost:
            raise TransientTokenError("no answer: connection reset", outcome_unknown=True)
        return token

    async def _act_later(
        self, refresh_token: str, sent_wall: float, arrives_at: float, jkt: str | None
    ) -> None:
        """A cancelled request that is still on its way: the server acts on it on arrival."""
        await self._world.sleep(arrives_at - self._world.now)
        if self._server.faults.status is not None or self._server.faults.down:
            return
        with contextlib.suppress(PermanentTokenError):
            self._server.refresh(refresh_token, self.replica, sent_wall, jkt)
        record = self._server.presentations[-1]
        record.reply_lost, record.lost_by = True, "gave_up"


# ---- issue 20: faults aimed inside spends, and the faults added with them --------------------


class Frozen:
    """Whether a process is paused (a GC pause, a stalled event loop, a stopped container).

    A paused process runs nothing: each of its waits (clock, store, token endpoint) ends no
    earlier than the pause, while the world's time, its leases included, runs on.
    """

    def __init__(self, world: SimTime) -> None:
        self._world = world
        self.until = 0.0
        self.since = 0.0  # when the current (or last) pause began

    async def thaw(self) -> None:
        """Return once the process runs again."""
        while self._world.now < self.until:
            await self._world.sleep(self.until - self._world.now)


PHASES = ("announced", "sent", "acted")


class SpendPhases:
    """The moments inside a spend, as they happen: "announcing" (a replica is about to record
    one), "announced" (recorded), "sent" (marked sent, the token leaves), "acted" (the server
    rotated it; its answer is on the way to be committed). Aimed faults wait for them."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[str, str], None]] = []

    def reached(self, phase: str, replica: str) -> None:
        """`replica`'s spend reached `phase`."""
        for listener in list(self.listeners):
            listener(phase, replica)


P = ParamSpec("P")
R = TypeVar("R")

# The soonest a subscription dropped by a store restart is back (the watcher's first delay).
RESUBSCRIBE_AFTER_RESTART = 0.5

# How long a client waits for a write's answer before it gives up (the store's socket timeout).
LATE_WRITE_TIMEOUT = 1.0


# ---- the store --------------------------------------------------------------------------------


class Inbox:
    """One subscription's end of the store's notices: what MemoryStore.updates keeps in an
    asyncio.Queue (the store puts each notice with `put_nowait`, None to end every
    subscription), read without a task per notice; `wake` also ends its reader's wait when
    something that may drop connections changed."""

    def __init__(self, loop: SimLoop, look: Callable[[], bool]) -> None:
        self.notices: collections.deque[Notice | None] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self._loop = loop
        # A notice that found its reader waiting is not handed to it twice (woken to take it,
        # then again after its delivery delay): `_arrive` looks, where a woken reader would
        # have, whether it could take it (`look`: the subscription still hears); if so, the
        # reader is woken once, after the delay (`due`), and takes it as if it had slept it.
        self._look = look
        self.pending = False  # a notice came to a waiting reader; `_arrive` has not looked yet
        self.due: float | None = None  # the delivery delay of the notice the reader may take
        self.delivered = False  # that delay is over (the timer due then ran)
        # What the reader waits on when a poke woke it during that delay.
        self.delivery: asyncio.Future[None] | None = None
        # Takes a heartbeat, the only notice in the inbox, as the reader woken for it would,
        # when that is all the reader would do before waiting again (see
        # NoticeFaults.updates); False: the reader must be woken.
        self.heartbeat: Callable[[], bool] | None = None

    def put_nowait(self, notice: Notice | None) -> None:
        """The store published `notice` (None: the store closed)."""
        self.notices.append(notice)
        waiter = self.waiter
        if waiter is None or waiter.done() or self.pending or self.due is not None:
            return  # the reader is busy, or already to be woken: it takes this one after
        if notice is None:
            waiter.set_result(None)  # the store closed: no delay
            return
        self.pending = True
        # (Where the woken reader's step would have been queued.)
        self._loop.arrive_soon(self)

    def _arrive(self) -> None:
        """What the reader woken by a notice would have done first: look whether it hears,
        then take the notice and wait its delivery delay (a timer at the same time pushed at
        the same moment); else wake it now, to end as it would have."""
        if not self.pending:
            return
        self.pending = False
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # woken meanwhile (a poke came first, or the store closed): it looks itself
        if not self._look():
            waiter.set_result(None)
            return
        loop = self._loop
        self.due = due = loop.now + NOTICE_DELAY
        self.delivered = False
        # (call_at, inlined.)
        timer = _WakeTimer(loop, due, self._deliver, (), _TIMER_CONTEXT)
        heappush(loop.heap, (due, NAN + 0.0, timer))

    def _deliver(self) -> None:
        """The delivery delay is over: wake the reader (wherever it waits for it), unless it
        would only take a heartbeat and wait again (`heartbeat`: then that is done here)."""
        self.delivered = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.heartbeat is not None and SHORTCUTS and self.heartbeat():
                return
            waiter.set_result(None)
            return
        delivery = self.delivery
        if delivery is not None and not delivery.done():
            delivery.set_result(None)

    def wake(self) -> None:
        """End the reader's wait (if it waits)."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _note_heard(core: BrokerCore) -> None:
    """What BrokerCore._read_notices does with a heartbeat: note that the channel talks."""
    core._heard_at = core._clock.monotonic()


class ConnectionWatch:
    """Wakes every subscription when something that may drop connections changed (a partition,
    an outage, a store restart), so a subscription checks at once instead of polling."""

    def __init__(self) -> None:
        self._inboxes: dict[Inbox, None] = {}  # (in the order they subscribed)

    def listen(self, inbox: Inbox) -> None:
        """Wake `inbox` at every change, until `forget`."""
        self._inboxes[inbox] = None

    def forget(self, inbox: Inbox) -> None:
        """Stop waking `inbox`."""
        self._inboxes.pop(inbox, None)

    def poke(self) -> None:
        """Something changed: wake every waiting subscription."""
        for inbox in list(self._inboxes):
            inbox.wake()


@dataclass
class StoreFaults:
    """What one replica's connection to the store does wrong right now."""

    partitioned: bool = False
    lose_replies: float = 0.0  # probability a write is applied but its answer is lost
    unreadable_after: float | None = None  # sets written after this time are unreadable here
    # Probability a write reaches the store only after its client timed out (and applies then).
    late_writes: float = 0.0
    slow_time: float = 0.0  # up to this many extra seconds each way for a `TIME` round trip
    # How many times this replica's subscription went half-open (a NAT or proxy forgot it):
    # a subscription made before the last time hears nothing more, and no error ever reaches
    # it (not a partition, not a restart). Commands, and subscriptions made later, work.
    half_opened: int = 0
    # Notices of these kinds never reach this replica's subscription (pub/sub delivers at most
    # once: a message is lost without an error); they are kept in the view's `lost` list, for
    # a script to deliver late.
    lost_kinds: frozenset[str] = frozenset()
    watch: ConnectionWatch | None = field(default=None, repr=False, compare=False)
    # When the partition began (world time), for the documented limit (World._mute_since).
    partitioned_since: float | None = None
    now: Callable[[], float] | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "partitioned" and self.__dict__.get("now") is not None:
            if value and not self.__dict__.get("partitioned"):
                object.__setattr__(self, "partitioned_since", self.now())  # type: ignore[misc]
            elif not value:
                object.__setattr__(self, "partitioned_since", None)
        object.__setattr__(self, name, value)
        watch = self.__dict__.get("watch")
        if watch is not None and name in ("partitioned", "half_opened"):
            watch.poke()


class SimMemoryStore(MemoryStore):
    """The shared MemoryStore; a restore (restart, rollback) wakes every subscription."""

    def __init__(
        self, clock: Clock, watch: ConnectionWatch, *, require_replica_ack: bool = False
    ) -> None:
        super().__init__(clock, require_replica_ack=require_replica_ack)
        self.watch = watch
        # What a replica holds after the last write it acknowledged (`WAIT 1` after
        # `mark_sent`): replication keeps order, so it has every write up to that one.
        self.acknowledged: MemoryState | None = None

    def restore(self, state: MemoryState) -> None:
        """Replace everything stored; subscriptions check whether their connection dropped."""
        super().restore(state)
        self.acknowledged = None
        self.watch.poke()

    async def mark_sent(self, app: str, *, owner: str, fence: int) -> bool:
        """Mark sent; when a replica acknowledged it, remember what that replica holds."""
        sent = await super().mark_sent(app, owner=owner, fence=fence)
        if sent and self.require_replica_ack:
            self.acknowledged = self.snapshot()
        return sent

    def _wait_for_replica(self) -> bool:
        """After a commit or an abort (WAIT, issue 20): when a replica acknowledged it,
        remember what that replica holds, as after `mark_sent` (swarm seeds 21255, 23291)."""
        acknowledged = super()._wait_for_replica()
        if acknowledged and self.require_replica_ack:
            self.acknowledged = self.snapshot()
        return acknowledged

    def failover_state(self, before: MemoryState) -> MemoryState:
        """What a failover (or a restore) to `before` keeps: with `sent` records acknowledged
        by a replica (store.require_replica_ack), every write up to the last acknowledged one
        survives on the replica promoted (issue 20, H4); only later writes are lost."""
        return self.acknowledged if self.acknowledged is not None else before

    def fail_over(self, before: MemoryState) -> None:
        """A failover to a replica that missed the writes since `before`, or since the last
        acknowledged one. The promoted replica's own replicas resync from it, so what it kept
        stays acknowledged: a second failover right after (two faults at one moment) keeps it
        too, where it used to go back to `before` and lose an acknowledged `sent` record (swarm
        seed 5863)."""
        kept = self.failover_state(before)
        self.restore(kept)
        if kept is not before:
            self.acknowledged = self.snapshot()


class StoreLink:
    """One replica's connection to the shared MemoryStore: where its commands go, what they
    cost (a hop each way), and what the connection does wrong right now (`faults`). The store's
    roles (below) send every command through it; SimStoreView is all of them."""

    def __init__(
        self,
        world: SimTime,
        shared: SimMemoryStore,
        rng: random.Random,
        written_at: dict[str, float],
    ) -> None:
        self._world = world
        self._loop = world._loop
        self._shared = shared
        self._rng = rng
        self._watch = shared.watch
        self.faults = StoreFaults(watch=shared.watch, now=lambda: world.now)
        self._outage = False
        self.dead = False  # the replica was killed
        self._written_at = written_at  # app → world time of the last stored commit (any view)
        self.restarts = [0]  # shared: the store's restarts so far (each drops every connection)
        self.draining = False  # SIGTERM received
        self.server: SimAuthServer | None = None  # counts a spend marked sent while draining
        self.frozen = Frozen(world)  # the process is paused (shared with its clock and source)
        self.name = ""  # the replica's (for the spend phases)
        self.phases = SpendPhases()  # the world's (set when the replica starts)
        self._late: set[asyncio.Future[None]] = set()  # writes still on their way
        self.moves = 0  # this connection moved to another primary (a failover, a split brain)
        self.marked_sent_at: float | None = None  # when this replica's last mark_sent applied
        # The fleet protocol version of the replica's code: what its writes carry (M5).
        self.protocol = PROTOCOL_VERSION
        # A replica of another protocol version keeps its lease and spend record where its own
        # rules say (here: apart from this version's), sharing only the token sets and notices.
        self.spend_store: MemoryStore | None = None
        self.lease_requests = 0  # acquire_lease calls made (the cost of a shared due time)
        self.loads = 0  # load calls made (the reads a refresh costs the fleet)
        self.lost: list[Notice] = []  # notices `faults.lost_kinds` kept from the subscription
        # Purges this connection recorded (world time, refused access fingerprint); shared.
        self.refusals: list[tuple[float, str]] = []
        # What the subscription's one consumer, BrokerCore._read_notices, does with a heartbeat
        # (note when the channel was last heard); set by the world (`Inbox.heartbeat`).
        self.heard: Callable[[], None] | None = None

    @property
    def _spends(self) -> MemoryStore:
        return self.spend_store if self.spend_store is not None else self._shared

    @property
    def outage(self) -> bool:
        """The store itself is down (every view)."""
        return self._outage

    @outage.setter
    def outage(self, down: bool) -> None:
        self._outage = down
        self._watch.poke()

    def _reachable(self) -> None:
        if self.faults.partitioned or self._outage or self.dead:
            raise StoreUnavailable("simulated: store unreachable")

    async def _hop(self) -> None:
        # (_reachable and SimTime.sleep, inlined: every store command makes two hops.)
        if self.faults.partitioned or self._outage or self.dead:
            raise StoreUnavailable("simulated: store unreachable")
        loop = self._loop
        future, timer = loop.sleeper(0.001 + self._rng.random() * 0.004)
        try:
            await future
        except BaseException:
            timer.cancel()
            raise
        if self.frozen.until > loop.now:
            await self.frozen.thaw()
        if self.faults.partitioned or self._outage or self.dead:
            raise StoreUnavailable("simulated: store unreachable")

    def _maybe_lose(self) -> None:
        if self._rng.random() < self.faults.lose_replies:
            raise StoreUnavailable("simulated: timeout after the write was applied")

    def _goes_late(self) -> bool:
        """Whether a write goes late now (the `late_writes` fault; one draw when it is on)."""
        late = self.faults.late_writes
        return bool(late) and not self.draining and self._rng.random() < late

    async def _apply_late(
        self, target: Callable[[], object], name: str, args: Any, kwargs: Any
    ) -> Any:
        """A write that reaches the store only after its client timed out: the client sees a
        timeout, and the command (`name` of the store `target` names once it left) applies
        later."""
        await self._hop()
        delay = LATE_WRITE_TIMEOUT * (1.0 + self._rng.random())
        command = cast(Callable[..., Coroutine[Any, Any, object]], getattr(target(), name))

        async def apply_later() -> None:
            await self._world.sleep(delay)
            with contextlib.suppress(StoreUnavailable):
                await command(*args, **kwargs)

        task = asyncio.ensure_future(apply_later())
        self._late.add(task)
        task.add_done_callback(self._late.discard)
        await self._world.sleep(LATE_WRITE_TIMEOUT)
        raise StoreUnavailable("simulated: timed out (the command is applied later)")

    def _dropped(self, restarts: int, moves: int) -> bool:
        """A subscription made at (`restarts`, `moves`) is cut off now."""
        return (
            self.faults.partitioned
            or self._outage
            or self.restarts[0] != restarts
            or self.moves != moves
        )

    def move_to(self, store: SimMemoryStore) -> None:
        """Connect to another primary from now on; the subscription drops and reconnects."""
        self._shared = store
        self.moves += 1
        self._watch.poke()


# How one replica's connection wraps each role of the store: every command of a role goes the
# one way `command` sends it (a hop there; the store; a reply that may be lost; a hop back).
# A role's wrapper only says, per command, which store it goes to, whether it is a write, and
# what the world notes about it (the phases of a spend, who wrote which set).


def command(
    method: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]],
    *,
    to: Callable[[StoreLink], object] | None = None,
    late: bool = False,
    lose: bool = False,
    back: bool = True,
    start: Callable[[StoreLink], None] | None = None,
    call: Callable[[StoreLink, Callable[[], Coroutine[Any, Any, R]], Any], Coroutine[Any, Any, R]]
    | None = None,
    finish: Callable[[StoreLink, R, Any], R] | None = None,
) -> Callable[Concatenate[StoreLink, P], Coroutine[Any, Any, R]]:
    """The role's `method` (its protocol's: the signature is the protocol's) over a connection:
    sent to the store `to` names when it arrives (None: the connection's primary), after a hop.

    `late`: a write that may apply only after its client timed out (`late_writes`); `lose`: a
    write whose answer may be lost after it applied (`lose_replies`); `back`: an answer comes
    back (a second hop). The world's notes: `start` before it leaves, `call` around the store's
    own call (given the call and the link's arguments), `finish` on the answer that came back.
    """
    name = method.__name__

    async def send(link: StoreLink, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if late and link._goes_late():
            target = (lambda: link._shared) if to is None else (lambda: to(link))
            return cast(R, await link._apply_late(target, name, args, kwargs))
        if start is not None:
            start(link)
        await link._hop()
        # (A string: the subscripted type, built at each call, was a thirtieth of its cost.)
        store = link._shared if to is None else to(link)
        run = cast("Callable[P, Coroutine[Any, Any, R]]", getattr(store, name))
        if call is None:
            result = await run(*args, **kwargs)
        else:
            result = await call(link, lambda: run(*args, **kwargs), (args, kwargs))
        if lose:
            link._maybe_lose()
        if back:
            await link._hop()
        return result if finish is None else finish(link, result, (args, kwargs))

    send.__name__ = send.__qualname__ = name
    send.__doc__ = method.__doc__
    return send


def _spends(link: StoreLink) -> object:
    return link._spends


# ---- token sets


def _count_load(link: StoreLink) -> None:
    link.loads += 1


def _unreadable(link: StoreLink, token: TokenSet | None, call: Any) -> TokenSet | None:
    """A set written under a key this replica lacks (by one that already encrypts under it)."""
    after = link.faults.unreadable_after
    app = call[0][0]
    if token is not None and after is not None and link._written_at.get(app, -1.0) >= after:
        raise UnreadableTokenSet("simulated: unknown key", rank=token.rank, version=token.version)
    return token


def _readable(link: StoreLink, found: dict[str, TokenSet], call: Any) -> dict[str, TokenSet]:
    """The sets this replica can open (see `_unreadable`)."""
    after = link.faults.unreadable_after
    if after is None:
        return found
    return {a: t for a, t in found.items() if link._written_at.get(a, -1.0) < after}


async def _stamped(
    link: StoreLink, run: Callable[[], Coroutine[Any, Any, Commit]], call: Any
) -> Commit:
    """A commit: the store stamps the writer's protocol version (as the Redis scripts of its
    code do), and the world notes when the app's stored set last changed."""
    app = call[0][0]
    before = link._shared.state.tokens.get(app)
    link._shared.protocol = link.protocol
    try:
        result = await run()
    finally:
        link._shared.protocol = PROTOCOL_VERSION
    if link._shared.state.tokens.get(app) is not before:
        link._written_at[app] = link._world.now
    return result


async def _noted_refusal(
    link: StoreLink, run: Callable[[], Coroutine[Any, Any, Refusal]], call: Any
) -> Refusal:
    result = await run()
    if result is Refusal.RECORDED:
        link.refusals.append((link._world.now, call[0][1]))
    return result


class SetsFaults(StoreLink):
    """The TokenSets role over the connection: a set written under a key this replica lacks
    is unreadable here."""

    load = command(TokenSets.load, start=_count_load, finish=_unreadable)
    load_many = command(TokenSets.load_many, finish=_readable)
    commit = command(TokenSets.commit, late=True, lose=True, call=_stamped)
    refuse_token = command(TokenSets.refuse_token, late=True, lose=True, call=_noted_refusal)
    lower_expiry = command(TokenSets.lower_expiry, late=True, lose=True)


# ---- the spend ledger


def _count_lease(link: StoreLink) -> None:
    link.lease_requests += 1


async def _announcing(
    link: StoreLink, run: Callable[[], Coroutine[Any, Any, SpendStart]], call: Any
) -> SpendStart:
    link.phases.reached("announcing", link.name)
    result = await run()
    if result in (SpendStart.OK, SpendStart.RETRY):
        link.phases.reached("announced", link.name)
    return result


def _sending_after_sigterm(link: StoreLink) -> None:
    if link.draining and not link.dead and link.server is not None:
        link.server.sent_after_sigterm += 1


async def _marking(
    link: StoreLink, run: Callable[[], Coroutine[Any, Any, bool]], call: Any
) -> bool:
    result = await run()
    if result:
        link.marked_sent_at = link._world.now
        link.phases.reached("sent", link.name)
    return result


async def _ending(link: StoreLink, run: Callable[[], Coroutine[Any, Any, None]], call: Any) -> None:
    await run()
    link.marked_sent_at = None  # ended: no longer a spend marked sent and maybe unsent


class LedgerFaults(StoreLink):
    """The SpendLedger role over the connection (to the spend store of its protocol version)."""

    acquire_lease = command(
        SpendLedger.acquire_lease, to=_spends, late=True, lose=True, start=_count_lease
    )
    release_lease = command(SpendLedger.release_lease, to=_spends, late=True, lose=True, back=False)
    begin_spend = command(
        SpendLedger.begin_spend, to=_spends, late=True, lose=True, call=_announcing
    )
    mark_sent = command(
        SpendLedger.mark_sent,
        to=_spends,
        late=True,
        lose=True,
        start=_sending_after_sigterm,
        call=_marking,
    )
    load_spend = command(SpendLedger.load_spend, to=_spends)
    veto_spend = command(SpendLedger.veto_spend, to=_spends, late=True, lose=True, back=False)
    end_spend = command(
        SpendLedger.end_spend, to=_spends, late=True, lose=True, back=False, call=_ending
    )


# ---- notices


class NoticeFaults(StoreLink):
    """The Notices role over the connection: a subscription that a partition, an outage, a
    restart or a move cuts off, that may go half-open, and that may lose notices."""

    async def updates(self) -> AsyncIterator[Notice]:
        """Notices, until this connection breaks.

        Subscribes as MemoryStore.updates does (its `_check` on subscribing and on each notice,
        None ends it), into an Inbox that the watch also wakes: one wait per notice, no task.
        """
        self._reachable()
        store = self._shared
        store._check()
        loop = self._loop
        restarts, moves = self.restarts[0], self.moves
        half_opened = self.faults.half_opened

        def hears() -> bool:
            """The subscription is neither half-open nor cut off."""
            return self.faults.half_opened == half_opened and not self._dropped(restarts, moves)

        inbox = Inbox(loop, hears)
        heard = self.heard
        if heard is not None:

            def heartbeat() -> bool:
                """A heartbeat's whole effect on the reader, without waking it (a sixth of a
                schedule's loop callbacks are readers woken for heartbeats): when it is the
                only notice, the reader would take it (the store up, the process not frozen,
                the subscription hearing, heartbeats not lost), its consumer would note it
                (`heard`: BrokerCore's `_heard_at`) and it would wait again, all in a step
                queued behind the callbacks ready now. When none of those is a task step
                (`only_wakes_ready`), nothing can change in between: do it now."""
                notices = inbox.notices
                if (
                    len(notices) != 1
                    or notices[0] is None
                    or notices[0].kind != HEARTBEAT
                    or store.fail
                    or self.frozen.until > self._world.now
                    or not hears()
                    or HEARTBEAT in self.faults.lost_kinds
                    or not loop.only_wakes_ready()
                ):
                    return False
                notices.popleft()
                inbox.due = None
                heard()
                return True

            inbox.heartbeat = heartbeat
        # (An inbox stands in for MemoryStore's queue; published to in the order subscribed.)
        store._subscribers[inbox] = None  # type: ignore[index]
        self._watch.listen(inbox)
        try:
            while True:
                # Woken by a notice, or by a change that may have dropped the connection.
                delayed = False  # the notice to take has had its delay (Inbox.due)
                while True:
                    if inbox.due is not None:
                        # A notice taken (by Inbox._arrive) and delayed: woken at its due
                        # time, or by a poke meanwhile, that a reader asleep in the delay
                        # would not have seen: sleep on.
                        inbox.due = None
                        if not inbox.delivered:
                            inbox.delivery = loop.create_future()
                            try:
                                await inbox.delivery
                            finally:
                                inbox.delivery = None
                        delayed = True
                        break
                    if self.faults.half_opened != half_opened:
                        break
                    if self._dropped(restarts, moves):
                        raise StoreUnavailable("simulated: subscription dropped")
                    if inbox.notices:
                        break
                    inbox.waiter = loop.create_future()
                    await inbox.waiter
                if delayed or self.faults.half_opened == half_opened:
                    taken = inbox.notices.popleft()
                    if taken is None:
                        return  # the store closed every subscription
                    notice = taken
                    store._check()
                    if not delayed:
                        # (SimTime.sleep, inlined: a notice waits here for its delivery.)
                        future, timer = loop.sleeper(NOTICE_DELAY)
                        try:
                            await future
                        except BaseException:
                            timer.cancel()
                            raise
                    if self.frozen.until > self._world.now:
                        await self.frozen.thaw()
                if self.faults.half_opened != half_opened:
                    # Half-open: silence for good; only the subscriber's own deadline ends it.
                    await asyncio.Future()
                # A restart drops every connection at once: nothing published after it reaches
                # a subscription made before it.
                if self._dropped(restarts, moves):
                    raise StoreUnavailable("simulated: subscription dropped")
                after = self.faults.unreadable_after
                if (
                    notice.token is not None
                    and after is not None
                    and self._written_at.get(notice.app, -1.0) >= after
                ):
                    # The set it carries is under a key this replica lacks: it cannot open it.
                    notice = replace(notice, token=None)
                if notice.kind in self.faults.lost_kinds:
                    self.lost.append(notice)
                    continue
                yield notice
        finally:
            store._subscribers.pop(inbox, None)  # type: ignore[call-overload]
            self._watch.forget(inbox)

    heartbeat = command(Notices.heartbeat, back=False)


# ---- fleet signals, the server clock, the connection itself


class SignalFaults(StoreLink):
    """The FleetSignals role over the connection."""

    record_failure = command(FleetSignals.record_failure, lose=True, back=False)
    load_failure = command(FleetSignals.load_failure, back=False)
    clear_failure = command(FleetSignals.clear_failure, lose=True, back=False)
    take_budget = command(FleetSignals.take_budget, back=False)


class ClockFaults(StoreLink):
    """The ServerClock role over the connection: each way slower while `TIME` is slow."""

    async def server_time(self) -> float:
        """The store's clock, after a hop (each way slower while `TIME` round trips are slow)."""
        await self._hop()
        if self.faults.slow_time:
            await self._world.sleep(self._rng.random() * self.faults.slow_time)
        now = await self._shared.server_time()
        if self.faults.slow_time:
            await self._world.sleep(self._rng.random() * self.faults.slow_time)
        return now


class LifecycleFaults(StoreLink):
    """The Lifecycle role over the connection."""

    async def ping(self) -> None:
        """Answer unless unreachable."""
        await self._hop()

    async def close(self) -> None:
        """Nothing to close."""


class SimStoreView(
    SetsFaults, LedgerFaults, NoticeFaults, SignalFaults, ClockFaults, LifecycleFaults
):
    """One replica's connection to the shared MemoryStore, with that connection's faults: every
    role of the store (a TokenStore)."""


# ---- replicas ---------------------------------------------------------------------------------


@dataclass
class Replica:
    """One broker process of the fleet."""

    name: str
    clock: ReplicaClock
    view: SimStoreView
    source: SimSource
    core: BrokerCore
    task: asyncio.Task[None]
    alive: bool = True
    retiring: AppRefresher | None = None  # the refresher a config reload is replacing

    @property
    def refresher(self) -> AppRefresher:
        """The app's refresher (while a reload replaces it, the one being retired)."""
        current = self.core.refreshers.get(APP)
        if current is None:
            assert self.retiring is not None
            return self.retiring
        return current


@dataclass
class WorldConfig:
    """The shape of one simulated world."""

    replicas: int
    lifetime: float
    grace: float
    offsets: list[float]
    # DPoP (issue 23): the server binds each grant to the fleet's key (one key file, shared)
    # and refuses a refresh proved with another key.
    dpop: bool = False
    policy: RefreshPolicy = field(
        default_factory=lambda: RefreshPolicy(
            at_fraction=0.75, min_remaining=10.0, jitter=0.05, safety_margin=6.0
        )
    )


TIMING = Timing(
    min_attempt=1.0, max_attempt=10.0, persist=1.0, margin=0.5, objection=0.5, objection_idle=6.0
)


class _Unscraped(CollectorRegistry):
    """A replica's metrics registry, which nothing scrapes: it takes every metric without
    prometheus-client's check of its names against the others' (a tenth of the cost of
    starting a replica; the metrics themselves count as ever)."""

    def register(self, collector: Collector) -> None:
        """Take `collector` unchecked."""


def _keys_by_kind(state: MemoryState) -> tuple[dict[str, Any], ...]:
    """The keys an eviction may take, in the order `World.evict` draws them."""
    return (state.tokens, state.leases, state.fences, state.spends)


class World:
    """The store, the server and the replicas of one schedule."""

    def __init__(self, config: WorldConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.time = SimTime()
        self.store_clock = StoreClock(self.time)
        # The store models Redis with replicas (Sentinel): each `sent` record is acknowledged
        # by a replica before its token is sent (store.require_replica_ack, issue 20, H4).
        self.store = SimMemoryStore(self.store_clock, ConnectionWatch(), require_replica_ack=True)
        # During a split brain: the old primary some replicas still write to, and their views.
        self.stale_primary: SimMemoryStore | None = None
        self._split_views: list[SimStoreView] = []
        self._split_cause: object = None
        self._split_at = 0.0  # when the split began
        self.offsets = list(config.offsets)  # grows as pods join
        self.written_at: dict[str, float] = {}
        self.restarts = [0]  # a restart (empty, or from a snapshot) drops every subscription
        # Fleet-wide purges the store recorded (world time, refused access fingerprint).
        self.refusals: list[tuple[float, str]] = []
        # DPoP: the fleet's one key (its key file), made outside the world's generator so that
        # a seed's draws are the same with DPoP on or off.
        self.dpop_keys: ProofKeys | None = None
        if config.dpop:
            key = ProofKey(generate_key(DpopAlgorithm.ES256), DpopAlgorithm.ES256)
            self.dpop_keys = ProofKeys((key,))
        self.server = SimAuthServer(
            self.time,
            rng,
            lifetime=config.lifetime,
            grace=config.grace,
            dpop_jkt=self.dpop_keys.current.jkt if self.dpop_keys else None,
        )
        # The documented limit (README, "What a crash can lose"): `sent` records an empty
        # restart, a rollback or an eviction erased, or the committed sets that had resolved
        # them (refresh fingerprint → spender, when), and the refresh tokens then spent again
        # while that spender and every other replica that knew could not speak.
        self._forgotten_sent: dict[str, tuple[str, float]] = {}
        self.forgotten_while_alone: set[str] = set()
        # The same limit for a token set: refresh tokens of the server's newest set, evicted
        # from the store (or erased by a restore) while no running process held it (its
        # writer had exited).
        self.evicted_while_alone: set[str] = set()
        self.server.phases.listeners.append(self._on_sent)
        self.replicas: list[Replica] = []
        self.metrics: list[Metrics] = []  # every incarnation's, dead ones included
        self.draining: list[asyncio.Future[None]] = []  # replicas shutting down after SIGTERM
        self.store_outage = False
        self.store_outage_since: float | None = None  # when the store went down, while it is
        # Every outage of the store for everyone: [went down, came back (None: still down)].
        self.store_outages: list[tuple[float, float | None]] = []
        # The documented limit of a drain (README, "What a crash can lose"): spends (owner,
        # fence, refresh fingerprint) marked sent, never sent, whose spender exited at its
        # drain's bound without reaching the store once since the mark (`_note_stranded`).
        self.stranded_by_drain: set[tuple[str, int, str]] = set()
        self._incarnations = itertools.count(1)
        self._reloads = 0  # config reloads so far (each names its new refresher apart)
        self._replaced_views: list[SimStoreView] = []  # of incarnations since replaced
        # A second fleet sharing the store under the same app name and key prefix, with
        # another client (M6): its own server and replicas (`start_second_fleet`).
        self.other_server: SimAuthServer | None = None
        self.others: list[Replica] = []
        self._newer_store: MemoryStore | None = None
        self.spec = AppSpec(
            name=APP,
            token_url="http://sim/token",
            grant_type=GrantType.AUTHORIZATION_CODE,
            refresh=RefreshPolicy(
                at_fraction=config.policy.at_fraction,
                min_remaining=config.policy.min_remaining,
                jitter=config.policy.jitter,
                safety_margin=config.policy.safety_margin,
                reuse_grace=config.grace,
            ),
        )

    @functools.cached_property
    def key(self) -> str:
        """The name the store knows the fleet's set by (the app and its client binding; the
        world's spec never changes)."""
        return self.key_of(self.spec)

    @staticmethod
    def key_of(spec: AppSpec) -> str:
        """The store name of `spec`'s set, as its refreshers compute it."""
        return bound_name(spec.name, client_binding(spec, spec.client_id))

    async def authorize(self) -> None:
        """The operator runs `token-broker authorize` once."""
        await self.store.commit(self.key, self.server.authorize())

    def start_replica(self, index: int, *, protocol: int = PROTOCOL_VERSION) -> Replica:
        """Start (or restart) replica `index` with empty memory, as `token-broker serve` does.

        Its wall clock is off by its offset; like the broker, it measures its offset to the
        store's clock first (briefly) and keeps fleet time from then on. `protocol`: the fleet
        protocol version of its code (a rolling deploy of a newer release, M5).
        """
        replica = self._new_replica(index, self.spec, self.server, "r", protocol)
        if index < len(self.replicas):
            # The incarnation replaced may still be draining after a SIGTERM: it still talks
            # to the store (and sees its outages end).
            self._replaced_views.append(self.replicas[index].view)
            self.replicas[index] = replica
        else:
            self.replicas.append(replica)
        return replica

    async def start_second_fleet(self, replicas: int, client_id: str) -> None:
        """Another fleet shares the store, the key prefix and the app's name, with another
        client (and its own server, and grant authorized later: a higher lineage) (M6)."""
        self.other_server = SimAuthServer(
            self.time, self.rng, lifetime=self.config.lifetime, grace=self.config.grace
        )
        spec = replace(self.spec, client_id=client_id)
        grant = replace(self.other_server.authorize(), lineage=2)
        await self.store.commit(self.key_of(spec), grant)
        for index in range(replicas):
            self.others.append(self._new_replica(index, spec, self.other_server, "b", None))

    def _newer_protocol_store(self) -> MemoryStore:
        """Where replicas of a newer protocol version keep their leases and spend records: their
        own place (the new rules this version cannot know), the same sets and notices."""
        if self._newer_store is None:
            self._newer_store = MemoryStore(StoreClock(self.time))
            self._newer_store.state.tokens = self.store.state.tokens
            self._newer_store._subscribers = self.store._subscribers
        return self._newer_store

    def _new_replica(
        self,
        index: int,
        spec: AppSpec,
        server: SimAuthServer,
        prefix: str,
        protocol: int | None,
    ) -> Replica:
        offset = self.offsets[index]
        frozen = Frozen(self.time)
        host_clock = ReplicaClock(self.time, offset, mono_base=1000.0 * (index + 1), frozen=frozen)
        name = f"{prefix}{index}.{next(self._incarnations)}"
        # (seeded by the name, as the core's generator: the world's draws stay as they were)
        clock = FleetClock(host_clock, rng=random.Random(f"{name}:clock"))
        view = SimStoreView(
            self.time, self.store, random.Random(self.rng.random()), self.written_at
        )
        view.frozen = frozen
        view.phases = server.phases
        view.restarts = self.restarts
        view.refusals = self.refusals
        view.server = server
        view.outage = self.store_outage
        if protocol is not None and protocol != PROTOCOL_VERSION:
            view.protocol = protocol
            view.spend_store = self._newer_protocol_store()
            view.spend_store.protocol = protocol
        source = SimSource(
            self.time,
            server,
            clock,
            random.Random(self.rng.random()),
            self.replica_dpop_keys(name_index=index) if server is self.server else None,
        )
        source.frozen = frozen
        source.replica = name
        view.name = name
        metrics = Metrics(_Unscraped())
        self.metrics.append(metrics)
        # (seeded by the name, not drawn from the world's generator: seeds replay as before)
        observer = Observer(metrics)
        core = BrokerCore({}, view, clock, observer, rng=random.Random(name))
        host_clock.core = core
        view.heard = functools.partial(_note_heard, core)
        core.add_app(
            self._refresher(name, source, view, clock, observer, spec=spec, host_clock=host_clock)
        )

        async def serve() -> None:
            await clock.measure_within(view, 3.0)
            measuring = asyncio.ensure_future(clock.run(view))
            try:
                await core.run()
            finally:
                measuring.cancel()

        task = asyncio.ensure_future(serve())
        return Replica(name, host_clock, view, source, core, task)

    def replica_dpop_keys(self, name_index: int) -> ProofKeys | None:
        """The DPoP keys replica `name_index` proves with: the fleet's key file."""
        del name_index  # every replica reads the same key file
        return self.dpop_keys

    async def crash(self, index: int) -> None:
        """SIGKILL: everything the replica was doing stops where it is."""
        replica = self.replicas[index]
        replica.alive = False
        # A dead process touches nothing again: its connections fail at once, without effect.
        replica.view.dead = True
        replica.source.dead = True
        spend = self.store.state.spends.get(self.key)
        marked = replica.view.marked_sent_at
        unsent = marked is not None and not any(
            at >= marked and name == replica.name for at, name, _ in self.server.sends
        )
        if unsent or (
            spend is not None and self.replica_of(spend.owner) is replica and spend.state == "sent"
        ):
            # Killed after marking its spend sent, maybe before the request left: nobody can
            # know whether the server got it (as for a request on the wire). Asked of the
            # replica, not only of the store's record, which an eviction may have dropped.
            self.server.in_flight_when_cancelled += 1
        self._only_copy_dies(replica)
        inflight = replica.refresher._inflight
        for task in [replica.task] + ([inflight] if inflight is not None else []):
            task.cancel()
        await self.time.settle()

    def terminate(self, index: int) -> None:
        """SIGTERM: stop scheduling, let a spend in flight finish and persist, then exit.

        The drain runs on simulated time beside everything else, bounded as the broker bounds
        it (on the injected clock); the replica counts as gone (it no longer serves) from the
        signal on. At the bound the process exits: whatever is still in flight is dropped.
        """
        replica = self.replicas[index]
        replica.alive = False
        replica.core.draining = True
        replica.source.draining = True
        replica.view.draining = True

        async def drain_then_exit() -> None:
            started, bound = self.time.now, replica.core.drain_bound()
            await replica.core.drain(None)
            # The drain's timer runs on the replica's clock (its own monotonic base): in world
            # time it can end a rounding error short of the bound (swarm seed 6938: 1e-13 s).
            ran_to_bound = self.time.now - started >= bound - TIMER_ROUNDING
            if ran_to_bound:
                self._note_stranded(replica)
            unstored = replica.refresher._unsynced and self._only_copy(replica) is not None
            if not ran_to_bound and unstored:
                # The drain ended on its own, holding the only copy of the newest set, which
                # it knew the store had not taken: it could have waited (to its bound).
                self.server.unstored_on_sigterm += 1
            self._only_copy_dies(replica)
            replica.task.cancel()
            inflight = replica.refresher._inflight
            if inflight is not None:
                inflight.cancel()  # the process is gone
            await asyncio.gather(
                replica.task, *([inflight] if inflight else []), return_exceptions=True
            )

        self.draining.append(asyncio.ensure_future(drain_then_exit()))

    def _note_stranded(self, replica: Replica) -> None:
        """The drain of `replica` ran to its bound: note the documented limit of a drain if
        its spend is `sent` in the store but was never sent (its `mark_sent` applied, the
        answer lost), and the process could not reach the store at any moment since: cut off
        (the store down, or this process partitioned from it) from before that answer could
        come back until now. Only that process knew the token never left, and it must exit;
        the record names a spend nobody can end (no other replica can tell it from a request
        on the wire). A split brain is not this: its old primary takes the abort."""
        view = replica.view
        marked = view.marked_sent_at
        if marked is None or not replica.refresher.fleet.abort_unwritten:
            return
        if any(at >= marked and name == replica.name for at, name, _ in self.server.sends):
            return  # sent after all
        if view.outage and self.store_outage_since is not None:
            cut_since: float | None = self.store_outage_since
        elif view.faults.partitioned:
            cut_since = view.faults.partitioned_since
        else:
            return
        if cut_since is None or cut_since > marked + REPLY_HOP:
            return  # the store answered the mark, or something after it
        spend = self.store.state.spends.get(self.key)
        if (
            spend is not None
            and spend.state == "sent"
            and spend.owner == replica.refresher.fleet.owner
        ):
            self.stranded_by_drain.add((spend.owner, spend.fence, spend.refresh_fp))

    def terminate_mid_spend(self, index: int) -> None:
        """SIGTERM the moment the server acts on this replica's next refresh token."""
        self.replicas[index].source.on_spend = lambda: self.terminate(index)

    def restart_after_sigterm(self, index: int) -> None:
        """Start the replica again if its SIGTERM came; else the SIGTERM is called off."""
        replica = self.replicas[index]
        replica.source.on_spend = None
        if not replica.alive:
            self.start_replica(index)

    def split_brain(self, indexes: Sequence[int], *, cause: object = None) -> None:
        """A failover that leaves the old primary writable (asynchronous replication, a
        partition): replicas `indexes` keep writing to the old primary, cut off from its own
        replicas (so none acknowledges its writes); the rest move to the promoted replica,
        which holds everything written so far (`self.store` from now on stands for it). Every
        subscription drops, as connections do in a failover. One split at a time: another
        while one lasts is ignored; `cause` names the split that `heal_split_brain` ends."""
        if self.stale_primary is not None:
            return
        old = SimMemoryStore(
            StoreClock(self.time),
            self.store.watch,
            require_replica_ack=self.store.require_replica_ack,
        )
        old.restore(self.store.snapshot())
        old.replicas_acknowledge = False
        self.stale_primary = old
        self._split_cause = cause
        self._split_at = self.time.now
        self._split_views = [self.replicas[i].view for i in indexes]
        for view in self._split_views:
            view.move_to(old)
        self.restarts[0] += 1
        self.store.watch.poke()

    def heal_split_brain(self, cause: object = None) -> None:
        """The old primary rejoins as a replica of the new one: what was written to it alone
        is lost, and its clients reconnect to the new primary (only the split `cause` made)."""
        if self.stale_primary is None or cause is not self._split_cause:
            return
        for view in self._split_views:
            view.move_to(self.store)
        self._split_views = []
        self.stale_primary = None

    def set_store_outage(self, down: bool) -> None:
        """The store is down for everyone (or back)."""
        if down and not self.store_outage:
            self.store_outage_since = self.time.now
            self.store_outages.append((self.time.now, None))
        elif not down:
            self.store_outage_since = None
            if self.store_outage:
                self.store_outages[-1] = (self.store_outages[-1][0], self.time.now)
        self.store_outage = down
        for replica in self.replicas:
            replica.view.outage = down
        for view in self._replaced_views:
            # A draining process replaced meanwhile: it used to stay in the outage for good,
            # and could not write what its drain waits to store (swarm seed 5510).
            view.outage = down

    async def shutdown(self) -> None:
        """Stop every replica (end of the schedule)."""
        for index, replica in enumerate(self.replicas):
            if replica.alive:
                await self.crash(index)
        for replica in self.others:
            replica.alive = False
            replica.view.dead = replica.source.dead = True
            replica.task.cancel()
        await asyncio.gather(*(r.task for r in self.others), return_exceptions=True)
        for task in self.draining:
            task.cancel()
        await asyncio.gather(*self.draining, return_exceptions=True)

    # ---- issue 20: faults aimed inside spends, and the faults added with them ----------------

    def pause(self, index: int, seconds: float) -> None:
        """Freeze replica `index` for `seconds` (longer than its lease): it resumes unaware."""
        frozen = self.replicas[index].view.frozen
        if frozen.until <= self.time.now:
            frozen.since = self.time.now
        frozen.until = max(frozen.until, self.time.now + seconds)

    # ---- the documented limit: a store that forgot, and a witness that could not speak ----

    def empty_restart(self) -> None:
        """Redis restarts with nothing (no persistence, or every node lost power at once): every
        key is gone, on every node, whatever a replica acknowledged. A `sent` record lost so
        is remembered, with its spender, for `forgotten_while_alone`, and the newest set lost
        so is counted as an evicted one when no running process holds it, as a restore's is
        (swarm seed 118156: a first empty restart as the server rotated dropped every
        subscription, the spender's drain committed the answer, unheard, and exited, and a
        second one 44 ms later erased that set)."""
        self._note_forgotten(MemoryState())
        self._note_set_evicted()
        self.store.restore(MemoryState())
        self.restarts[0] += 1

    def roll_back(self, snapshot: MemoryState) -> None:
        """A restore of the store from `snapshot` (an operator's restore, a failover to a
        node far behind): what was written since is gone, an acknowledged `sent` record too,
        as in an empty restart, and the newest set with it: counted as an evicted one when no
        running process holds it (swarm seed 52433: its writer had crashed 32 ms before, the
        others had missed its notice while re-subscribing after a failover)."""
        self._note_forgotten(snapshot)
        stored = self.store.state.tokens.get(self.key)
        kept = snapshot.tokens.get(self.key)
        if stored is not None and (kept is None or kept.refresh_token != stored.refresh_token):
            self._note_set_evicted()
        self.store.restore(snapshot)
        self.restarts[0] += 1

    def _note_forgotten(self, after: MemoryState) -> None:
        """The store is about to hold `after`: remember a `sent` record it loses so, with its
        spender (the documented limit of a store without durable writes)."""
        spend = self.store.state.spends.get(self.key)
        kept = after.spends.get(self.key)
        if spend is not None and spend.state == "sent" and kept != spend:
            self._forgotten_sent[spend.refresh_fp] = (spend.owner, self.time.now)
        self._note_rotations_forgotten(after)

    def _note_rotations_forgotten(self, after: MemoryState) -> None:
        """The store is about to hold `after`: remember each spend whose rotation it forgets
        with the set the answer made, with the spender that got the answer (swarm seed 81490).

        A commit resolves its spend: the set it stores, not the `sent` record, is then the
        store's one trace that its parent's refresh token was spent. A store that loses that
        set and keeps its parent (or nothing) forgot the spend as surely as one that loses the
        `sent` record before the commit: the same documented limit, and the same witnesses
        (the spender and the holders of the newer set) must be unable to speak. A spend whose
        record `after` still holds is not forgotten."""
        lost = self.store.state.tokens.get(self.key)
        kept = after.tokens.get(self.key)
        if lost is None or lost.refresh_token is None or (kept and kept.rank >= lost.rank):
            return
        issued_by = {p.issued: p for p in self.server.presentations if p.issued is not None}
        record = after.spends.get(self.key)
        token, rank = lost.refresh_token, lost.rank
        while token in issued_by:
            # The presentation that issued `token` spent the refresh token of the set one
            # generation below: forgotten if the store keeps no set at or above that one.
            rank = (rank[0], rank[1] - 1)
            if kept is not None and kept.rank > rank:
                return
            rotation = issued_by[token]
            spent = fingerprint(rotation.refresh_token)
            if record is None or record.refresh_fp != spent:
                self._forgotten_sent[spent] = (rotation.replica, self.time.now)
            token = rotation.refresh_token

    def _on_sent(self, phase: str, replica: str) -> None:
        """A spend is marked sent: is it of a token whose `sent` record an empty restart erased
        while its spender, the only one that knew, could not speak (dead or paused since)?"""
        if phase != "sent":
            return
        spend = self.store.state.spends.get(self.key)
        forgotten = self._forgotten_sent.get(spend.refresh_fp) if spend is not None else None
        if spend is None or forgotten is None or spend.owner == forgotten[0]:
            return
        owner, at = forgotten
        if self._mute_since(owner, at) and not self._others_know(
            spend.refresh_fp, spend.rank, owner, at
        ):
            sender = next((r for r in self.replicas if r.name == replica), None)
            token = sender.refresher.token if sender is not None else None
            if token and token.refresh_token and token.refresh_fingerprint == spend.refresh_fp:
                self.forgotten_while_alone.add(token.refresh_token)

    def _others_know(self, refresh_fp: str, rank: tuple[int, int], owner: str, at: float) -> bool:
        """Some replica other than the spender that could speak knows the token was sent (it
        heard the notice: then a veto was due), or holds a set newer than the one it was spent
        from (then a write-back was due, which makes the spend stale): nothing is excused."""
        for replica in self.replicas:
            fleet = replica.refresher.fleet
            if replica is self.replica_of(owner) or self._mute_since(replica.name, at):
                continue
            if refresh_fp in fleet.memory.foreign or refresh_fp in fleet.memory.unknown:
                return True
            held = replica.refresher.token
            if held is not None and held.rank > rank:
                return True
        return False

    def replica_of(self, owner: str) -> Replica | None:
        """The replica incarnation whose refresher spends as `owner` (a config reload gives
        its new refresher the replica's name with a suffix)."""
        for replica in self.replicas:
            if owner == replica.name or owner.startswith(replica.name + "-"):
                return replica
        return None

    def _mute_since(self, name: str, at: float) -> bool:
        """Replica incarnation `name` could not object at any time since `at`: it is dead (a
        restart is a new incarnation that remembers nothing), or paused, or cut off from the
        store the others use (partitioned from it, or left on the old primary of a split
        brain) since before its subscription could have come back from the restart and for
        longer than the long objection window."""
        replica = self.replica_of(name)
        if replica is None or not replica.alive:
            return True
        at = self._store_back(at)
        deadline = at + RESUBSCRIBE_AFTER_RESTART
        view = replica.view
        frozen = view.frozen
        if frozen.until > self.time.now and frozen.since <= deadline:
            return True
        # Cut off: excused only past the long objection window, which the protocol waits
        # after evidence of a forgetful store precisely so that a replica cut off by the same
        # event (a reconnect after a restart) is back to object before the token leaves.
        if self.time.now < at + TIMING.objection_idle:
            return False
        since = view.faults.partitioned_since
        if view.faults.partitioned and since is not None and since <= deadline:
            return True
        return view in self._split_views and self._split_at <= deadline

    def _store_back(self, at: float) -> float:
        """When the store that forgot at `at` was reachable again: `at`, unless it went down
        for everyone before any subscription could have come back (a restart's downtime, which
        the world draws as an outage of its own), and then the end of that outage.

        Nobody speaks to a store that is down, the replica that knew included, and nobody
        spends: the time to come back and object is counted from its return (swarm seed
        94531: an empty restart as the token was marked sent, the store down for 22.6 s from
        59 ms later, and the spender and the replica that adopted its set cut off on the old
        primary of a split brain 63 ms after the store came back, for 50 s)."""
        for start, end in self.store_outages:
            if start > at + RESUBSCRIBE_AFTER_RESTART:
                continue
            if end is None:
                return float("inf")
            at = max(at, end)
        return at

    def add_replica(self, offset: float) -> Replica:
        """A new pod joins the fleet (scale-up, or a rolling deploy's surge pod)."""
        self.offsets.append(offset)
        return self.start_replica(len(self.offsets) - 1)

    def reload(self, index: int) -> asyncio.Future[None]:
        """A config reload that changed the app, as `broker.app.reload_config` does it: same
        process, the old refresher drained, a new one under a new owner name that keeps its
        set and carries over what the old one knew of spends (`carry_over`). It used to keep
        the owner name and carry nothing, which the broker stopped doing (issue 20, Low): an
        abort the old refresher could not write was then never written (swarm seed 8339)."""
        replica = self.replicas[index]
        old = replica.refresher
        clock = old._clock
        self._reloads += 1
        owner = f"{replica.name}-{self._reloads}"

        async def reload() -> None:
            replica.retiring = old
            await replica.core.remove_app(APP)
            if not replica.alive:
                return
            on_event = replica.core.on_event
            refresher = self._refresher(
                owner,
                replica.source,
                replica.view,
                clock,
                on_event,
                spec=old.spec,
                host_clock=replica.clock,
            )
            refresher.carry_over(old, same_grant=True)  # as broker.app.reload_config does
            refresher.take_over(old)
            replica.core.add_app(refresher, fresh=True)
            replica.retiring = None

        task = asyncio.ensure_future(reload())
        self.draining.append(task)
        return task

    def evict(self, rng: random.Random) -> None:
        """The store evicts some of the app's keys (maxmemory with an evicting policy)."""
        # One draw per kind of key, in this order: tokens, leases, fences, spend records.
        evicted = [rng.random() < 0.5 for _ in range(4)]
        if evicted[0] or evicted[3]:
            # An evicted `sent` record, or an evicted set that was the store's trace of its
            # parent's spend, is forgotten as in an empty restart.
            after = self.store.snapshot()
            for chosen, keys in zip(evicted, _keys_by_kind(after), strict=True):
                if chosen:
                    keys.pop(self.key, None)
            self._note_forgotten(after)
        if evicted[0]:
            self._note_set_evicted()
        for chosen, keys in zip(evicted, _keys_by_kind(self.store.state), strict=True):
            if chosen:
                keys.pop(self.key, None)

    def evict_set(self) -> None:
        """The store evicts the app's token set (a door's eviction of that key alone): the set,
        and the spends whose rotations it was the store's one trace of, are forgotten as in
        `evict` (swarm seed 72057)."""
        after = self.store.snapshot()
        after.tokens.pop(self.key, None)
        self._note_forgotten(after)
        self._note_set_evicted()
        self.store.state.tokens.pop(self.key, None)

    def _note_set_evicted(self) -> None:
        """The stored set is about to be evicted (or erased by a restore, `roll_back`, or an
        empty restart, `empty_restart`): remember its refresh token when it is the server's
        newest and no process that could write it back holds it (no replica's process running
        with it, no drain under way). An eviction is applied on the primary and its replicas
        alike, and a restore or an empty restart replaces them all, so no WAIT keeps it:
        `maxmemory-policy noeviction` rules the one out and durable writes the others
        (docs/operations.md), and the simulation counts a grant lost so apart (swarm seed
        24380: the writer's drain had ended, its commit stored and acknowledged; 52433: a
        restore 32 ms after the writer crashed; 118156: an empty restart 44 ms after the
        writer's drain ended)."""
        stored = self.store.state.tokens.get(self.key)
        valid = self.server.valid_refresh
        if stored is None or valid is None or stored.refresh_token != valid:
            return
        if any(not task.done() for task in self.draining):
            return
        for replica in self.replicas:
            held = replica.refresher.token
            if not replica.task.done() and held is not None and held.refresh_token == valid:
                return
        self.evicted_while_alone.add(valid)

    def _only_copy_dies(self, replica: Replica) -> None:
        """The process exits holding the only copy of the server's newest set (its answer came,
        but the store has not taken it yet, nor any other replica): that answer is lost with
        its sender, as a reply lost after the server acted is."""
        rotation = self._only_copy(replica)
        if rotation is not None:
            rotation.reply_lost, rotation.lost_by = True, "sender_died"

    def _only_copy(self, replica: Replica) -> Presentation | None:
        """The rotation whose answer only `replica` holds (not stored, no other live replica
        has it), if so."""
        valid = self.server.valid_refresh
        stored = self.store.state.tokens.get(self.key)
        if stored is not None and stored.refresh_token == valid:
            return None
        for other in self.replicas:
            held = other.refresher.token
            if other is not replica and other.alive and held and held.refresh_token == valid:
                return None
        rotations = [p for p in self.server.presentations if p.outcome == "rotated"]
        if not rotations or rotations[-1].reply_lost:
            return None  # no answer, or one already lost (a request given up on stays unexcused)
        held = replica.refresher.token
        if rotations[-1].replica == replica.name or (held and held.refresh_token == valid):
            return rotations[-1]
        return None

    def _refresher(
        self,
        name: str,
        source: SimSource,
        view: SimStoreView,
        clock: Clock,
        on_event: EventHook,
        *,
        spec: AppSpec,
        host_clock: ReplicaClock,
    ) -> AppRefresher:
        refresher = AppRefresher(
            spec,
            source,
            view,
            clock,
            on_event,
            owner=name,
            rng=random.Random(self.rng.random()),
            timing=TIMING,
            host_clock=host_clock,
        )
        if view.protocol != PROTOCOL_VERSION:
            refresher.fleet.protocol = view.protocol
        return refresher
