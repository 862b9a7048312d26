"""The fleet's clock: time in the shared store's frame, as this replica measures it.

A token's `expires_at` is written with one replica's clock and read with another's. With each
pod's own wall clock, a pod whose clock is ahead sees every stored token as due and one that is
behind serves expired tokens. So every replica keeps time in one frame, the store server's
clock (Redis `TIME`): it measures its offset to it NTP-style (the server's time against the
midpoint of the round trip), keeps the most precise sample of each round, smooths across rounds
and holds back a sudden jump until the next round confirms it.

The offset is anchored on the monotonic clock (store time minus local monotonic time), so a step
of this host's wall clock does not move fleet time; until the first measurement, fleet time is
the local wall clock. With the store down the last offset stays in use, and `offset_age()` says
how old it is.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from broker.clock import Clock
from broker.errors import StoreUnavailable
from broker.logs import get_logger
from broker.model import TokenSet

log = get_logger(__name__)

# How often a settled offset is measured again.
MEASURE_INTERVAL = 30.0
# A settled clock waits MEASURE_INTERVAL times a factor drawn from 1 +- MEASURE_SPREAD / 2 (30 s
# on average, as before). A fleet started together (in the simulation: every replica at 0)
# measured in lockstep, every 30 s at the same moments, so a step of the store's clock that
# came and went between two rounds was seen by no replica; a pod started inside it read a set
# whose expiry nobody had lowered (swarm seeds 20791, 28259). Spread, the fleet's rounds cover
# the interval, and some replica's round falls inside a step of a few seconds.
MEASURE_SPREAD = 1.0
# How soon to measure again while there is no offset yet or a jump waits for confirmation.
RETRY_INTERVAL = 5.0
# Round trips in one measurement; the shortest gives the most precise offset.
SAMPLES_PER_ROUND = 4
# Once the offset is settled, a round ends at its first sample this precise (its error is at
# most half of it): the other round trips could only refine the offset by milliseconds, and
# every replica measures every 30 s, so they were most of what an idle fleet asked of Redis.
PRECISE_ROUND_TRIP = 0.01
# A sample whose round trip is longer than this is too imprecise to use (its error is up to
# half the round trip).
MAX_ROUND_TRIP = 0.5
# A change of the offset beyond this (plus the sample's own error) is a jump: a Redis failover
# to a host with another clock, or a step of a clock. It is applied only when the next round
# agrees; a lone outlier is dropped.
STEP_TOLERANCE = 0.5
# Weight of a new round in the smoothed offset.
SMOOTHING = 0.3

Outcome = Literal["first", "smoothed", "held", "stepped", "rejected", "unavailable"]


class ServerClock(Protocol):
    """What the fleet clock measures against: the TokenStore's `server_time`."""

    async def server_time(self) -> float:
        """The store server's wall time, in seconds since the epoch."""
        ...


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One round trip: local monotonic time when sent and received, the server's time between."""

    sent: float
    server: float
    received: float

    @property
    def round_trip(self) -> float:
        """Seconds the round trip took."""
        return self.received - self.sent

    @property
    def anchor(self) -> float:
        """Server time minus local monotonic time, taking the server's reading at the midpoint."""
        return self.server - (self.sent + self.received) / 2.0


class OffsetEstimator:
    """Turns rounds of samples into one smoothed anchor (server time minus local monotonic)."""

    def __init__(
        self,
        *,
        smoothing: float = SMOOTHING,
        max_round_trip: float = MAX_ROUND_TRIP,
        step_tolerance: float = STEP_TOLERANCE,
    ) -> None:
        self._smoothing = smoothing
        self._max_round_trip = max_round_trip
        self._step_tolerance = step_tolerance
        self.anchor: float | None = None
        self.round_trip: float | None = None
        self._held: ClockSample | None = None

    @property
    def settled(self) -> bool:
        """True when there is an anchor and no jump waits for confirmation."""
        return self.anchor is not None and self._held is None

    @property
    def held_anchor(self) -> float | None:
        """The anchor of a jump that waits for confirmation (None: none waits)."""
        return self._held.anchor if self._held is not None else None

    def add_round(self, samples: Sequence[ClockSample]) -> Outcome:
        """Fold one round into the estimate; returns what was done with it."""
        usable = [s for s in samples if 0.0 <= s.round_trip <= self._max_round_trip]
        if not usable:
            return "rejected"
        best = min(usable, key=lambda s: s.round_trip)
        if self.anchor is None:
            self._set(best)
            return "first"
        tolerance = self._step_tolerance + best.round_trip / 2.0
        if abs(best.anchor - self.anchor) <= tolerance:
            self._held = None
            self.anchor += self._smoothing * (best.anchor - self.anchor)
            self.round_trip = best.round_trip
            return "smoothed"
        held, self._held = self._held, best
        if held is not None and abs(best.anchor - held.anchor) <= tolerance:
            self._set(best)
            return "stepped"
        return "held"

    def _set(self, sample: ClockSample) -> None:
        self.anchor = sample.anchor
        self.round_trip = sample.round_trip
        self._held = None


class FleetClock:
    """Implements Clock in the fleet's frame: `time()` is the store server's time.

    `monotonic()` and `sleep()` are the base clock's. `local=True` is for a store that lives in
    this process (memory://): the local clock is then the reference and nothing is measured.
    """

    def __init__(
        self,
        base: Clock,
        *,
        local: bool = False,
        estimator: OffsetEstimator | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._base = base
        # The base clock's own methods (see `monotonic` and `sleep`), bound once: the broker's
        # most frequent calls then cost no frame of ours.
        self.monotonic = base.monotonic  # type: ignore[method-assign]
        self.sleep = base.sleep  # type: ignore[method-assign]
        # Draws the spread of the measuring interval (MEASURE_SPREAD); seeded in tests.
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - not crypto
        self.local = local
        self._estimator = estimator if estimator is not None else OffsetEstimator()
        self._started = base.monotonic()
        self._measured_at: float | None = None
        self._round_listeners: list[Callable[[bool], None]] = []

    def time(self) -> float:
        """Fleet time: local monotonic time plus the measured anchor (local wall time before)."""
        anchor = self._estimator.anchor
        if anchor is None or self.local:
            return self._base.time()
        return self._base.monotonic() + anchor

    def earliest_time(self) -> float:
        """The earliest that fleet time may be: `time()`, or the time of a jump back that waits
        for confirmation, whichever is earlier. A set is stamped with it (`stamped`).

        A jump waits for the next round (RETRY_INTERVAL) before fleet time follows it. When
        Redis's clock went back meanwhile (a step undone, a failover), `time()` is still the
        old, later frame, and a set stamped with it expires that much later for every replica
        that reads it with a clock put right, a pod started later among them (swarm seed
        5083: 15 s past the true expiry).
        """
        now = self.time()
        held = self._estimator.held_anchor
        if held is None or self.local or self._estimator.anchor is None:
            return now
        return min(now, self._base.monotonic() + held)

    def monotonic(self) -> float:
        """The base clock's monotonic time (each instance calls the base's method directly)."""
        return self._base.monotonic()

    def sleep(self, seconds: float) -> Coroutine[Any, Any, None]:
        """Sleep on the base clock (its own coroutine, without a frame of ours around it: every
        timer of the broker waits here)."""
        return self._base.sleep(seconds)

    @property
    def measured(self) -> bool:
        """True once an offset has been measured (always for a local store)."""
        return self.local or self._estimator.anchor is not None

    @property
    def settled(self) -> bool:
        """True when an offset is measured and no jump waits for confirmation (always for a
        local store)."""
        return self.local or self._estimator.settled

    def offset(self) -> float:
        """Fleet time minus this host's wall time, in seconds (0 until measured)."""
        return self.time() - self._base.time()

    def offset_age(self) -> float:
        """Seconds since the offset was last measured; since start while it never was."""
        if self.local:
            return 0.0
        since = self._measured_at if self._measured_at is not None else self._started
        return max(0.0, self._base.monotonic() - since)

    def add_round_listener(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        """Call `callback(back)` (synchronously, so it must be quick) after each round the
        store answered; `back` when the round held or took a jump back of the store's clock.
        Returns the function that removes it.

        A set stamped in the frame before the jump expires that much later, for every pod that
        reads it in the new frame, than for the replicas that adopted it before (they count its
        deadline on the monotonic clock): each refresher then lowers the stored expiry of the
        set it holds to its own deadline in the new frame (`AppRefresher.lower_stored_expiry`).
        """
        self._round_listeners.append(callback)

        def remove() -> None:
            if callback in self._round_listeners:  # (a second stop removes nothing)
                self._round_listeners.remove(callback)

        return remove

    async def measure(self, source: ServerClock, samples: int = SAMPLES_PER_ROUND) -> Outcome:
        """One round of up to `samples` round trips to `source` (one precise one, once settled);
        the estimate takes it or drops it."""
        taken = []
        settled = self._estimator.settled
        try:
            for _ in range(samples):
                sent = self._base.monotonic()
                server = await source.server_time()
                taken.append(ClockSample(sent, server, self._base.monotonic()))
                if settled and 0.0 <= taken[-1].round_trip <= PRECISE_ROUND_TRIP:
                    break
        except StoreUnavailable:
            return "unavailable"
        before = self._estimator.anchor
        outcome = self._estimator.add_round(taken)
        self._tell_listeners(outcome, before)
        if outcome in ("first", "smoothed", "stepped"):
            self._measured_at = self._base.monotonic()
        if outcome in ("first", "stepped"):
            log.info(
                "clock.offset_measured" if outcome == "first" else "clock.offset_stepped",
                offset=round(self.offset(), 3),
                round_trip=round(self._estimator.round_trip or 0.0, 4),
            )
        elif outcome == "held":
            log.info("clock.offset_jump_held", offset=round(self.offset(), 3))
        return outcome

    def _tell_listeners(self, outcome: Outcome, before: float | None) -> None:
        """Tell the round listeners that a round came back, and whether the store's clock went
        back: a jump back now held (the earliest frame moved back) or taken."""
        held, after = self._estimator.held_anchor, self._estimator.anchor
        if after is None:
            back = False
        elif outcome == "held":
            back = held is not None and held < after
        else:
            back = outcome == "stepped" and before is not None and after < before
        for listener in list(self._round_listeners):
            listener(back)

    async def measure_within(self, source: ServerClock, seconds: float) -> bool:
        """Measure once, waiting at most `seconds` (injected clock); True when an offset is known."""
        measuring = asyncio.create_task(self._measure_guarded(source))
        timer = asyncio.create_task(self._base.sleep(seconds))
        try:
            await asyncio.wait({measuring, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not measuring.done():
                measuring.cancel()
            await asyncio.gather(measuring, return_exceptions=True)
        return self.measured

    async def run(self, source: ServerClock) -> None:
        """Measure every MEASURE_INTERVAL on average, spread (MEASURE_SPREAD), and every
        RETRY_INTERVAL while unsettled, until cancelled."""
        if self.local:
            return
        while True:
            await self._measure_guarded(source)
            if self._estimator.settled:
                spread = 1.0 + MEASURE_SPREAD * (self._rng.random() - 0.5)
                await self._base.sleep(MEASURE_INTERVAL * spread)
            else:
                await self._base.sleep(RETRY_INTERVAL)

    async def _measure_guarded(self, source: ServerClock) -> None:
        # A bug in one round must not stop the clock from being measured again (nor startup).
        try:
            await self.measure(source)
        except Exception:
            log.exception("clock.measure_failed")


def stamped(token: TokenSet, clock: Clock) -> TokenSet:
    """`token` with its issue and expiry in the earliest frame `clock` may be in (see
    `FleetClock.earliest_time`): what a replica writes to the store for the fleet to read.

    Moved earlier only, never later: a set that looks shorter is refreshed a little early, one
    that looks longer is served expired.
    """
    if not isinstance(clock, FleetClock):
        return token
    ahead = clock.time() - clock.earliest_time()
    if ahead <= 0.0:
        return token
    return replace(token, issued_at=token.issued_at - ahead, expires_at=token.expires_at - ahead)
