"""Seeded fault schedules for the simulated fleet, and the invariants checked after every step.

`python -m tests.simulation.schedule SEED` replays one schedule and prints it with its result
(`--legacy`: the first generator's schedule of SEED, as the regression seeds run).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import math
import random
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog.testing

from broker import policy
from broker.errors import NeedsAuthorization, RateLimited, TokenUnavailable
from broker.model import TokenSet
from broker.store.memory import MemoryState
from tests.simulation.world import (
    APP,
    NOTICE_DELAY,
    PHASES,
    REPLY_HOP,
    Replica,
    SimStoreView,
    World,
    WorldConfig,
    run_simulated,
)

# The kinds the first generator drew from (legacy_schedule replays its seeds exactly).
LEGACY_KINDS = (
    "store_partition",
    "store_outage",
    "store_lossy",
    "lease_lost",
    "rollback",
    "empty_restart",
    "unknown_key",
    "server_down",
    "server_429",
    "server_500",
    "server_500_after_acting",
    "server_slow",
    "server_lossy",
    "crash",
    "sigterm",
)

# ---- issue 20: swarm testing, faults aimed inside spends, pair coverage ----------------------

# Faults that real Redis, real servers and real fleets produce, added for issue 20.
ADDED_KINDS = (
    "store_forgets",  # a failover while a spend is sent: writes no replica acknowledged lost
    "eviction",  # the store evicts some of the app's keys
    "store_late_write",  # a write reaches the store after its client timed out
    "store_clock_step",  # Redis's clock steps (TIME, and the leases' TTLs with it)
    "store_slow_time",  # slow `TIME` round trips
    "pause",  # a replica frozen past its lease (GC, stalled loop), then resumes
    "scale_up",  # a new pod joins
    "config_reload",  # a replica reloads its config: same owner, no spend memory
    "split_brain",  # replicas left on an old primary that stays writable (H4)
    "replica_ack_lost",  # the primary's replicas acknowledge nothing (H4)
    "half_open",  # a replica's subscription goes silent without an error (M2)
)
FAULT_KINDS = LEGACY_KINDS + ADDED_KINDS
# Faults that happen at an instant: they are inside a spend if they happen during it.
MOMENTARY = frozenset(
    {"lease_lost", "rollback", "empty_restart", "store_forgets", "eviction", "scale_up"}
    | {"config_reload"}
)
# Faults that only make sense at a moment inside a spend.
ALWAYS_AIMED = frozenset({"store_forgets"})
# Every pair of fault kinds that the schedules must have drawn inside one spend.
ALL_PAIRS = frozenset(itertools.combinations(FAULT_KINDS, 2))


@dataclass(frozen=True)
class Fault:
    """One fault: what, to whom, from when, for how long (and a kind-specific parameter)."""

    kind: str
    start: float
    duration: float
    target: int  # a replica's index; -1: the spender of the spend it is aimed at
    param: float
    # Aimed: the fault waits, from `start` on, for a spend to reach this phase, then starts
    # `after` seconds later. Faults of one `cluster` are aimed at the same spend.
    phase: str | None = None
    cluster: int = 0
    after: float = 0.0

    @property
    def end(self) -> float:
        """When the fault heals at the latest (an aimed one may never start)."""
        if self.phase is None:
            return self.start + self.duration
        return self.start + AIM_PATIENCE + self.after + self.duration

    def __str__(self) -> str:
        target = "spender" if self.target < 0 else self.target
        when = (
            f"at={self.start:.1f}s"
            if self.phase is None
            else f"aimed at {self.phase}+{self.after:.1f}s of a spend after {self.start:.1f}s "
            f"(cluster {self.cluster})"
        )
        return (
            f"{self.kind}(replica={target}, {when}, "
            f"for={self.duration:.1f}s, param={self.param:.2f})"
        )


# An aimed fault whose spend does not come within this many seconds of its arming is dropped.
AIM_PATIENCE = 120.0


# ---- issue 22: an upstream that refuses the fleet's token ------------------------------------


@dataclass(frozen=True)
class Upstream401:
    """An upstream answers 401 to the access token replica `replica` holds at `at`: that
    replica reports it refused (the proxy's purge); with `everyone`, every live replica reports
    the token it holds (the upstream revoked it for all); with `late_by` > 0 the next replica
    reports that same token again `late_by` seconds later (a slow request that carried it).

    Not a fault kind: drawn from a stream of its own (`draw_upstream_401s`), so every seed's
    faults are drawn as before, and not counted in the pair coverage.
    """

    at: float
    replica: int
    everyone: bool
    late_by: float

    def __str__(self) -> str:
        who = "every replica" if self.everyone else f"replica {self.replica}"
        late = f", again {self.late_by:.1f}s later by the next" if self.late_by else ""
        return f"upstream_401({who}, at={self.at:.1f}s{late})"


# The share of swarm schedules with upstream 401s.
UPSTREAM_401_SHARE = 0.25
# A purge's refresh comes within this many seconds when nothing else goes wrong (the lease,
# the objection window and one request): a second refresh meanwhile would be a second purge.
PURGE_SETTLES_WITHIN = 15.0


def draw_upstream_401s(seed: int, lifetime: float) -> tuple[Upstream401, ...]:
    """The upstream 401s of swarm seed `seed`: in UPSTREAM_401_SHARE of the schedules, one to
    three, at wall times. Drawn from a generator of their own (`"{seed}:upstream_401"`) after
    the schedule's other draws, which therefore stay as they were."""
    extra = random.Random(f"{seed}:upstream_401")
    if extra.random() >= UPSTREAM_401_SHARE:
        return ()
    events = []
    for _ in range(extra.randint(1, 3)):
        at = extra.uniform(0.5 * lifetime, 5 * lifetime)
        replica = extra.randrange(8)  # modulo the fleet's size when it happens
        everyone = extra.random() < 0.5
        late_by = extra.uniform(1.0, 30.0) if extra.random() < 0.5 else 0.0
        events.append(Upstream401(at, replica, everyone, late_by))
    return tuple(sorted(events, key=lambda event: event.at))


Script = Callable[[World], Awaitable[None]]


@dataclass(frozen=True)
class Schedule:
    """Everything that will happen in one simulated run, derived from its seed.

    A named regression schedule (tests/simulation/doors.py) adds a `script`: a coroutine that
    runs beside the timed faults and injects its own at moments it waits for (a spend sent,
    a replica restarted), healing them all by `script_heals_by`.
    """

    seed: int
    config: WorldConfig
    faults: tuple[Fault, ...]
    duration: float
    name: str = ""
    script: Script | None = None
    script_heals_by: float = 0.0
    # The grant could have been kept (a grace retry was possible): no loss is excused.
    must_keep_grant: bool = False
    enabled: tuple[str, ...] = ()  # the swarm's subset of FAULT_KINDS
    upstream_401: tuple[Upstream401, ...] = ()  # issue 22: refusals the replicas report

    @property
    def fault_free(self) -> bool:
        """No faults at all (invariant 4 applies)."""
        return not self.faults and self.script is None

    @property
    def healed_at(self) -> float:
        """When the last fault healed."""
        return max([f.end for f in self.faults] + [self.script_heals_by])

    def describe(self) -> str:
        """A replayable description."""
        c = self.config
        lines = [
            *([f"schedule {self.name}"] if self.name else []),
            f"seed {self.seed}: {c.replicas} replicas, lifetime {c.lifetime:.0f}s, "
            f"grace {c.grace:.0f}s, offsets {[round(o, 2) for o in c.offsets]}, "
            f"duration {self.duration:.0f}s",
            *(["DPoP: the grant is bound to the fleet's key"] if c.dpop else []),
            *([f"enabled kinds: {', '.join(self.enabled)}"] if self.enabled else []),
            *(f"  {fault}" for fault in self.faults),
            *(f"  {event}" for event in self.upstream_401),
            (
                f"replay: python -m tests.simulation.doors {self.name}"
                if self.name
                else f"replay: python -m tests.simulation.schedule {self.seed}"
            ),
        ]
        return "\n".join(lines)


def legacy_schedule(seed: int) -> Schedule:
    """The first generator's schedule of `seed` (up to four faults of any kind at wall times),
    kept so that the seeds it once failed on replay as they did.

    Half the schedules have wall clocks off by up to half a token lifetime (a broken NTP);
    the rest by up to a second.
    """
    rng = random.Random(seed)
    replicas = rng.randint(3, 8)
    lifetime = rng.choice([60.0, 120.0, 300.0])
    grace = rng.choice([0.0, 0.0, 0.0, 30.0])
    max_offset = lifetime / 2 if rng.random() < 0.5 else 1.0
    offsets = [rng.uniform(-max_offset, max_offset) for _ in range(replicas)]
    faults: list[Fault] = []
    if rng.random() >= 0.15:
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(LEGACY_KINDS)
            start = rng.uniform(0.5 * lifetime, 5 * lifetime)
            duration = rng.uniform(0.05, 1.5) * lifetime
            param = rng.random()
            faults.append(Fault(kind, start, duration, rng.randrange(replicas), param))
    faults.sort(key=lambda f: f.start)
    config = WorldConfig(replicas=replicas, lifetime=lifetime, grace=grace, offsets=offsets)
    healed = max((f.end for f in faults), default=0.0)
    duration = max(8 * lifetime, healed + 3 * lifetime)
    return Schedule(seed, config, tuple(faults), duration)


def make_schedule(seed: int) -> Schedule:
    """The schedule of `seed`: fleet shape, server kind, clock offsets, and swarm faults.

    Swarm testing: each schedule enables a random subset of FAULT_KINDS (2 to 5 kinds) and
    draws its faults from it only, so that a few kinds meet often instead of every kind
    rarely. Most faults are aimed at moments inside a spend (announced, sent, acted on by the
    server): one or two clusters, each of distinct enabled kinds aimed at the same spend; up
    to two more start at wall times. Half the schedules have wall clocks off by up to half a token lifetime
    (a broken NTP); the rest by up to a second. A tenth have no faults.
    """
    rng = random.Random(seed)
    replicas = rng.randint(3, 8)
    lifetime = rng.choice([60.0, 120.0, 300.0])
    grace = rng.choice([0.0, 0.0, 0.0, 30.0])
    max_offset = lifetime / 2 if rng.random() < 0.5 else 1.0
    offsets = [rng.uniform(-max_offset, max_offset) for _ in range(replicas)]
    faults: list[Fault] = []
    enabled: tuple[str, ...] = ()
    if rng.random() >= 0.1:
        enabled = tuple(sorted(rng.sample(FAULT_KINDS, rng.randint(2, 5))))
        clusters = rng.choice([1, 1, 2])
        for cluster in range(clusters):
            # Distinct kinds aimed at one spend: each pair of them may meet inside it.
            armed_at = rng.uniform(0.5 * lifetime, 4 * lifetime)
            shared_phase = rng.choice(PHASES) if rng.random() < 0.5 else None
            for kind in rng.sample(enabled, rng.randint(min(2, len(enabled)), len(enabled))):
                param = rng.random()
                phase = shared_phase or rng.choice(PHASES)
                if kind in ALWAYS_AIMED:
                    phase = "sent"
                after = 0.0 if rng.random() < 0.6 else rng.uniform(0.0, 0.4)
                target = -1 if rng.random() < 0.5 else rng.randrange(replicas)
                duration = rng.uniform(0.02, 0.5) * lifetime
                faults.append(Fault(kind, armed_at, duration, target, param, phase, cluster, after))
        for _ in range(rng.randint(0, 2)):  # and some at wall times
            kind = rng.choice([k for k in enabled if k not in ALWAYS_AIMED] or ["server_down"])
            start = rng.uniform(0.5 * lifetime, 5 * lifetime)
            duration = rng.uniform(0.05, 1.5) * lifetime
            faults.append(Fault(kind, start, duration, rng.randrange(replicas), rng.random()))
        faults = [
            dataclasses.replace(f, duration=PAUSE_MIN + f.param * PAUSE_SPREAD)
            if f.kind == "pause"
            else f
            for f in faults
        ]
    faults.sort(key=lambda f: f.start)
    # DPoP apps (issue 23) in a quarter of the schedules, from a stream of their own drawn
    # after the others: every field above is what it was before DPoP (sim-rng.md).
    dpop = random.Random(f"{seed}:dpop").random() < DPOP_SHARE
    config = WorldConfig(
        replicas=replicas, lifetime=lifetime, grace=grace, offsets=offsets, dpop=dpop
    )
    healed = max((f.end for f in faults), default=0.0)
    duration = max(8 * lifetime, healed + 3 * lifetime)
    return Schedule(
        seed,
        config,
        tuple(faults),
        duration,
        enabled=enabled,
        upstream_401=draw_upstream_401s(seed, lifetime),
    )


# The share of swarm schedules whose app is DPoP-bound.
DPOP_SHARE = 0.25


# A paused replica is frozen for 5 to 45 s: past its lease (about 12 s), often far past.
PAUSE_MIN = 5.0
PAUSE_SPREAD = 40.0


@dataclass
class Result:
    """What happened in one run: violations of the invariants, and counts."""

    schedule: Schedule
    violations: list[str] = field(default_factory=list)
    token_requests: int = 0
    presentations: int = 0
    outcome_unknown_announced: int = 0
    outcome_unknown_logged: int = 0
    grant_lost_after_lost_reply: bool = False
    revoked: bool = False
    # Revoked by the documented limit: an empty restart erased a `sent` record while its
    # spender, the only replica that knew, could not speak (dead or paused); counted apart.
    revoked_forgotten_while_alone: bool = False
    # Lost by the same limit: the store evicted the server's newest set, or a restore or an
    # empty restart erased it, while no running process held it (World.evict, World.roll_back,
    # World.empty_restart; `maxmemory-policy noeviction` and durable writes rule them out);
    # counted apart.
    lost_evicted_while_alone: bool = False
    # Stopped by the documented limit of a drain: the fleet waits for a person, the grant
    # intact, behind a `sent` record of a spend never sent whose spender exited at its drain's
    # bound, cut off from the store since the mark (`_stranded_by_drain`); counted apart.
    stranded_by_drain: bool = False
    # The step checks' memory: how often each refresh token was presented, and how many
    # presentations they have looked at.
    seen_tokens: Counter[str] = field(default_factory=Counter)
    presentations_checked: int = 0
    # Pairs of fault kinds both active inside one spend (between its announcement and the end
    # of its attempt), and how many aimed faults found their spend.
    pairs: set[tuple[str, str]] = field(default_factory=set)
    aimed_fired: int = 0
    purges: int = 0  # refusals the store recorded (issue 22)

    @property
    def ok(self) -> bool:
        """No invariant was violated."""
        return not self.violations

    def report(self) -> str:
        """The schedule, the counts and every violation."""
        lines = [
            self.schedule.describe(),
            f"token requests {self.token_requests}, outcome_unknown announced "
            f"{self.outcome_unknown_announced}, purges {self.purges}, grant lost after a lost reply "
            f"{self.grant_lost_after_lost_reply}, revoked {self.revoked}"
            + (" (the store forgot a spend alone)" if self.revoked_forgotten_while_alone else "")
            + (" (the store lost the newest set alone)" if self.lost_evicted_while_alone else "")
            + (", stopped by the drain's limit" if self.stranded_by_drain else ""),
        ]
        lines += [f"VIOLATION: {v}" for v in self.violations]
        return "\n".join(lines)


_BASELINES: dict[tuple[float, float], int] = {}


def run(schedule: Schedule) -> Result:
    """Run `schedule` in a fresh event loop; return what the invariants saw."""
    if schedule.fault_free:
        _baseline(schedule)
    with structlog.testing.capture_logs() as logs:
        result = run_simulated(_run(schedule))
    result.outcome_unknown_logged = sum(1 for e in logs if e["event"] == "grant.outcome_unknown")
    if result.revoked_forgotten_while_alone and not any(
        e["event"] == "grant.reuse_detected" for e in logs
    ):
        result.violations.append(
            "invariant 3: revoked after the store forgot a spend, and no grant.reuse_detected "
            "announced it"
        )
    if result.lost_evicted_while_alone and not result.outcome_unknown_logged:
        result.violations.append(
            "invariant 3: lost after the store evicted the newest set, and no "
            "grant.outcome_unknown announced it"
        )
    if result.grant_lost_after_lost_reply and not result.outcome_unknown_logged:
        result.violations.append("invariant 3: the lost grant was not announced in the logs")
    if schedule.fault_free:
        baseline = _BASELINES[(schedule.config.lifetime, schedule.duration)]
        # A purge refreshes early: one request more for the fleet, never one per replica.
        if result.token_requests > 1.1 * baseline + result.purges:
            result.violations.append(
                f"invariant 4: {result.token_requests} token requests, one broker makes "
                f"{baseline}, purges {result.purges}"
            )
    return result


async def _run(schedule: Schedule) -> Result:
    rng = random.Random(schedule.seed * 7919 + 1)
    world = World(schedule.config, rng)
    result = Result(schedule)
    await world.authorize()
    for index in range(schedule.config.replicas):
        world.start_replica(index)
    faults = FaultRun(world, schedule, result)
    refusals = Refusals(world, schedule)
    events = sorted(faults.timed_events() + refusals.timed_events(), key=lambda event: event[0])
    script = asyncio.ensure_future(schedule.script(world)) if schedule.script else None
    lifetime = schedule.config.lifetime
    tick = lifetime / 30
    now = 0.0
    checked_recovery = False
    while now < schedule.duration:
        upcoming = events[0][0] if events else schedule.duration
        step_to = min(now + tick, upcoming, schedule.duration)
        await world.time.advance_to(step_to)
        now = step_to
        while events and events[0][0] <= now:
            _, action = events.pop(0)
            await action()
            await world.time.settle()
        _check_step(world, result)
        if not checked_recovery and not faults.pending and now >= faults.healed_at + 2 * lifetime:
            checked_recovery = True
            _check_recovery(world, result, "two lifetimes after the last fault healed")
    # Let requests in flight at the end get their answers before judging the grant, including
    # one that started just before the judging time (its rotation is real, its reply is due).
    await world.time.advance_to(schedule.duration + 15.0)
    settle_by = world.time.now + 60.0
    while world.time.now < settle_by and any(_in_flight(r) for r in world.replicas):
        await world.time.advance_to(world.time.now + 0.5)
    _finish(world, result, schedule)
    faults.close()
    refusals.close()
    if script is not None:
        if not script.done():
            result.violations.append("script: the awaited moment never came (the door stayed shut)")
        elif script.exception() is not None:
            result.violations.append(f"script failed: {script.exception()!r}")
        script.cancel()
        await asyncio.gather(script, return_exceptions=True)
    await world.shutdown()
    return result


Action = Callable[[], Awaitable[None]]


class Refusals:
    """A schedule's upstream 401s: the replicas report refused tokens, as their proxies do."""

    def __init__(self, world: World, schedule: Schedule) -> None:
        self.world = world
        self.schedule = schedule
        self._tasks: set[asyncio.Future[None]] = set()

    def timed_events(self) -> list[tuple[float, Action]]:
        """One event per upstream 401."""
        events: list[tuple[float, Action]] = []
        for event in self.schedule.upstream_401:

            async def refuse(event: Upstream401 = event) -> None:
                self._refuse(event)

            events.append((event.at, refuse))
        return events

    def _refuse(self, event: Upstream401) -> None:
        replicas = self.world.replicas
        first = replicas[event.replica % len(replicas)]
        refused = first.refresher.token
        if refused is None:
            return
        for replica in replicas if event.everyone else [first]:
            token = replica.refresher.token
            if token is not None:
                self._report(replica, token)
        if event.late_by > 0:

            async def late() -> None:
                await self.world.time.sleep(event.late_by)
                self._report(replicas[(event.replica + 1) % len(replicas)], refused)

            self._spawn(late())

    def _report(self, replica: Replica, token: TokenSet) -> None:
        """`replica`'s proxy met a 401 for `token`: it reports it (a dead or paused process
        reports nothing) and would retry with what it gets."""
        if not replica.alive or replica.view.frozen.until > self.world.time.now:
            return

        async def report() -> None:
            with contextlib.suppress(NeedsAuthorization, TokenUnavailable, RateLimited):
                await replica.refresher.refused(token)

        self._spawn(report())

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """The run is over: stop the reports still waiting."""
        for task in self._tasks:
            task.cancel()


def _pair(one: str, other: str) -> tuple[str, str]:
    """A pair of fault kinds, in FAULT_KINDS order (as ALL_PAIRS has it)."""
    first, second = sorted((one, other), key=FAULT_KINDS.index)
    return first, second


@dataclass
class _Cluster:
    """Aimed faults that wait for the same spend."""

    members: list[Fault]
    armed: bool = False
    spender: str | None = None  # the replica whose spend the cluster is locked on
    spend: asyncio.Task[object] | None = None  # that spend's attempt
    snapshot: MemoryState | None = None  # the store just before the spend was recorded


class FaultRun:
    """A schedule's faults on the world, and the pair coverage they make.

    Wall-time faults are timed events. Aimed faults are armed at their start and wait for
    the next spend: a cluster locks on the first spend announced after it was armed, and each
    member starts when that spend reaches its phase (a spend that ends first hands the rest
    to the next one). A spend is open from its announcement to the end of its attempt; every
    fault kind active meanwhile is inside it.
    """

    def __init__(self, world: World, schedule: Schedule, result: Result) -> None:
        self.world = world
        self.schedule = schedule
        self.result = result
        self.active: Counter[str] = Counter()
        self.windows: dict[asyncio.Task[object], set[str]] = {}
        wall = [f for f in schedule.faults if f.phase is None]
        self.healed_at = max([f.end for f in wall] + [schedule.script_heals_by], default=0.0)
        aimed = [f for f in schedule.faults if f.phase is not None]
        self.pending = len(aimed)  # aimed faults not yet over (nor dropped)
        self.clusters: dict[int, _Cluster] = {}
        for fault in aimed:
            self.clusters.setdefault(fault.cluster, _Cluster([])).members.append(fault)
        self._tasks: set[asyncio.Future[None]] = set()
        world.server.phases.listeners.append(self._on_phase)

    # ---- wall-time faults ---------------------------------------------------------------------

    def timed_events(self) -> list[tuple[float, Action]]:
        """Wall-time faults (each starts, and later heals) and the arming of aimed clusters."""
        events: list[tuple[float, Action]] = []
        snapshots: dict[int, MemoryState] = {}
        # The connection each fault began on, by its place in the schedule (see _begin).
        views: dict[int, SimStoreView] = {}
        for number, fault in enumerate(self.schedule.faults):
            if fault.phase is not None:
                continue

            async def begin(fault: Fault = fault, number: int = number) -> None:
                views[number] = await self._begin(fault, snapshots.get(number))

            async def heal(fault: Fault = fault, number: int = number) -> None:
                await self._heal(fault, views.pop(number, None))

            async def snapshot(number: int = number) -> None:
                snapshots[number] = self.world.store.snapshot()

            if fault.kind == "rollback":
                events.append((max(0.0, fault.start - fault.duration), snapshot))
            events.append((fault.start, begin))
            events.append((fault.end, heal))
        for cluster in self.clusters.values():
            armed_at = cluster.members[0].start

            async def arm(cluster: _Cluster = cluster) -> None:
                cluster.armed = True

            async def give_up(cluster: _Cluster = cluster) -> None:
                self.pending -= len(cluster.members)  # its spend never came
                cluster.members.clear()

            events.append((armed_at, arm))
            events.append((armed_at + AIM_PATIENCE, give_up))
        events.sort(key=lambda event: event[0])
        return events

    async def _begin(self, fault: Fault, snapshot: MemoryState | None) -> SimStoreView:
        """Start `fault`; return the connection it began on, which its heal is given back
        (`_heal`): the heal is for that process, not for the pod that replaced it meanwhile
        (swarm seed 12086: a partition healed on the new pod left the draining old one cut off
        past its drain's bound, its abort never written). The caller keeps it, not a table
        keyed by id(fault): an aimed fault aimed at the spender is a copy that dies with its
        task, and a later copy could take its id and so a momentary fault's view, which is
        never healed, and heal that one instead of its own (swarm seeds 127482 and 93084 failed
        so only after other seeds had run in the same process)."""
        kind = fault.kind
        if kind not in MOMENTARY:
            self.active[kind] += 1
        for window in self.windows.values():
            window.add(kind)
        view = self.world.replicas[fault.target].view
        await _apply(self.world, fault, snapshot, healing=False, view=view)
        return view

    async def _heal(self, fault: Fault, view: SimStoreView | None) -> None:
        if fault.kind not in MOMENTARY:
            self.active[fault.kind] -= 1
        await _apply(self.world, fault, None, healing=True, view=view)

    # ---- spends: their windows, and the faults aimed at them ----------------------------------

    def _on_phase(self, phase: str, replica: str) -> None:
        task = asyncio.current_task()
        if phase == "announced" and task is not None:
            self._open(task)
        for cluster in self.clusters.values():
            if not cluster.armed or not cluster.members:
                continue
            if cluster.spend is None:
                if phase == "announcing" and any(f.kind in ALWAYS_AIMED for f in cluster.members):
                    cluster.snapshot = self.world.store.snapshot()
                if phase != "announced" or task is None:
                    continue
                cluster.spender, cluster.spend = replica, task
                task.add_done_callback(functools.partial(self._unlock, cluster))
            if replica != cluster.spender or cluster.spend.done():
                continue
            for fault in [f for f in cluster.members if f.phase == phase]:
                cluster.members.remove(fault)
                self._fire(fault, replica, cluster.snapshot)

    def _open(self, task: asyncio.Task[object]) -> None:
        self._close(task)
        self.windows[task] = {kind for kind, count in self.active.items() if count > 0}
        task.add_done_callback(self._close)

    def _close(self, task: asyncio.Future[object]) -> None:
        kinds = self.windows.pop(task, None)  # type: ignore[call-overload]
        if kinds:
            self.result.pairs.update(_pair(a, b) for a, b in itertools.combinations(kinds, 2))

    def _unlock(self, cluster: _Cluster, _: object = None) -> None:
        cluster.spender, cluster.spend, cluster.snapshot = None, None, None

    def _fire(self, fault: Fault, spender: str, snapshot: MemoryState | None) -> None:
        """Start an aimed fault (after its delay), and heal it after its duration."""
        world = self.world
        if fault.target < 0:
            names = [r.name for r in world.replicas]
            target = names.index(spender) if spender in names else 0
            fault = dataclasses.replace(fault, target=target)
        self.result.aimed_fired += 1

        async def run() -> None:
            if fault.after > 0:
                await world.time.sleep(fault.after)
            view = await self._begin(fault, snapshot)
            if fault.kind not in MOMENTARY:
                await world.time.sleep(fault.duration)
                await self._heal(fault, view)
            self.healed_at = max(self.healed_at, world.time.now)
            self.pending -= 1

        started = asyncio.ensure_future(run())
        self._tasks.add(started)
        started.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """The run is over: count the spends still open, stop the aimed faults."""
        for spend in list(self.windows):
            self._close(spend)
        for task in self._tasks:
            task.cancel()


async def _apply(
    world: World,
    fault: Fault,
    snapshot: MemoryState | None,
    *,
    healing: bool,
    view: SimStoreView | None = None,
) -> None:
    """Start (or heal) one fault (on `view`, the target's connection when it began)."""
    on = not healing
    server = world.server
    view = view if view is not None else world.replicas[fault.target].view
    match fault.kind:
        case "store_partition":
            view.faults.partitioned = on
        case "store_outage":
            world.set_store_outage(on)
        case "store_lossy":
            view.faults.lose_replies = (0.2 + 0.6 * fault.param) if on else 0.0
        case "lease_lost":
            if on:
                world.store.state.leases.pop(world.key, None)
        case "rollback":
            # A failover that lost writes, or a restore from a snapshot: connections drop.
            if on and snapshot is not None:
                world.roll_back(snapshot)
        case "empty_restart":
            if on:
                world.empty_restart()
        case "unknown_key":
            view.faults.unreadable_after = fault.start if on else None
        case "server_down":
            server.faults.down = on
        case "server_429" | "server_500":
            server.faults.status = (429 if fault.kind == "server_429" else 500) if on else None
            server.faults.retry_after = 1 + fault.param * 30 if fault.kind == "server_429" else None
        case "server_500_after_acting":
            server.faults.error_after_acting = 500 if on else None
        case "server_slow":
            # Slow, but within the client's 10 s budget: the answer arrives.
            server.faults.slow = (1 + fault.param * 7) if on else 0.0
        case "server_lossy":
            server.faults.lose_replies = (0.3 + 0.7 * fault.param) if on else 0.0
        case "crash":
            if on:
                await world.crash(fault.target)
            else:
                world.start_replica(fault.target)
        case "split_brain":
            # The target (and up to half the fleet with it) keeps writing to the old primary,
            # whose writes no replica acknowledges and the heal discards (issue 20, H4).
            if on:
                count = min(
                    len(world.replicas) - 1, 1 + int(fault.param * (len(world.replicas) // 2))
                )
                indexes = [(fault.target + i) % len(world.replicas) for i in range(count)]
                world.split_brain(indexes, cause=fault)
            else:
                world.heal_split_brain(cause=fault)
        case "replica_ack_lost":
            # The primary's replicas are down or cut off: no write is acknowledged.
            world.store.replicas_acknowledge = not on
        case "half_open":
            # The replica's subscription goes half-open: silent, no error, for good (it heals
            # only by the replica's own deadline and a new subscription).
            if on:
                view.faults.half_opened += 1
        case "sigterm":
            # Half of them land mid-spend: after the server rotated, before the reply arrives.
            if on and fault.param >= 0.5:
                world.terminate_mid_spend(fault.target)
            elif on:
                world.terminate(fault.target)
            else:
                world.restart_after_sigterm(fault.target)
        # ---- issue 20: the faults added with swarm testing --------------------------------
        case "store_forgets":
            # A failover to a replica that missed the writes since just before the spend:
            # connections drop. A replica keeps what it acknowledged: the `sent` record, which
            # the world's store waits for (WAIT, store.require_replica_ack), and all before it.
            if on and snapshot is not None:
                world.store.fail_over(snapshot)
                world.restarts[0] += 1
        case "eviction":
            if on:
                world.evict(random.Random(fault.param))
        case "store_late_write":
            view.faults.late_writes = (0.2 + 0.6 * fault.param) if on else 0.0
        case "store_clock_step":
            # NTP steps the store host's clock by up to half a lifetime, either way; later back.
            step = (2 * fault.param - 1) * world.config.lifetime / 2
            world.store_clock.step = step if on else 0.0
        case "store_slow_time":
            view.faults.slow_time = (0.1 + 1.9 * fault.param) if on else 0.0
        case "pause":
            if on:
                world.pause(fault.target, fault.duration)
        case "scale_up":
            if on:
                world.add_replica(offset=2 * fault.param - 1)
        case "config_reload":
            if on and world.replicas[fault.target].alive:
                world.reload(fault.target)


def _check_step(world: World, result: Result) -> None:
    """Invariants 1-3, after every step."""
    now = world.time.now
    for replica in world.replicas:
        if not replica.alive:
            continue
        token = replica.refresher.servable()
        if token is not None:
            expiry = world.server.expiry.get(token.access_token)
            if expiry is None or expiry <= now:
                result.violations.append(
                    f"invariant 2: {replica.name} serves a token expired at "
                    f"{expiry} (now {now:.2f})"
                )
    presentations = world.server.presentations
    seen = result.seen_tokens
    repeated: set[str] = set()
    for presentation in presentations[result.presentations_checked :]:
        seen[presentation.refresh_token] += 1
        if seen[presentation.refresh_token] > 1:
            repeated.add(presentation.refresh_token)
    result.presentations_checked = len(presentations)
    # Only a token presented again can break invariant 1: look at all its presentations then.
    for presentation in presentations if repeated else ():
        if (
            presentation.refresh_token in repeated
            and presentation.outcome not in ("rotated", "grace")
            and presentation.refresh_token not in world.forgotten_while_alone
        ):
            message = (
                f"invariant 1: refresh token presented again by {presentation.replica} at "
                f"{presentation.at:.2f} ({presentation.outcome})"
            )
            if message not in result.violations:
                result.violations.append(message)
    if world.server.revoked and not result.revoked:
        result.revoked = True
        if not _after_lost_reply(world) and not _revoked_forgotten_while_alone(world):
            result.violations.append(f"invariant 3: grant revoked at {world.server.revoked_at:.2f}")


def _check_recovery(world: World, result: Result, when: str) -> None:
    """Invariant 5: every replica serves again (unless the grant was lost as documented).

    A grant lost to a reply the client itself gave up on (a slow answer it cancelled) is not
    excused: a longer wait would have kept it.
    """
    excusable = not result.schedule.must_keep_grant
    if excusable and (
        (_grant_lost(world) and _truly_lost_reply(world))
        or (world.server.revoked and _after_lost_reply(world))
        or _revoked_forgotten_while_alone(world)
        or _lost_evicted_while_alone(world)
    ):
        return
    if world.server.in_flight_when_cancelled and _announced(world):
        return  # a request on the wire when its sender died: announced, and a person's call
    stranded = _stranded_by_drain(world)
    for replica in world.replicas:
        if not replica.alive or replica.refresher.servable() is not None:
            continue
        if _only_its_clock_ahead_objects(world, replica):
            continue
        token = replica.refresher.token
        if token is not None and token.refresh_fingerprint == stranded:
            result.stranded_by_drain = True
        else:
            result.violations.append(
                f"invariant 5: {replica.name} does not serve {when} "
                f"(state {replica.refresher.state}, last_error {replica.refresher.last_error})"
            )


def _stranded_by_drain(world: World) -> str | None:
    """The documented limit of a drain (README, "What a crash can lose"), or None: the
    fingerprint of the refresh token the fleet cannot spend because the store's record of its
    spend is `sent` while it was never sent. Its spender marked it sent, lost the answer as the
    store became unreachable for it, got SIGTERM, and exited at its drain's bound (the lease
    plus the read timeout) without reaching the store once since the mark
    (World._note_stranded): only it knew, and nobody else can tell the record from a request
    on the wire. Only while the grant is intact (the server never saw the token, it is the
    stored set's and the one the server holds valid) and the fleet said so
    (`grant.outcome_unknown`): the record stops the fleet, it cost nothing else."""
    spend = world.store.state.spends.get(world.key)
    stored = world.store.state.tokens.get(world.key)
    if (
        spend is None
        or spend.state != "sent"
        or (spend.owner, spend.fence, spend.refresh_fp) not in world.stranded_by_drain
        or stored is None
        or stored.refresh_fingerprint != spend.refresh_fp
        or world.server.revoked
        or stored.refresh_token != world.server.valid_refresh
        or any(p.refresh_token == stored.refresh_token for p in world.server.presentations)
        or not _announced(world)
    ):
        return None
    return spend.refresh_fp


# How long after a commit a replica may still hold the set it replaced: the commit's notice
# on its way (NOTICE_DELAY), then, for a replica that must read the set, a round trip (two
# hops); the spender's own commit answer takes one hop.
ADOPTION_LAG = NOTICE_DELAY + 2 * REPLY_HOP


def _only_its_clock_ahead_objects(world: World, replica: Replica) -> bool:
    """The replica holds the fleet's newest set, servable by the true clock, and does not serve
    it only because its own wall clock, ahead of true time, says it is nearly expired.

    A pod serves a token only while the fleet's clock and its own clock both allow it (issue
    20, M3): a pod whose clock is ahead by more than the slack before the fleet's next refresh
    stops serving each token that much earlier. Not a liveness failure of the protocol.

    "Newest" includes the set a commit replaced less than ADOPTION_LAG ago: the commit's notice
    is still on its way to the replica (swarm seed 26046: the check fell 1 ms after the commit,
    while every replica, its clock ahead, still held the set before it, and served the new one
    1 ms later).
    """
    token = replica.refresher.token
    stored = world.store.state.tokens.get(world.key)
    if token is None or stored is None:
        return False
    if stored.rank != token.rank and not (
        token.rank < stored.rank
        and world.time.now - world.written_at.get(world.key, -math.inf) <= ADOPTION_LAG
    ):
        return False
    if replica.clock.wall_offset <= 0:
        return False
    margin = policy.safety_margin(world.spec.refresh, token.lifetime)
    true_left = world.server.expiry.get(token.access_token, 0.0) - world.time.now
    own_left = token.expires_at - replica.clock.time()
    return true_left > margin >= own_left


def _announced(world: World) -> bool:
    """Some replica announced grant.outcome_unknown (counted on its metrics)."""
    return any(m.grant_outcome_unknown.labels(app=APP)._value.get() > 0 for m in world.metrics)


def _after_lost_reply(world: World) -> bool:
    """The documented unavoidable case: the token presented again had been spent by a request
    whose answer was lost (the server rotated; nobody could know the new token)."""
    lost = {
        p.refresh_token
        for p in world.server.presentations
        if p.reply_lost and p.lost_by != "gave_up"
    }
    return any(p.outcome == "reuse" and p.refresh_token in lost for p in world.server.presentations)


def _revoked_forgotten_while_alone(world: World) -> bool:
    """The documented limit of a store without durable writes (README, "What a crash can
    lose"): the grant was revoked by a refresh token presented again after the store forgot
    its spend (an empty restart, a rollback or an eviction took its `sent` record, or the
    committed set that resolved it) while every replica that knew could not speak
    (World._on_sent). Not a failover: the world's store waits for a replica to hold each
    `sent` record and commit (WAIT), and a failover keeps them."""
    forgotten = world.forgotten_while_alone
    return world.server.revoked and any(
        p.outcome == "reuse" and p.refresh_token in forgotten for p in world.server.presentations
    )


def _lost_evicted_while_alone(world: World) -> bool:
    """The same documented limit for a token set: the server's newest refresh token is held by
    no replica and not stored because the store evicted the set holding it, or a restore from
    a snapshot or an empty restart erased it, while no running process held it (World.evict,
    World.roll_back, World.empty_restart). Not a failover (it keeps what a replica
    acknowledged, a commit included): only an eviction, which the documented
    `maxmemory-policy noeviction` rules out, and a restore or an empty restart, which lose
    acknowledged writes on every node as they do a `sent` record
    (`_revoked_forgotten_while_alone` counts all three; swarm seed 118156)."""
    return _grant_lost(world) and world.server.valid_refresh in world.evicted_while_alone


def _truly_lost_reply(world: World) -> bool:
    """A rotation whose reply was lost on the wire or with its killed sender (not given up)."""
    return any(
        p.reply_lost and p.lost_by != "gave_up" and p.outcome == "rotated"
        for p in world.server.presentations
    )


def _in_flight(replica: Replica) -> bool:
    """A live replica with a refresh under way."""
    inflight = replica.refresher._inflight
    return replica.alive and inflight is not None and not inflight.done()


def _grant_lost(world: World) -> bool:
    """The server's valid refresh token is held by no replica and not stored."""
    valid = world.server.valid_refresh
    stored = world.store.state.tokens.get(world.key)
    holders = [
        r for r in world.replicas if r.refresher.token and r.refresher.token.refresh_token == valid
    ]
    return (
        not world.server.revoked
        and not holders
        and (stored is None or stored.refresh_token != valid)
    )


def _finish(world: World, result: Result, schedule: Schedule) -> None:
    """Counts, the documented unavoidable case, and invariant 4."""
    result.token_requests = world.server.requests
    result.purges = len(world.refusals)
    if schedule.fault_free:
        _check_one_refresh_per_purge(world, result)
    result.presentations = len(world.server.presentations)
    result.outcome_unknown_announced = int(
        sum(m.grant_outcome_unknown.labels(app=APP)._value.get() for m in world.metrics)
    )
    if world.server.wrong_key:
        result.violations.append(
            f"invariant 3: {world.server.wrong_key} refresh(es) proved with a DPoP key the "
            "grant is not bound to (the fleet shares one key)"
        )
    if world.server.dropped_on_sigterm:
        result.violations.append(
            f"invariant 3: {world.server.dropped_on_sigterm} refresh request(s) abandoned while "
            "draining for SIGTERM"
        )
    if world.server.sent_after_sigterm:
        result.violations.append(
            f"invariant 3: {world.server.sent_after_sigterm} refresh token(s) marked sent after "
            "SIGTERM (stopping sends nothing new)"
        )
    if world.server.unstored_on_sigterm:
        result.violations.append(
            f"invariant 3: {world.server.unstored_on_sigterm} replica(s) exited after SIGTERM, "
            "before the drain's bound, holding the only copy of the newest set"
        )
    if schedule.must_keep_grant and (world.server.revoked or _grant_lost(world)):
        result.violations.append(
            "invariant 5: the grant was lost although a grace retry could have kept it"
        )
    if _revoked_forgotten_while_alone(world):
        result.revoked_forgotten_while_alone = True
    elif world.server.revoked and _after_lost_reply(world):
        result.grant_lost_after_lost_reply = True
        if result.outcome_unknown_announced == 0:
            result.violations.append(
                "invariant 3: revoked after a lost reply that no grant.outcome_unknown announced"
            )
    elif _grant_lost(world):
        if _truly_lost_reply(world) and result.outcome_unknown_announced > 0:
            result.grant_lost_after_lost_reply = True
        elif _lost_evicted_while_alone(world):
            result.lost_evicted_while_alone = True
        else:
            result.violations.append(
                "invariant 3: the grant was lost without a lost reply announced by "
                "grant.outcome_unknown"
            )
    else:
        _check_recovery(world, result, "at the end")


def _check_one_refresh_per_purge(world: World, result: Result) -> None:
    """Issue 22: without faults, a purge costs the fleet one refresh, never one per replica
    that reported the token, nor a second one for a late report of it: at most one refresh
    token is presented (and acted on) within PURGE_SETTLES_WITHIN of each recorded purge, or
    before the next one (the successor refused in turn, at least PURGE_INTERVAL later)."""
    times = sorted(at for at, _ in world.refusals)
    for index, at in enumerate(times):
        end = min(at + PURGE_SETTLES_WITHIN, (times[index + 1 :] or [math.inf])[0])
        spent = [
            p
            for p in world.server.presentations
            if at <= p.at < end and p.outcome in ("rotated", "grace")
        ]
        if len(spent) > 1:
            result.violations.append(
                f"purge: {len(spent)} refreshes within {PURGE_SETTLES_WITHIN:.0f}s of the purge "
                f"at {at:.2f} (by {', '.join(p.replica for p in spent)})"
            )


def _baseline(schedule: Schedule) -> int:
    """Token requests one broker makes over the same fault-free schedule."""
    key = (schedule.config.lifetime, schedule.duration)
    if key not in _BASELINES:
        single = Schedule(
            schedule.seed,
            WorldConfig(replicas=1, lifetime=schedule.config.lifetime, grace=0.0, offsets=[0.0]),
            (),
            schedule.duration,
        )
        with structlog.testing.capture_logs():
            _BASELINES[key] = run_simulated(_run(single)).token_requests
    return _BASELINES[key]


if __name__ == "__main__":
    generate = legacy_schedule if "--legacy" in sys.argv[2:] else make_schedule
    outcome = run(generate(int(sys.argv[1])))
    print(outcome.report())
    sys.exit(0 if outcome.ok else 1)
