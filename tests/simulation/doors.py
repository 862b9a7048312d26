"""Named regression schedules: each door an adversarial review opened (issue 20), scripted.

Random seeds rarely draw these sequences: each needs faults at moments inside one spend (the
token on the wire, a replica replaced meanwhile). A door's script waits for those moments in
the simulated world and injects its faults then; `run(DOORS[name]())` checks the same
invariants as every seeded schedule. `python -m tests.simulation.doors NAME` replays one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Literal

from broker.fleetclock import FleetClock
from broker.model import PROTOCOL_VERSION, RefreshPolicy
from broker.store import SpendRecord, SpendStart
from broker.store.memory import MemoryState
from tests.simulation.schedule import Schedule, run
from tests.simulation.world import Replica, World, WorldConfig

# How often a script looks at the world while it waits for a moment (simulated seconds).
POLL = 0.01


async def until(world: World, condition: Callable[[], object], limit: float = 600.0) -> None:
    """Wait on the world's clock until `condition()` is true (at most `limit` seconds)."""
    waited = 0.0
    while not condition():
        if waited >= limit:
            raise TimeoutError(f"the awaited moment did not come within {limit:.0f} s")
        await world.time.sleep(POLL)
        waited += POLL


async def _store_down_at_the_first_send(world: World) -> str:
    """Take the store down as it applies the first `mark_sent` (inside the round trip: the
    answer is lost, and the token is never sent); return that spender's name."""
    hit: list[str] = []

    def on_phase(phase: str, replica: str) -> None:
        if phase == "sent" and not hit:
            hit.append(replica)
            world.set_store_outage(True)

    world.server.phases.listeners.append(on_phase)
    await until(world, lambda: hit)
    return hit[0]


def _index(world: World, name: str) -> int:
    return next(i for i, r in enumerate(world.replicas) if r.name == name)


def _replaced_pod_then_empty_store(replicas: int) -> Schedule:
    """C1: while r0's refresh token is on the wire (a 9 s server, inside the budget), another
    pod is replaced by one that never heard the `sent` notice, and Redis restarts empty; the
    others take 3 s to reconnect. The new pod writes its set back and spends the same refresh
    token unless someone objects in time."""

    async def script(world: World) -> None:
        world.server.faults.slow = 9.0
        await until(world, lambda: world.server.sends)
        spender = _index(world, world.server.sends[0][1])
        replaced = (spender + 1) % replicas
        await world.crash(replaced)
        world.start_replica(replaced)
        await until(world, lambda: world.replicas[replaced].refresher.token is not None)
        others = [i for i in range(replicas) if i != replaced]
        world.empty_restart()
        # Everyone else's reconnect after the restart takes a few seconds (backoff, DNS): more
        # than the short objection window.
        for index in others:
            world.replicas[index].view.faults.partitioned = True
        await world.time.sleep(3.0)
        for index in others:
            world.replicas[index].view.faults.partitioned = False
        await world.time.sleep(27.0)
        world.server.faults.slow = 0.0

    config = WorldConfig(replicas=replicas, lifetime=60.0, grace=0.0, offsets=[0.0] * replicas)
    return Schedule(
        seed=20_001,
        config=config,
        faults=(),
        duration=480.0,
        name=f"c1_replaced_pod_empty_restart_{replicas}",
        script=script,
        script_heals_by=120.0,
    )


def c1_replaced_pod_empty_restart_3() -> Schedule:
    """C1 with a bystander that heard the `sent` notice but re-subscribes too late to object
    within the short objection window."""
    return _replaced_pod_then_empty_store(3)


def c1_replaced_pod_empty_restart_2() -> Schedule:
    """C1 with no bystander: only the spender itself knows its token is on the wire."""
    return _replaced_pod_then_empty_store(2)


def h1_slow_answer_past_the_budget() -> Schedule:
    """H1: the server answers one refresh after 14 s (and acts on it), then is healthy: the
    spender must wait for the answer rather than abandon an intact grant at its 10 s budget."""

    async def script(world: World) -> None:
        world.server.faults.stall_next = 14.0

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_002,
        config=config,
        faults=(),
        duration=480.0,
        name="h1_slow_answer_past_the_budget",
        script=script,
        script_heals_by=120.0,
    )


def h3_aborted_grace_retry() -> Schedule:
    """H3: on a grace server (30 s), a reply is lost after the server rotated; the one grace
    retry is refused with 429 (the server did not act), and the 429s last past the grace
    window. Then the pod is replaced (the new one remembers nothing): the store's record is all
    that stops it spending the token as new, outside the window. One replica, so that no
    bystander's memory (or veto) stands in for the record."""

    async def script(world: World) -> None:
        server = world.server
        server.faults.lose_replies = 1.0
        await until(world, lambda: server.presentations)
        server.faults.lose_replies = 0.0
        server.faults.status, server.faults.retry_after = 429, 5.0
        sends = len(server.sends)
        await until(world, lambda: len(server.sends) > sends)  # the grace retry, refused
        await world.time.sleep(40.0)
        server.faults.status, server.faults.retry_after = None, None
        for index in range(len(world.replicas)):
            await world.crash(index)
            world.start_replica(index)

    config = WorldConfig(replicas=1, lifetime=60.0, grace=30.0, offsets=[0.0])
    return Schedule(
        seed=20_003,
        config=config,
        faults=(),
        duration=480.0,
        name="h3_aborted_grace_retry",
        script=script,
        script_heals_by=120.0,
    )


def _lost_reply_on_a_long_lifetime(replicas: int) -> Schedule:
    """H2: on a grace server (30 s) with 300 s tokens, one reply is lost after the server
    rotated. The one retry inside the window keeps the grant, if it is made at once and no
    bystander vetoes it (the spender used to look again only 30 s later, past the window)."""

    async def script(world: World) -> None:
        server = world.server
        server.faults.lose_replies = 1.0
        await until(world, lambda: server.presentations)
        server.faults.lose_replies = 0.0

    config = WorldConfig(replicas=replicas, lifetime=300.0, grace=30.0, offsets=[0.0] * replicas)
    return Schedule(
        seed=20_004,
        config=config,
        faults=(),
        duration=2400.0,
        name=f"h2_grace_retry_on_a_long_lifetime_{replicas}",
        script=script,
        script_heals_by=300.0,
        must_keep_grant=True,
    )


def h2_grace_retry_on_a_long_lifetime_3() -> Schedule:
    """H2 with bystanders: they must not veto the retry the store granted."""
    return _lost_reply_on_a_long_lifetime(3)


def h2_grace_retry_on_a_long_lifetime_1() -> Schedule:
    """H2 alone: the spender itself must retry at once."""
    return _lost_reply_on_a_long_lifetime(1)


def h5_sigterm_mid_spend_after_an_outage() -> Schedule:
    """H5: a store outage outlasts the servable time, so the first spend after it waits the
    long objection window (6 s) before sending. SIGTERM reaches its spender inside that
    window: it must abandon the spend unsent (not send a refresh token after SIGTERM). The
    next spender is SIGTERMed the moment its refresh token is on the wire, and the server
    answers after 20 s (past the old 15 s drain): its drain must wait for the answer and
    store it. The drain's bound runs on the simulated clock, as the broker's does."""

    async def script(world: World) -> None:
        store = world.store.state
        await world.time.sleep(30.0)
        world.set_store_outage(True)
        await world.time.sleep(40.0)  # the token stops being servable meanwhile
        world.set_store_outage(False)
        key = world.key
        await until(world, lambda: key in store.spends and store.spends[key].state == "announced")
        first = _index(world, store.spends[key].owner)
        world.terminate(first)
        world.server.faults.stall_next = 20.0
        sends = len(world.server.sends)
        await until(world, lambda: len(world.server.sends) > sends)
        second = _index(world, world.server.sends[-1][1])
        world.terminate(second)
        await world.time.sleep(60.0)
        world.start_replica(first)
        world.start_replica(second)

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_005,
        config=config,
        faults=(),
        duration=480.0,
        name="h5_sigterm_mid_spend_after_an_outage",
        script=script,
        script_heals_by=240.0,
    )


def m4_500_after_rotating() -> Schedule:
    """M4: the server rotates one refresh token, then fails while rendering and answers 500.
    The old refresh token is spent: presenting it again revokes the grant, so the 500 must be
    an unknown outcome, not "the server did not act"."""

    async def script(world: World) -> None:
        server = world.server
        server.faults.error_after_acting = 500
        await until(world, lambda: server.presentations)
        server.faults.error_after_acting = None

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_005,
        config=config,
        faults=(),
        duration=480.0,
        name="m4_500_after_rotating",
        script=script,
        script_heals_by=120.0,
    )


def empty_restart_on_short_tokens() -> Schedule:
    """Redis restarts empty under a fleet of 8 s tokens, shorter than the long objection window
    (6 s) plus a request: the first spend after the write-back waits that window, and once a
    newer set exists later spends use the short one again. Every replica then serves without a
    gap from two lifetimes after the restart. (Found by the real-process TestEmptyRestart on
    5 s tokens: each spend for `forgetful_for` waited the long window, past the expiry.)"""
    lifetime = 8.0
    restart_at = 40.0

    async def script(world: World) -> None:
        await world.time.sleep(restart_at)
        world.store.restore(MemoryState())
        world.restarts[0] += 1
        await world.time.sleep(2 * lifetime)
        gaps: list[str] = []
        for _ in range(int(4 * lifetime / 0.1)):
            gaps += [
                f"{r.name} at {world.time.now:.1f}"
                for r in world.replicas
                if r.alive and r.refresher.servable() is None
            ]
            await world.time.sleep(0.1)
        if gaps:
            raise AssertionError(f"no token served after the restart: {gaps[:5]} ({len(gaps)})")

    policy = RefreshPolicy(at_fraction=0.5, min_remaining=1.0, jitter=0.05, safety_margin=0.8)
    config = WorldConfig(replicas=3, lifetime=lifetime, grace=0.0, offsets=[0.0] * 3, policy=policy)
    return Schedule(
        seed=20_006,
        config=config,
        faults=(),
        duration=restart_at + 8 * lifetime,
        name="empty_restart_on_short_tokens",
        script=script,
        script_heals_by=restart_at + 1.0,
    )


def h4_split_brain_both_sides_spend() -> Schedule:
    """H4: a Sentinel failover leaves the old primary writable (asynchronous replication, a
    partition): r0 keeps writing to it, cut off from its replicas, while r1 and r2 move to the
    promoted replica. Both sides hold the same set, a lease of their own and no record of the
    other's spend: when the token comes due both spend it. Its `sent` record on the old primary
    is acknowledged by no replica, so r0 must not send; at the heal the old primary's writes are
    lost and r0 adopts the set the other side refreshed."""

    async def script(world: World) -> None:
        await world.time.sleep(10.0)
        world.split_brain([0])
        # Past the refresh time (45 s) and to the token's expiry: both sides try to spend.
        await world.time.sleep(80.0)
        world.heal_split_brain()

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_007,
        config=config,
        faults=(),
        duration=480.0,
        name="h4_split_brain_both_sides_spend",
        script=script,
        script_heals_by=90.0,
    )


def m5_rolling_deploy_of_a_newer_protocol() -> Schedule:
    """M5: a rolling deploy brings in a replica of the next protocol version, whose rules this
    version cannot know (here: it keeps its lease and spend record elsewhere). It and a replica
    of this version start a refresh at the same moment: the older one must see the newer one's
    notice and step aside, not spend the same refresh token under its own lease. Then the
    rollout completes."""
    newer = PROTOCOL_VERSION + 1

    async def script(world: World) -> None:
        tokens = world.store.state.tokens
        key = world.key
        await until(world, lambda: key in tokens and tokens[key].generation >= 2)
        world.terminate(2)
        world.start_replica(2, protocol=newer)
        generation = tokens[key].generation
        await until(world, lambda: tokens[key].generation > generation)
        await world.time.sleep(5.0)
        for index in (0, 2):  # both start a refresh now
            refresher = world.replicas[index].refresher
            refresher.schedule = replace(refresher.schedule, at=0.0)
            refresher.wake()
        await world.time.sleep(60.0)
        for index in (0, 1):  # the rollout goes on
            world.terminate(index)
            world.start_replica(index, protocol=newer)
            await world.time.sleep(20.0)

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_009,
        config=config,
        faults=(),
        duration=600.0,
        name="m5_rolling_deploy_of_a_newer_protocol",
        script=script,
        script_heals_by=240.0,
    )


def m6_second_fleet_with_another_client() -> Schedule:
    """M6: a second fleet shares the store, the key prefix and the app's name, with another
    client id (its own server, its grant authorized later: a higher lineage). Each fleet must
    serve its own server's tokens and keep refreshing: never adopt, spend, block on or write
    over the other's set."""

    async def script(world: World) -> None:
        await world.time.sleep(100.0)
        await world.start_second_fleet(2, "another-client")
        other = world.other_server
        assert other is not None
        for _ in range(400):
            for replica in world.others:
                token = replica.refresher.servable()
                if token is not None and token.access_token not in other.expiry:
                    raise AssertionError(
                        f"{replica.name} of the second fleet serves a token its server never issued"
                    )
            refused = [p for p in other.presentations if p.outcome != "rotated"]
            if refused:
                raise AssertionError(f"the second fleet's server refused {refused[0]}")
            await world.time.sleep(1.0)
        stuck = [r.name for r in world.others if r.refresher.servable() is None]
        if stuck or not other.presentations:
            raise AssertionError(f"the second fleet does not refresh and serve: {stuck}")

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_008,
        config=config,
        faults=(),
        duration=600.0,
        name="m6_second_fleet_with_another_client",
        script=script,
        script_heals_by=100.0,
    )


def m3_store_clock_steps_back_under_a_restarted_pod() -> Schedule:
    """M3: 20 s after a refresh, the Redis host's clock steps back 40 s and a pod restarts:
    it measures the stepped clock and reads the stored set, whose expiry was written in the
    old frame, so by the fleet's clock alone the token lives 40 s longer than it does. The
    server is down, so no newer set replaces it before it expires. The pod must stop serving
    it by its own clock (which is right); the pod that kept running has its monotonic guard.
    Then Redis's clock is put right and the server is back."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        server.faults.down = True
        # 20 s on: a set read at once is served no longer than its lifetime from the read,
        # whatever the clocks say (set_stamped_ahead_read_at_once); this door is the later read.
        await world.time.sleep(20.0)
        world.store_clock.step = -40.0
        await world.crash(1)
        world.start_replica(1)
        await world.time.sleep(90.0)  # past the true expiry of the last token
        world.store_clock.step = 0.0
        server.faults.down = False

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_010,
        config=config,
        faults=(),
        duration=480.0,
        name="m3_store_clock_steps_back_under_a_restarted_pod",
        script=script,
        script_heals_by=180.0,
    )


def store_clock_step_back_after_a_send() -> Schedule:
    """Found by the swarm (seed 44 of the first swarm run): a strict server rotates a refresh
    token and answers 500 (the outcome is unknown), and Redis's clock steps back 30 s. The
    store measured the spend's age on its own clock: negative, so "younger than the retry
    window" even with no grace window at all, and it granted a "grace retry" of the spent
    token to a replica that knew nothing of the spend. (It was a bystander's config reload,
    which forgot the spend then; a reload carries its memory over now, so a replaced pod.)"""

    async def script(world: World) -> None:
        server = world.server
        server.faults.error_after_acting = 500
        await until(world, lambda: server.presentations)
        server.faults.error_after_acting = None
        world.store_clock.step = -30.0
        # A bystander's pod is replaced: the new one never heard of the spend, and a caller
        # whose upstream rejected the token makes it refresh at once (it asks the store).
        spender = _index(world, server.presentations[0].replica)
        bystander = (spender + 1) % len(world.replicas)
        await world.crash(bystander)
        replaced = world.start_replica(bystander)
        await until(world, lambda: replaced.refresher.token is not None)
        forced = asyncio.ensure_future(replaced.refresher.force())
        forced.add_done_callback(lambda task: task.cancelled() or task.exception())
        await world.time.sleep(5.0)
        world.store_clock.step = 0.0  # back before any pod re-measures its offset (M3)

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_011,
        config=config,
        faults=(),
        duration=480.0,
        name="store_clock_step_back_after_a_send",
        script=script,
        script_heals_by=120.0,
    )


def config_reload_while_the_answer_is_unstored() -> Schedule:
    """Found by the swarm (seeds 119, 331, 948 of the first swarm run): the spender's store
    link fails right after the server rotated, so the answer cannot be committed, and a config
    reload replaces its refresher meanwhile. The new refresher started from the store's older,
    spent set: the rotated set, held only by the retired refresher, was dropped."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        spender = _index(world, server.presentations[0].replica)
        world.replicas[spender].view.faults.partitioned = True
        await world.time.sleep(1.0)
        await world.reload(spender)
        await world.time.sleep(20.0)
        world.replicas[spender].view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_012,
        config=config,
        faults=(),
        duration=480.0,
        name="config_reload_while_the_answer_is_unstored",
        script=script,
        script_heals_by=120.0,
    )


def m2_half_open_spender() -> Schedule:
    """M2: the spender's subscription goes half-open the moment its refresh token leaves (a 9 s
    server): no error, no notice, and no store restart ever reaches it again. Then the other
    pod is replaced and Redis restarts empty: the new pod writes its set back and announces a
    spend of the same refresh token. Only the spender knows the token is on the wire; it must
    notice the silence (its heartbeats do not come back), re-subscribe and veto within the
    long objection window."""

    async def script(world: World) -> None:
        world.server.faults.slow = 9.0
        await until(world, lambda: world.server.sends)
        spender = _index(world, world.server.sends[0][1])
        world.replicas[spender].view.faults.half_opened += 1
        replaced = (spender + 1) % 2
        await world.crash(replaced)
        world.start_replica(replaced)
        await until(world, lambda: world.replicas[replaced].refresher.token is not None)
        world.store.restore(MemoryState())
        world.restarts[0] += 1
        await world.time.sleep(30.0)
        world.server.faults.slow = 0.0

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_013,
        config=config,
        faults=(),
        duration=480.0,
        name="m2_half_open_spender",
        script=script,
        script_heals_by=120.0,
    )


def aborted_grace_retry_respent_by_its_retrier() -> Schedule:
    """Found by the swarm (seed 177, with a split brain): on a grace server (30 s) the spender's
    store link fails right after the server rotated, so its answer cannot be stored and the
    record stays `sent`. A new pod, which never heard the `sent` notice, takes the lease once
    the spender's lapses and gets the one grace retry; the server refuses it with 429 and a
    long Retry-After. The store restores the unknown spend under fence 0 and the retrier's
    name, and the retrier's next `begin_spend`, naming no resolved fence (0), matched it as its
    own resolved record: the token was spent as new, past the window."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        spender = _index(world, server.presentations[0].replica)
        world.replicas[spender].view.faults.partitioned = True
        server.faults.status, server.faults.retry_after = 429, 25.0
        world.add_replica(offset=0.0)
        sends = len(server.sends)
        await until(world, lambda: len(server.sends) > sends)  # the grace retry, refused
        await world.time.sleep(1.0)  # refused when it arrives
        server.faults.status, server.faults.retry_after = None, None
        await world.time.sleep(45.0)
        world.replicas[spender].view.faults.partitioned = False

    config = WorldConfig(replicas=1, lifetime=60.0, grace=30.0, offsets=[0.0])
    return Schedule(
        seed=20_021,
        config=config,
        faults=(),
        duration=480.0,
        name="aborted_grace_retry_respent_by_its_retrier",
        script=script,
        script_heals_by=120.0,
    )


def mark_sent_answer_lost_in_an_outage() -> Schedule:
    """Found by the swarm (seeds 2, 68, 267, 301, 436, 452, 1148, 1275, 1386): the store goes
    down right after it applied a spender's `mark_sent`, before the answer reached it. The
    spender never sends the token and cannot record its abort. The spender stays cut off a
    few seconds longer than the others, so a bystander meets the `sent` record first; then
    the spender is back. Nothing was presented: the fleet must refresh again."""

    async def script(world: World) -> None:
        spender_name = await _store_down_at_the_first_send(world)
        spender = _index(world, spender_name)
        await world.time.sleep(8.0)
        world.replicas[spender].view.faults.partitioned = True
        world.set_store_outage(False)
        await world.time.sleep(5.0)
        world.replicas[spender].view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_014,
        config=config,
        faults=(),
        duration=480.0,
        name="mark_sent_answer_lost_in_an_outage",
        script=script,
        script_heals_by=120.0,
    )


def paused_bystander_keeps_its_buffered_notices() -> Schedule:
    """Found by the swarm (seed 1261): a bystander is paused for 6.8 s (a GC pause, a stalled
    loop) inside a spend's objection window. The server takes 1.5 s to answer 429 without
    acting, the spender aborts and is then cut off; the notices (`sent`, `abort`) wait unread
    in the paused bystander's socket. When it resumes, its silence guard has overslept the 5 s
    deadline: the old one dropped the subscription after reading `sent` and before `abort`,
    remembered the token as sent for good, and vetoed the third replica's spend of it.

    Re-aimed after the lease notices changed every schedule's timing: which of the resuming
    reader and guard runs first is the event loop's choice (both wake at the pause's end), and
    with an answer at once the reader went first, so the old guard saw `sent` just read and
    let the subscription be. With the 429 1-2 s slow the guard goes first (tried: pauses
    0.05-0.45 s into the window, 5.5-8 s long), as it did in the swarm's seed."""

    async def script(world: World) -> None:
        hit: list[str] = []
        pauses: list[asyncio.Future[None]] = []

        async def pause_bystander(spender: str) -> None:
            await world.time.sleep(0.3)  # it heard the spend notice; `sent` comes while paused
            world.pause((_index(world, spender) + 1) % 3, 6.8)

        def on_phase(phase: str, replica: str) -> None:
            if phase == "announced" and not hit:
                hit.append(replica)
                pauses.append(asyncio.ensure_future(pause_bystander(replica)))
            elif phase == "sent" and len(hit) == 1:
                hit.append(replica)
                world.server.faults.status, world.server.faults.retry_after = 429, 10.0
                world.server.faults.stall_next = 1.5

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: len(hit) == 2)
        spender = _index(world, hit[0])
        await world.time.sleep(2.5)  # the 429 came, the abort is published: cut the spender off
        world.replicas[spender].view.faults.partitioned = True
        await world.time.sleep(8.0)
        world.server.faults.status, world.server.faults.retry_after = None, None
        await world.time.sleep(21.0)
        world.replicas[spender].view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_016,
        config=config,
        faults=(),
        duration=480.0,
        name="paused_bystander_keeps_its_buffered_notices",
        script=script,
        script_heals_by=120.0,
    )


def grace_retry_vetoed_on_a_resync() -> Schedule:
    """Found by the swarm (seed 47): on a server with a 30 s reuse grace window, the
    spender's store link fails right after its `mark_sent` was applied (the others heard
    `sent`; it never sends). When its lease lapses, another replica is granted the one grace
    retry. The third replica re-syncs (a reconnect) inside that retry's objection window: the
    old re-sync vetoed any announced spend of a token it remembers as sent, the granted retry
    too, and the vetoed record blocked the token for good."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.replicas[_index(world, replica)].view.faults.partitioned = True
            elif phase == "announced" and len(hit) == 1 and replica != hit[0]:
                hit.append(replica)
                third = 3 - _index(world, hit[0]) - _index(world, replica)
                world.replicas[third].refresher.notify_store_changed()

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        await world.time.sleep(20.0)
        world.replicas[_index(world, hit[0])].view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=30.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_017,
        config=config,
        faults=(),
        duration=480.0,
        name="grace_retry_vetoed_on_a_resync",
        script=script,
        script_heals_by=120.0,
    )


def grace_retry_of_a_spend_never_sent() -> Schedule:
    """Found by the swarm (seed 1045): on a server with a 30 s reuse grace window, the
    spender's store link fails right after its `mark_sent` was applied (it never sends). When
    its lease lapses another replica is granted the one grace retry, and is cut off in turn
    before it sends. The old store kept the retry's record against every fence, and the
    retry's abort restored the first spend's record as unknown, which its own spender could
    no longer end (it is not under its fence): the token was blocked for good, though nobody
    had presented it."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            first = phase == "sent" and not hit  # the spender: its answer is lost
            retry = phase == "announced" and len(hit) == 1 and replica != hit[0]
            if first or retry:
                hit.append(replica)
                world.replicas[_index(world, replica)].view.faults.partitioned = True

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        await world.time.sleep(20.0)
        world.replicas[_index(world, hit[0])].view.faults.partitioned = False
        await world.time.sleep(15.0)
        for name in hit[1:]:
            world.replicas[_index(world, name)].view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=30.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_018,
        config=config,
        faults=(),
        duration=480.0,
        name="grace_retry_of_a_spend_never_sent",
        script=script,
        script_heals_by=120.0,
    )


# What one refresh may cost the fleet in lease requests, on average (the holder's, and a few
# replicas due in the moment before its grant was heard), whatever the fleet's size.
LEASE_REQUESTS_PER_REFRESH = 2.0
# How long a replica that hears no commit may hold an older set than the store's: the lease it
# waits on (at most its servable time), then one read.
CONVERGE_WITHIN = 15.0


def lost_notices_under_one_due_time() -> Schedule:
    """Issue 20, the fleet's cost: 8 replicas share one due time, and the first to ask takes
    the lease. The others used to ask too, and again every second while it was busy: a refresh
    cost O(replicas) lease requests. Now they hear its `lease` notice and wait for its commit.

    One replica never hears a commit or a release (pub/sub delivers at most once): it must
    still converge by reading the store, within its wait on the lease (capped by its servable
    time), not the 30 s look. Later it hears those commits, stale, all at once: a notice
    carrying an older set than the one it holds is never adopted."""

    async def script(world: World) -> None:
        deaf = world.replicas[1]
        await until(world, lambda: deaf.refresher.token is not None)
        deaf.view.faults.lost_kinds = frozenset({"token", "release"})
        start = world.time.now
        leases = sum(r.view.lease_requests for r in world.replicas)
        presented = len(world.server.presentations)
        held = _rank(deaf)
        behind_since: float | None = None
        worst = 0.0
        while world.time.now - start < 300.0:
            await world.time.sleep(0.05)
            rank = _rank(deaf)
            if rank < held:
                raise AssertionError(f"{deaf.name} went back from {held} to {rank}")
            held = rank
            stored = world.store.state.tokens.get(world.key)
            if stored is not None and stored.rank > rank:
                behind_since = world.time.now if behind_since is None else behind_since
                worst = max(worst, world.time.now - behind_since)
            else:
                behind_since = None
        refreshes = len(world.server.presentations) - presented
        requests = sum(r.view.lease_requests for r in world.replicas) - leases
        if refreshes < 5 or requests > LEASE_REQUESTS_PER_REFRESH * refreshes:
            raise AssertionError(f"{requests} lease requests for {refreshes} refreshes")
        if worst > CONVERGE_WITHIN:
            raise AssertionError(
                f"{deaf.name} held an older set than the store's for {worst:.1f} s"
            )
        # The lost commits arrive now, late and stale: each carries an older set.
        deaf.view.faults.lost_kinds = frozenset()
        late, deaf.view.lost = deaf.view.lost, []
        assert any(n.kind == "token" and n.token is not None for n in late)
        for notice in late:
            deaf.refresher.on_notice(notice)
            await world.time.sleep(0.05)
            if _rank(deaf) < held:
                raise AssertionError(f"{deaf.name} adopted a stale set from a late notice")

    config = WorldConfig(replicas=8, lifetime=60.0, grace=0.0, offsets=[0.0] * 8)
    return Schedule(
        seed=20_022,
        config=config,
        faults=(),
        duration=480.0,
        name="lost_notices_under_one_due_time",
        script=script,
        script_heals_by=330.0,
    )


# Store reads one refresh may cost the whole fleet of `reads_at_one_due_time` (8 replicas):
# the holder's 3 under the lease (the double check, the repair, the look after the objection
# window), and one each for the few replicas whose attempt was under way when the holder's
# commit came. It was 5.5: every replica read before asking for the lease, the holder too.
READS_PER_REFRESH = 4.75


def reads_at_one_due_time() -> Schedule:
    """Issue 20, the fleet's cost: 8 replicas share one due time and hear every notice. Each
    adopts the set the holder's `token` notice carries, so it knows what the store holds: its
    next attempt asks for the lease without reading the store first (the holder reads under
    the lease anyway). Every replica used to read before asking, most only to hear `busy`."""

    async def script(world: World) -> None:
        await until(world, lambda: all(r.refresher.token is not None for r in world.replicas))
        reads = sum(r.view.loads for r in world.replicas)
        presented = len(world.server.presentations)
        await world.time.sleep(300.0)
        refreshes = len(world.server.presentations) - presented
        spent = sum(r.view.loads for r in world.replicas) - reads
        if refreshes < 5 or spent > READS_PER_REFRESH * refreshes:
            raise AssertionError(f"{spent} store reads for {refreshes} refreshes")

    # Tokens of 20 s: a notice every 15 s, so no replica's 30 s look falls in the count.
    config = WorldConfig(replicas=8, lifetime=20.0, grace=0.0, offsets=[0.0] * 8)
    return Schedule(
        seed=20_023,
        config=config,
        faults=(),
        duration=420.0,
        name="reads_at_one_due_time",
        script=script,
        script_heals_by=330.0,
    )


def _rank(replica: Replica) -> tuple[int, int]:
    token = replica.refresher.token
    return token.rank if token is not None else (0, 0)


def sigterm_with_the_answer_unstored() -> Schedule:
    """Found by the swarm (seed 162): the spender's store link fails the moment the server
    rotated its refresh token, so the answer cannot be committed, and SIGTERM comes right
    after. Its drain waited only for the answer, not for the set to be stored: the process
    exited holding the only copy of the rotated set, and the fleet was left with the spent
    one. The drain must write the set back, again and again, until the store takes it."""

    async def script(world: World) -> None:
        server = world.server
        cut: list[int] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "acted" and not cut:
                cut.append(_index(world, replica))
                world.replicas[cut[0]].view.faults.partitioned = True

        server.phases.listeners.append(on_phase)
        await until(world, lambda: cut)
        spender = cut[0]
        world.terminate(spender)
        await world.time.sleep(20.0)
        world.replicas[spender].view.faults.partitioned = False
        await world.time.sleep(160.0)
        world.start_replica(spender)

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_023,
        config=config,
        faults=(),
        duration=600.0,
        name="sigterm_with_the_answer_unstored",
        script=script,
        script_heals_by=200.0,
    )


def spender_paused_between_mark_sent_and_sending() -> Schedule:
    """Found by the swarm (seed 760): the store applies the spender's `mark_sent`, restarts
    empty at once (the `sent` record and its notice are lost), and the spender's process
    freezes (a GC pause, a stalled loop) for 25 s before it reads the answer. The other pod
    writes its set back, waits the long objection window and spends the token (the store
    knows of no spend). The spender then wakes with its `mark_sent` answered "yes" and, long
    past its lease, sent the same refresh token: revoked. It must check its lease's time
    before sending after `mark_sent`, not only before."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.pause(_index(world, replica), 25.0)
                world.store.restore(MemoryState())
                world.restarts[0] += 1

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_024,
        config=config,
        faults=(),
        duration=480.0,
        name="spender_paused_between_mark_sent_and_sending",
        script=script,
        script_heals_by=120.0,
    )


def forgotten_while_the_spender_is_paused() -> Schedule:
    """The documented limit (swarm seed 194), not a door: the spender's process freezes for
    30 s the moment the server rotated its refresh token, and Redis restarts empty right when
    the token was marked sent (a Redis without persistence; the restart drops the `sent`
    notice too). The spender was the only replica that knew; the other pod writes its set
    back, waits the long objection window and spends the same token: revoked, announced by
    grant.reuse_detected. The checker excuses exactly this: an empty restart erased the
    record, and its spender could not speak (dead or paused) from then until the new spend."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.empty_restart()
            elif phase == "acted" and hit and replica == hit[0] and len(hit) == 1:
                hit.append(replica)
                world.pause(_index(world, replica), 30.0)

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: len(hit) == 2)

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_025,
        config=config,
        faults=(),
        duration=480.0,
        name="forgotten_while_the_spender_is_paused",
        script=script,
        script_heals_by=120.0,
    )


def a_pod_started_in_an_outage_with_its_clock_behind() -> Schedule:
    """Found by the swarm (seed 516): a pod whose clock is 25 s behind restarts while the store
    is down, so it cannot measure its offset, and the server is down too. When the store is
    back (after the last set's true expiry), the pod reads the set at once, on its own clock
    alone: by that clock the set still lives 25 s, and it served it until its measuring round
    came, up to 5 s later (here 3.5 s). It must measure before it reads a set from the store."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        server.faults.down = True
        world.set_store_outage(True)
        await world.crash(1)
        world.start_replica(1)
        # Past the set's true expiry (a 60 s lifetime), and 1.5 s after one of the new pod's
        # measuring rounds (every 5 s from its start while it never measured): the old code
        # reads the set at once and serves it until the next round. Back on a round (75 s),
        # the pod measured the moment it read, and the old code served nothing late (any
        # outage of 75.5-77.5 s opens the door; from 78 s its own clock's margin ends the set
        # before a step check sees it).
        await world.time.sleep(76.5)
        world.set_store_outage(False)
        await world.time.sleep(30.0)
        server.faults.down = False

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0, -25.0])
    return Schedule(
        seed=20_026,
        config=config,
        faults=(),
        duration=480.0,
        name="a_pod_started_in_an_outage_with_its_clock_behind",
        script=script,
        script_heals_by=150.0,
    )


def failover_loses_the_abort() -> Schedule:
    """Found by the swarm (seeds 82, 465, 1095, ...): the server refuses a refresh with 429
    (it did not act) and the spender records the abort; then a failover promotes a replica
    that has the acknowledged `sent` record (WAIT) but not the abort, which no one waits for.
    The spender knows its spend ended without effect, but named that fence to the store only
    when the abort could not be stored: its next spend met its own `sent` record as unknown,
    and the fleet waited for a person."""

    async def script(world: World) -> None:
        server, key = world.server, world.key
        server.faults.status, server.faults.retry_after = 429, 1.0
        marked: list[MemoryState] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not marked:
                acknowledged = world.store.acknowledged
                assert acknowledged is not None
                marked.append(acknowledged)

        server.phases.listeners.append(on_phase)
        await until(world, lambda: server.sends)
        await until(world, lambda: key not in world.store.state.spends)  # the abort is stored
        # The failover promotes a replica that acknowledged the `sent` record but not the
        # abort (the abort is WAITed for too since seed 23291, but Sentinel may promote
        # another replica than the one that acknowledged): the abort is lost.
        world.store.restore(marked[0])
        world.restarts[0] += 1
        server.faults.status, server.faults.retry_after = None, None

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_027,
        config=config,
        faults=(),
        duration=480.0,
        name="failover_loses_the_abort",
        script=script,
        script_heals_by=120.0,
    )


def split_brain_keeps_an_aborted_spend() -> Schedule:
    """Found by the swarm (seeds 391, 821, 913, 965): the spender's request is refused with
    429 (the server did not act) just as a split brain cuts it off with the old primary; the
    promoted side keeps its `sent` record, the abort lands on the old primary only. A
    bystander on the promoted side takes the one grace retry, refused too, which restores the
    record as unknown (naming the spender's spend). On the old side the spender aborts more
    spends (no replica acknowledges `sent`). At the heal the old primary's writes, the abort
    among them, are lost: only the spender knows that its spend had no effect, and it named
    to the store only its last aborted fence, once: the fleet waited for a person."""

    async def script(world: World) -> None:
        server = world.server
        server.faults.status, server.faults.retry_after = 429, 1.0
        await until(world, lambda: server.sends)
        first = server.sends[0][1]
        world.split_brain([_index(world, first)])  # `sent` on both sides, the abort on one
        await until(world, lambda: any(name != first for _, name, _ in server.sends))
        await world.time.sleep(5.0)  # the grace retry on the promoted side was refused
        server.faults.status, server.faults.retry_after = None, None
        await world.time.sleep(10.0)
        world.heal_split_brain()

    config = WorldConfig(replicas=3, lifetime=60.0, grace=30.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_040,
        config=config,
        faults=(),
        duration=480.0,
        name="split_brain_keeps_an_aborted_spend",
        script=script,
        script_heals_by=150.0,
    )


def stale_copy_outlives_the_split() -> Schedule:
    """Found by the swarm (seed 1233): the spender's request is refused with 429 just as a
    split brain cuts a bystander off with the old primary, which keeps a copy of the `sent`
    record; the spender's abort lands on the promoted side. The bystander meets the copy and
    remembers the spend as its spender's, unresolved; at the heal the copy is gone but the
    abort notice is long past. The spender is paused; the third replica, a pod replaced
    meanwhile, spends the token next, and the bystander vetoes it: the vetoed record named no spend that anyone could
    resolve, so it blocked every replica, the spender included, and the fleet waited for a
    person."""

    async def script(world: World) -> None:
        server, key = world.server, world.key
        server.faults.status, server.faults.retry_after = 429, 1.0
        await until(world, lambda: server.sends)
        spender = _index(world, server.sends[0][1])
        bystander = (spender + 1) % 3
        world.split_brain([bystander])  # the copy of the `sent` record on the old primary
        await until(world, lambda: key not in world.store.state.spends)  # the abort, here
        world.pause(spender, 60.0)
        third = (spender + 2) % 3  # replaced: the new pod spends next, knowing nothing
        await world.crash(third)
        world.start_replica(third)
        await world.time.sleep(15.0)
        world.heal_split_brain()
        await world.time.sleep(5.0)
        server.faults.status, server.faults.retry_after = None, None

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_041,
        config=config,
        faults=(),
        duration=480.0,
        name="stale_copy_outlives_the_split",
        script=script,
        script_heals_by=150.0,
    )


def purge_once_for_a_revoked_token() -> Schedule:
    """Issue 22: the upstream revokes the fleet's token 40 s into its 120 s life. Every one of
    the 4 replicas meets the 401 and reports it at once; 8 s later a slow request that carried
    the old token meets its 401 too, on another replica. The fleet refreshes once (a rotating
    grant, spent under the lease), every report is answered with the successor, and the late
    report of the old token refreshes nothing. A replica that forced its own refresh (the old
    proxy) answered its callers with the refused token while another held the lease, and
    refreshed the successor again on the late report (older than 5 s by then)."""

    async def script(world: World) -> None:
        await world.time.sleep(40.0)
        refused = world.replicas[0].refresher.token
        assert refused is not None
        assert all(r.refresher.token == refused for r in world.replicas), "not one shared set"
        before = world.server.requests
        reports = [asyncio.ensure_future(r.refresher.refused(refused)) for r in world.replicas]
        await until(world, lambda: all(report.done() for report in reports), limit=30.0)
        retried = [report.result() for report in reports]
        assert all(t.access_token != refused.access_token for t in retried), (
            "a replica retried with the refused token"
        )
        await world.time.sleep(8.0)
        late = asyncio.ensure_future(world.replicas[1].refresher.refused(refused))
        await until(world, late.done, limit=30.0)
        assert late.result().access_token != refused.access_token
        await world.time.sleep(15.0)
        assert world.server.requests == before + 1, (
            f"{world.server.requests - before} refreshes for one revoked token"
        )

    config = WorldConfig(replicas=4, lifetime=120.0, grace=0.0, offsets=[0.0] * 4)
    return Schedule(
        seed=22_001,
        config=config,
        faults=(),
        duration=960.0,
        name="purge_once_for_a_revoked_token",
        script=script,
        script_heals_by=70.0,
    )


def grace_retry_timed_by_a_stepped_store_clock() -> Schedule:
    """Found by the swarm (seed 4202): on a server with a 30 s reuse grace window, Redis's
    clock is 25 s ahead (an NTP step) while a spend is marked sent, so its record's send time
    is 25 s in the future; the spender is killed the moment the server rotated (the answer is
    lost with it), and the clock is stepped back. The bystanders, who heard `sent`, are cut
    off for 20 s; a pod that replaces the spender asks 37 s after the send, and the store,
    timing the window on its own clock, finds the record 12 s old and grants the one grace
    retry: past the server's window, the token is presented again and the grant revoked."""

    async def script(world: World) -> None:
        world.store_clock.step = 25.0
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "acted" and not hit:
                hit.append(replica)

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        spender = _index(world, hit[0])
        await world.crash(spender)
        world.store_clock.step = 0.0
        others = [i for i in range(len(world.replicas)) if i != spender]
        for index in others:
            world.replicas[index].view.faults.partitioned = True
        await world.time.sleep(20.0)
        for index in others:
            world.replicas[index].view.faults.partitioned = False
        await world.time.sleep(10.0)
        world.start_replica(spender)

    config = WorldConfig(replicas=3, lifetime=60.0, grace=30.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_050,
        config=config,
        faults=(),
        duration=480.0,
        name="grace_retry_timed_by_a_stepped_store_clock",
        script=script,
        script_heals_by=120.0,
    )


def grace_retry_of_a_rejected_token() -> Schedule:
    """Found by the swarm (seed 4379, after a revocation): on a server with a 30 s reuse grace
    window, the server answers `invalid_grant` to a refresh token (here: it expired there).
    Its spender ends the spend as unknown (a double spend, or a dead grant: `ReuseDetected`);
    to the store that is any unknown spend, and it grants the one grace retry to the next
    holder, which presents the dead token again. A person then authorizes again."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)  # one ordinary refresh first
        server.valid_refresh = "rt-expired-on-the-server"  # the stored token is dead there
        presented = len(server.presentations)
        await until(world, lambda: len(server.presentations) > presented)
        await world.time.sleep(60.0)
        await world.store.commit(world.key, replace(server.authorize(), lineage=2))

    config = WorldConfig(replicas=3, lifetime=60.0, grace=30.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_051,
        config=config,
        faults=(),
        duration=480.0,
        name="grace_retry_of_a_rejected_token",
        script=script,
        script_heals_by=150.0,
    )


def forgotten_while_the_spender_is_cut_off() -> Schedule:
    """The documented limit again, with the spender cut off instead of paused (swarm seeds
    7814, 8549 and eleven more: a partition, or the old primary of a split brain): Redis
    restarts empty as the token is marked sent, and the spender cannot reach the store for
    30 s, longer than the long objection window. The other pods write their set back and spend
    the same token: revoked, announced by grant.reuse_detected, and excused as the limit."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.empty_restart()
            elif phase == "acted" and hit and replica == hit[0] and len(hit) == 1:
                hit.append(replica)
                world.replicas[_index(world, replica)].view.faults.partitioned = True

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: len(hit) == 2)
        await world.time.sleep(30.0)
        world.replicas[_index(world, hit[0])].view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_052,
        config=config,
        faults=(),
        duration=480.0,
        name="forgotten_while_the_spender_is_cut_off",
        script=script,
        script_heals_by=120.0,
    )


def fence_counter_evicted_after_a_send() -> Schedule:
    """Found by the swarm (seeds 75139, 56916): as the token is marked sent, a split brain
    leaves its spender alone on the old primary (every subscription drops: no bystander hears
    `sent`), and the promoted primary evicts the lease and the fence counter, not the `sent`
    record. The next holder is granted fence 1 again, the spender's fence. A store that took
    the record under that fence for the caller's own replaced it, and the token was presented
    a second time; a spend is its owner and fence together, so the record answers UNKNOWN and
    the fleet waits until the heal brings the spender's set back."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.split_brain([_index(world, replica)], cause=script)
                world.store.state.leases.pop(world.key, None)
                world.store.state.fences.pop(world.key, None)

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        await world.time.sleep(20.0)
        world.heal_split_brain(cause=script)

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_132,
        config=config,
        faults=(),
        duration=480.0,
        name="fence_counter_evicted_after_a_send",
        script=script,
        script_heals_by=120.0,
    )


def commit_forgotten_while_its_spender_is_cut_off(cut_off: float = 30.0) -> Schedule:
    """The documented limit with the answer committed (swarm seed 81490, scripted): every
    subscription drops as the token is marked sent (a failover that keeps everything), so no
    bystander hears the `sent` or `token` notice; the spender commits the rotated set (a
    replica acknowledges it), is cut off from the store, and Redis restarts empty. The set
    was the store's one trace of the spend. The bystanders write their older set back and
    spend its token after the long objection window: revoked, announced, and excused as the
    limit while the spender stays cut off past that window (`cut_off` seconds)."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.restarts[0] += 1  # every subscription drops
                world.store.watch.poke()

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        spent = world.store.state.tokens[world.key].rank
        await until(world, lambda: world.store.state.tokens[world.key].rank > spent)
        spender = world.replicas[_index(world, hit[0])]
        spender.view.faults.partitioned = True
        world.empty_restart()
        await world.time.sleep(cut_off)
        spender.view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_130,
        config=config,
        faults=(),
        duration=480.0,
        name="commit_forgotten_while_its_spender_is_cut_off",
        script=script,
        script_heals_by=120.0,
    )


def forgotten_then_down_then_its_spender_cut_off(cut_off: float = 30.0) -> Schedule:
    """The documented limit across an outage (swarm seed 94531, scripted): Redis restarts
    empty as the token is marked sent and stays down 20 s (its downtime, which the world draws
    as an outage); 60 ms after it is back, before any subscription could come back, the
    spender, which holds the rotated set, is cut off from it for 30 s (`cut_off`). The bystanders write
    their older set back and spend its token after the long objection window: revoked,
    announced, and excused as the limit (the time to come back and object is counted from the
    store's return)."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.empty_restart()
            elif phase == "acted" and hit and replica == hit[0] and len(hit) == 1:
                hit.append(replica)
                world.set_store_outage(True)

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: len(hit) == 2)
        await world.time.sleep(20.0)
        world.set_store_outage(False)
        await world.time.sleep(0.06)
        spender = world.replicas[_index(world, hit[0])]
        spender.view.faults.partitioned = True
        await world.time.sleep(cut_off)
        spender.view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_137,
        config=config,
        faults=(),
        duration=480.0,
        name="forgotten_then_down_then_its_spender_cut_off",
        script=script,
        script_heals_by=120.0,
    )


def holder_back_soon_after_a_forgetful_outage() -> Schedule:
    """Found by hand beside swarm seed 94531 (2026-12-07): as
    `forgotten_then_down_then_its_spender_cut_off`, but the spender, which holds the rotated
    set (its commit failed: the store was down), is cut off for 3 s only, shorter than the long
    objection window (6 s). A bystander writes its older set back and spends it after that
    window. The spender was reachable again 3 s before that send, but its watcher's reconnect
    delay, grown to 5 s (`STORE_RETRY_MAX`) in the outage, brought it back 1.3 s after it: the
    token was presented twice. A watcher whose replica holds a set the store did not take
    retries every 0.5 s (`must_reach_store`): the spender writes its set back within the
    window, and the bystander's spend ends as stale."""
    schedule = forgotten_then_down_then_its_spender_cut_off(cut_off=3.0)
    return replace(schedule, seed=20_144, name="holder_back_soon_after_a_forgetful_outage")


def spender_in_flight_back_soon_after_a_forgetful_outage() -> Schedule:
    """The same with the spender's refresh token still on the wire (the server acts on it 40 s
    late): Redis restarts empty as the token is marked sent, goes down 60 ms later for 20 s,
    and 60 ms after it is back the spender is cut off for 3 s. A bystander writes the set back
    and announces a spend of the same token; only the spender's veto, sent once its
    subscription is back, stops it. With the watcher's delay grown to 5 s, the spender came
    back after the bystander's send (at 72.1 s), and the server, acting on the spender's
    request at 85.9 s, saw the token presented twice and revoked the grant. Its watcher
    retries every 0.5 s while a token of its is on the wire (`must_reach_store`), and vetoes
    the spend within the long objection window."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.empty_restart()
                world.server.faults.stall_next = 40.0

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        await world.time.sleep(0.06)
        world.set_store_outage(True)
        await world.time.sleep(20.0)
        world.set_store_outage(False)
        await world.time.sleep(0.06)
        spender = world.replicas[_index(world, hit[0])]
        spender.view.faults.partitioned = True
        await world.time.sleep(3.0)
        spender.view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_145,
        config=config,
        faults=(),
        duration=480.0,
        name="spender_in_flight_back_soon_after_a_forgetful_outage",
        script=script,
        script_heals_by=120.0,
    )


def config_reload_after_a_mark_sent_answer_lost() -> Schedule:
    """Found by the swarm (seed 8339, and 7 more of seeds 3,500 to 9,999): the store goes down
    right after it applied the spender's `mark_sent`, before the answer reached it (so the
    token was never sent and the abort cannot be written), and a config reload replaces the
    spender's refresher during the outage. Only the old refresher knew the record was never
    sent; the simulation's reload used to carry nothing over (the broker's has carried it
    since issue 20's Low item), so nobody ended the record and the fleet waited for a person.
    The new refresher writes the abort under the old owner name when the store is back."""

    async def script(world: World) -> None:
        spender_name = await _store_down_at_the_first_send(world)
        await world.time.sleep(1.0)
        await world.reload(_index(world, spender_name))
        await world.time.sleep(8.0)
        world.set_store_outage(False)

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_053,
        config=config,
        faults=(),
        duration=480.0,
        name="config_reload_after_a_mark_sent_answer_lost",
        script=script,
        script_heals_by=120.0,
    )


def two_failovers_at_one_moment() -> Schedule:
    """Found by the swarm (seed 5863): a strict server rotates a refresh token and answers 500
    (the outcome is unknown), and two failovers happen at the moment the token is marked sent
    (two faults drawn at one moment). A replica acknowledged the `sent` record, and the first
    failover kept it; the model's second one went back to the store before the spend, as if
    no replica had it: a bystander, whose subscription the failover dropped with the `sent`
    notice, presented the token again. The promoted replica's own replicas resync from it, so
    the second failover keeps the record too. The spender is cut off for 30 s after the
    server acted, so that only the record stands in the way."""

    async def script(world: World) -> None:
        server = world.server
        server.faults.error_after_acting = 500
        before = world.store.snapshot()  # before any spend
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                for _ in range(2):
                    world.store.fail_over(before)
                    world.restarts[0] += 1
            elif phase == "acted" and hit and replica == hit[0] and len(hit) == 1:
                hit.append(replica)  # the spender is cut off: it cannot veto
                world.replicas[_index(world, replica)].view.faults.partitioned = True

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: len(hit) == 2)
        await world.time.sleep(1.0)
        server.faults.error_after_acting = None
        await world.time.sleep(29.0)
        world.replicas[_index(world, hit[0])].view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_054,
        config=config,
        faults=(),
        duration=480.0,
        name="two_failovers_at_one_moment",
        script=script,
        script_heals_by=120.0,
    )


def veto_naming_a_spend_a_reload_carried() -> Schedule:
    """Found by the swarm (seed 4149): as `config_reload_after_a_mark_sent_answer_lost`, and
    the spender stays cut off 5 s after the store is back, so a bystander meets the `sent`
    record first and keeps it as the old owner's spend (its fence from the record); the
    bystander then misses the abort notice (pub/sub delivers at most once), and vetoes the next
    replica's spend of the token, naming the old owner's spend. Only that owner's abort lifts
    the veto, and the new refresher had been handed the last abort alone, written once: the
    fleet waited for a person. It now remembers every spend the old one aborted, as its own,
    and ends them again when a record of their token blocks it."""

    async def script(world: World) -> None:
        spender_name = await _store_down_at_the_first_send(world)
        spender = _index(world, spender_name)
        bystander = (spender + 1) % len(world.replicas)
        await world.time.sleep(1.0)
        await world.reload(spender)
        await world.time.sleep(7.0)
        world.replicas[spender].view.faults.partitioned = True
        world.replicas[bystander].view.faults.lost_kinds = frozenset({"abort"})
        world.set_store_outage(False)
        await world.time.sleep(5.0)
        world.replicas[spender].view.faults.partitioned = False
        await world.time.sleep(30.0)
        world.replicas[bystander].view.faults.lost_kinds = frozenset()

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_055,
        config=config,
        faults=(),
        duration=480.0,
        name="veto_naming_a_spend_a_reload_carried",
        script=script,
        script_heals_by=150.0,
    )


def sigterm_during_a_reload_mid_spend() -> Schedule:
    """Found by the swarm (seeds 8892, 3722, 4470, 9118): a config reload replaces the
    spender's refresher while its refresh token is on the wire (a 6 s server), and SIGTERM
    comes 1 s later. The reload waits for the old refresher's answer; the drain waited only
    for the refreshers the core still served, none, and the process exited without the
    answer, the only copy of the rotated set: the fleet waited for a person."""

    async def script(world: World) -> None:
        server = world.server
        server.faults.slow = 6.0
        await until(world, lambda: server.sends)
        spender = _index(world, server.sends[0][1])
        reloading = world.reload(spender)
        await world.time.sleep(1.0)
        world.terminate(spender)
        await reloading
        server.faults.slow = 0.0
        await world.time.sleep(20.0)
        world.start_replica(spender)

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_056,
        config=config,
        faults=(),
        duration=480.0,
        name="sigterm_during_a_reload_mid_spend",
        script=script,
        script_heals_by=120.0,
    )


def config_reload_under_two_clocks_behind() -> Schedule:
    """Found by the swarm (seed 6678): a pod whose own clock is 30 s behind, and right after a
    refresh the Redis host's clock steps back 40 s; the server is down, so no newer set
    replaces the token. The pod's monotonic guard, counted since it adopted the token, stops
    it serving at the true expiry; a config reload then replaced its refresher, which
    re-derived the deadline from the two wall clocks, both behind, and served the token past
    its expiry. The new refresher keeps the old one's deadline for the same token."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        server.faults.down = True
        world.store_clock.step = -40.0
        await world.time.sleep(40.0)  # the pod's fleet clock has taken the step by now
        await world.reload(0)
        await world.time.sleep(50.0)  # past the true expiry of the last token
        world.store_clock.step = 0.0
        server.faults.down = False

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[-30.0, 0.0])
    return Schedule(
        seed=20_057,
        config=config,
        faults=(),
        duration=480.0,
        name="config_reload_under_two_clocks_behind",
        script=script,
        script_heals_by=180.0,
    )


def spend_record_resolved_while_its_reader_looks() -> Schedule:
    """Found by the swarm (seed 7116): the store goes down right after it applied the
    spender's `mark_sent` (the answer lost: never sent). When it is back, a bystander's
    `begin_spend` meets the `sent` record, and the answer is slow (5 s); meanwhile the spender
    writes its abort, whose notice the bystander misses (its subscription is not back). The
    bystander then read the record's owner, found no record, and kept the spend as nobody's:
    it vetoed every later spend of the token with no one to lift it, and the fleet waited for
    a person. A record gone by then was resolved: it tries again."""

    async def script(world: World) -> None:
        spender_name = await _store_down_at_the_first_send(world)
        spender = _index(world, spender_name)
        bystander = world.replicas[(spender + 1) % len(world.replicas)]
        view = bystander.view
        original = view.begin_spend
        slowed: list[bool] = []

        async def slow_unknown(app: str, **kwargs: Any) -> SpendStart:
            result = await original(app, **kwargs)
            if result is SpendStart.UNKNOWN and not slowed:
                slowed.append(True)
                await world.time.sleep(5.0)  # the answer is slow; the abort lands meanwhile
            return result

        view.begin_spend = slow_unknown  # type: ignore[method-assign]
        await world.time.sleep(8.0)
        world.replicas[spender].view.faults.partitioned = True
        view.faults.lost_kinds = frozenset({"abort"})
        world.set_store_outage(False)
        await until(world, lambda: slowed, limit=60.0)
        world.replicas[spender].view.faults.partitioned = False
        await world.time.sleep(30.0)
        view.faults.lost_kinds = frozenset()

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_058,
        config=config,
        faults=(),
        duration=480.0,
        name="spend_record_resolved_while_its_reader_looks",
        script=script,
        script_heals_by=150.0,
    )


def record_owner_unread_in_a_flapping_store() -> Schedule:
    """Found by hand, beside swarm seed 7116 (`spend_record_resolved_while_its_reader_looks`):
    the store goes down right after it applied the spender's `mark_sent` (the answer lost:
    never sent). When it is back, a bystander's `begin_spend` meets the `sent` record, and
    the bystander is cut off from the store at once, before it reads whose record it is. The
    spender, back meanwhile, writes its abort, whose notice the cut-off bystander misses. The
    bystander kept the spend as nobody's (the read of its owner failed) and, back, vetoed
    every later spend of the token naming no spend: the fleet waited for a person with the
    grant intact (invariant 5). A record whose owner cannot be read is not remembered now:
    the bystander looks again once the store answers."""

    async def script(world: World) -> None:
        cut: list[int] = []
        spender = _index(world, await _store_down_at_the_first_send(world))
        for index, replica in enumerate(world.replicas):
            if index != spender:
                _cut_off_at_an_unknown_record(world, index, replica, cut)
        await world.time.sleep(8.0)
        world.replicas[spender].view.faults.partitioned = True
        world.set_store_outage(False)
        await until(world, lambda: cut, limit=60.0)
        await world.time.sleep(2.0)
        world.replicas[spender].view.faults.partitioned = False  # it writes its abort
        await world.time.sleep(4.0)
        world.replicas[cut[0]].view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_125,
        config=config,
        faults=(),
        duration=480.0,
        name="record_owner_unread_in_a_flapping_store",
        script=script,
        script_heals_by=150.0,
    )


def _cut_off_at_an_unknown_record(
    world: World, index: int, replica: Replica, cut: list[int]
) -> None:
    """Cut replica `index` off from the store as soon as its `begin_spend` answers UNKNOWN
    (the first replica's only: `cut` records it)."""
    view = replica.view
    original = view.begin_spend

    async def cut_off(app: str, **kwargs: Any) -> SpendStart:
        result = await original(app, **kwargs)
        if result is SpendStart.UNKNOWN and not cut:
            cut.append(index)
            view.faults.partitioned = True
            world.store.watch.poke()  # its subscription drops too
        return result

    view.begin_spend = cut_off  # type: ignore[method-assign]


def sigterm_with_an_abort_unwritten() -> Schedule:
    """Found by the swarm (seed 3349): the store goes down right after it applied the
    spender's `mark_sent` (the answer lost: the token is never sent, the abort cannot be
    written), and SIGTERM comes at that moment. The drain waited for nothing (no request on
    the wire, no set unstored) and the process exited with the abort unwritten: the `sent`
    record of a spend never sent stood for good, since only that process could end it, and
    the fleet waited for a person. The drain now writes the abort once the store is back. The
    new pod starts while the old one drains, as in a rolling deploy (seed 5510: the model
    then ended the outage only for the new incarnation, and the drain never saw the store)."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.set_store_outage(True)  # inside the round trip: the answer is lost
                world.terminate(_index(world, replica))

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        await world.time.sleep(1.0)
        world.start_replica(_index(world, hit[0]))  # the new pod, while the old one drains
        await world.time.sleep(2.0)
        world.set_store_outage(False)

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_059,
        config=config,
        faults=(),
        duration=480.0,
        name="sigterm_with_an_abort_unwritten",
        script=script,
        script_heals_by=120.0,
    )


def _fleet_clocks_right(world: World) -> bool:
    """Every live replica's fleet clock reads the store's clock (within a second)."""
    store_now = world.store_clock.time()
    return all(abs(r.refresher._clock.time() - store_now) < 1.0 for r in world.replicas if r.alive)


async def _refresh_now(world: World, replica: Replica) -> None:
    """A caller of `replica` forces a refresh (its upstream refused the token); wait until the
    store holds the new set."""
    rank = world.store.state.tokens[world.key].rank
    forced = asyncio.ensure_future(replica.refresher.force())
    await until(world, lambda: world.store.state.tokens[world.key].rank > rank)
    await asyncio.gather(forced, return_exceptions=True)


def set_stamped_while_a_jump_back_waits() -> Schedule:
    """Found by the swarm (seeds 5083; 2668 and 8952 were the next door): Redis's clock steps
    20 s ahead and every fleet clock takes the step; Redis's clock is put right, and each
    replica's next round sees the jump back and holds it for a round (5 s). A refresh inside
    those 5 s stamped the new set with the old, later frame: 20 s too late. The server is then
    down, so no newer set replaces it; a pod that starts once the fleet clocks are right again
    reads the set and, by both its clocks (right), served it 20 s past its true expiry (less
    what its lifetime from the read already cut off). A set is stamped in the earliest frame the fleet clock allows while a jump back waits."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        world.store_clock.step = 20.0
        await until(world, lambda: _fleet_clocks_right(world))
        world.store_clock.step = 0.0
        spender = world.replicas[0]
        clock = spender.refresher._clock
        assert isinstance(clock, FleetClock)
        await until(world, lambda: clock._estimator.held_anchor is not None)
        await _refresh_now(world, spender)
        server.faults.down = True
        await until(world, lambda: _fleet_clocks_right(world))
        # Later than the safety margin after the refresh: read at once, the set's lifetime
        # from the read (the other door's bound) ends it inside the margin.
        await world.time.sleep(20.0)
        await world.crash(1)
        world.start_replica(1)
        await world.time.sleep(90.0)  # past the true expiry of the last set
        server.faults.down = False

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_060,
        config=config,
        faults=(),
        duration=480.0,
        name="set_stamped_while_a_jump_back_waits",
        script=script,
        script_heals_by=240.0,
    )


def set_stamped_ahead_read_at_once() -> Schedule:
    """Found by the swarm (seeds 8952, 2668): a pod restarts while Redis's clock is 20 s ahead
    for a moment, and its first measuring round takes that frame (a first round is taken as
    it is); Redis's clock is right again a moment later, and the pod's next round is 30 s
    away. It refreshes now and stamps the set 20 s late; the bystander, whose clocks are
    right, reads it at once and served it 20 s past its true expiry (the server is down, so no
    newer set replaces it). A set read from the store lives at most its lifetime from then:
    it was issued before it was read, whatever the clock that stamped it said."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        world.store_clock.step = 20.0
        await world.crash(0)
        writer = world.start_replica(0)
        await until(world, lambda: writer.refresher.token is not None)
        world.store_clock.step = 0.0
        await _refresh_now(world, writer)
        server.faults.down = True
        await world.time.sleep(90.0)  # past the true expiry of the last set
        server.faults.down = False

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_061,
        config=config,
        faults=(),
        duration=480.0,
        name="set_stamped_ahead_read_at_once",
        script=script,
        script_heals_by=180.0,
    )


def _held_a_jump_back(replica: Replica) -> bool:
    """`replica`'s fleet clock holds a jump back of the store's clock (or took one)."""
    clock = replica.refresher._clock
    assert isinstance(clock, FleetClock)
    held, anchor = clock._estimator.held_anchor, clock._estimator.anchor
    return held is not None and anchor is not None and held < anchor


def pod_restarted_while_the_store_clock_is_back() -> Schedule:
    """Found by the swarm (seeds 4575, 8286, 27232): 20 s after a refresh Redis's clock steps
    back 20 s, and a pod restarts once a replica's round has seen the step; its own clock is
    25 s behind. Every clock it can read is behind, and the set it reads was stamped right (in
    the frame before the step): by all of them the token lives 20 s longer than it does. The
    server is down, so no newer set replaces it; the pod served it 20 s past its true expiry.
    The replica that lived through the step holds the right deadline on its monotonic clock:
    the round that holds the jump back lowers the stored expiry to it, in the new frame
    (`lower_expiry`), and the restarted pod reads that."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        server.faults.down = True
        await world.time.sleep(20.0)  # (later than a read that the lifetime bound would cut)
        world.store_clock.step = -20.0
        await until(world, lambda: _held_a_jump_back(world.replicas[0]))
        await world.time.sleep(1.0)
        await world.crash(1)
        world.start_replica(1)
        await world.time.sleep(90.0)  # past the true expiry of the last token
        world.store_clock.step = 0.0
        server.faults.down = False

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0, -25.0])
    return Schedule(
        seed=20_090,
        config=config,
        faults=(),
        duration=480.0,
        name="pod_restarted_while_the_store_clock_is_back",
        script=script,
        script_heals_by=180.0,
    )


def set_stamped_while_the_store_clock_was_ahead() -> Schedule:
    """Found by the swarm (seeds 13488, 19018; 16961 and 24067 are the same read of a set
    stamped by a fleet clock that had not followed Redis back yet): Redis's clock steps 20 s
    ahead and every fleet clock follows it; a refresh then stamps its set right, in that frame.
    Redis's clock is put right, the fleet clocks follow it back, and a pod restarts later: its
    clocks are right, and the set's stamp is 20 s late in the frame it reads it in. The
    server is down, so no newer set replaces it; the pod served it 20 s past its true expiry.
    Every replica that lived through the step back lowers the stored expiry to its own
    deadline in the new frame when its round holds the jump back (`lower_expiry`)."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        world.store_clock.step = 20.0
        await until(world, lambda: _fleet_clocks_right(world))
        await _refresh_now(world, world.replicas[0])
        server.faults.down = True
        await world.time.sleep(5.0)
        world.store_clock.step = 0.0
        await until(world, lambda: _fleet_clocks_right(world))
        await world.time.sleep(10.0)  # (later than a read that the lifetime bound would cut)
        await world.crash(1)
        world.start_replica(1)
        await world.time.sleep(90.0)  # past the true expiry of the last token
        server.faults.down = False

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_091,
        config=config,
        faults=(),
        duration=480.0,
        name="set_stamped_while_the_store_clock_was_ahead",
        script=script,
        script_heals_by=240.0,
    )


def set_stamped_ahead_its_writer_gone() -> Schedule:
    """Found by the swarm (seeds 2691, 5792, with the spread rounds): a pod restarts while
    Redis's clock is 20 s ahead for a moment, its first round takes that frame, and it
    refreshes once Redis's clock is right again, stamping the set 20 s late; it is killed
    before its next round could see the jump back. The bystander, whose clocks are right,
    reads the set at once and serves it by its lifetime from the read, but nobody lowers the
    stored expiry: a pod started 25 s later, when the set no longer looks issued in the
    future, served it 20 s past its true expiry (the server is down, so no newer set replaces
    it). A replica that reads a set issued in the future lowers the stored expiry to its own
    bound."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        world.store_clock.step = 20.0
        await world.crash(0)
        writer = world.start_replica(0)
        await until(world, lambda: writer.refresher.token is not None)
        world.store_clock.step = 0.0
        await _refresh_now(world, writer)
        server.faults.down = True
        await world.crash(0)  # (its next round is 15 s away at the soonest)
        await world.time.sleep(25.0)
        world.start_replica(0)
        await world.time.sleep(90.0)  # past the true expiry of the last set
        server.faults.down = False

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_120,
        config=config,
        faults=(),
        duration=480.0,
        name="set_stamped_ahead_its_writer_gone",
        script=script,
        script_heals_by=180.0,
    )


def set_stamped_by_a_frozen_spender_read_after_the_step() -> Schedule:
    """Found by the swarm (seed 4340, with the spread rounds): Redis's clock is 20 s ahead and
    both fleet clocks took the step; the spender sends its refresh token and is frozen 60 s as
    the server acts, and Redis's clock goes back. The bystander takes the step back meanwhile;
    the spender resumes and stores the new set stamped in the frame of its send, 20 s late,
    which the bystander reads at once: issued 40 s ago by its clock, nothing says it is late.
    The spender's round then sees the jump back and lowers the stored expiry, but the
    bystander kept its own deadline and served the set 20 s past its true expiry (the server is
    down, so no newer set replaces it). A replica whose look at the store finds the set it
    serves with an earlier expiry takes that expiry."""

    def took_the_step(replica: Replica, step: float) -> bool:
        clock = replica.refresher._clock
        assert isinstance(clock, FleetClock)
        return clock.settled and abs(clock.offset() - step) < 1.0

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        world.store_clock.step = 20.0
        await until(world, lambda: all(took_the_step(r, 20.0) for r in world.replicas))
        spender, bystander = world.replicas
        presented = len(server.presentations)
        forced = asyncio.ensure_future(spender.refresher.force())
        await until(world, lambda: len(server.presentations) > presented, limit=30.0)
        world.pause(0, 60.0)
        world.store_clock.step = 0.0
        await until(world, lambda: took_the_step(bystander, 0.0))
        rank = world.store.state.tokens[world.key].rank
        await until(world, lambda: world.store.state.tokens[world.key].rank > rank)
        server.faults.down = True
        await asyncio.gather(forced, return_exceptions=True)
        await world.time.sleep(360.0)  # past the true expiry of the last set
        server.faults.down = False

    config = WorldConfig(replicas=2, lifetime=300.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_121,
        config=config,
        faults=(),
        duration=1200.0,
        name="set_stamped_by_a_frozen_spender_read_after_the_step",
        script=script,
        script_heals_by=900.0,
    )


def step_between_two_rounds_under_a_restarted_pod() -> Schedule:
    """Found by the swarm (seeds 20791, 28259): Redis's clock steps back 15 s for 14 s, 6 s
    after a round of the fleet clocks, and a pod whose own clock is 25 s behind restarts 7 s
    into the step (the server is down, so no newer set replaces the stored one). A fleet that
    measures in lockstep (every replica started at 0, then every 30 s) has no round inside the
    step: nobody lowers the stored expiry, and the restarted pod, every clock of which is
    behind, served the set 15 s past its true expiry. Spread rounds (MEASURE_SPREAD) put some
    replica's round inside it, and that replica lowers the stored expiry (`lower_expiry`)."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        server.faults.down = True
        await world.time.sleep(20.0)  # (later than a read that the lifetime bound would cut)
        # 6 s after a multiple of 30 s: a lockstep fleet's rounds are at 0.0x, 30.0x, 60.0x ...
        await world.time.sleep(30.0 - world.time.now % 30.0 + 6.0)
        world.store_clock.step = -15.0
        await world.time.sleep(7.0)
        await world.crash(5)
        world.start_replica(5)
        await world.time.sleep(7.0)
        world.store_clock.step = 0.0
        await world.time.sleep(90.0)  # past the true expiry of the last token
        server.faults.down = False

    config = WorldConfig(replicas=6, lifetime=60.0, grace=0.0, offsets=[0.0] * 5 + [-25.0])
    return Schedule(
        seed=20_092,
        config=config,
        faults=(),
        duration=480.0,
        name="step_between_two_rounds_under_a_restarted_pod",
        script=script,
        script_heals_by=240.0,
    )


def step_seen_after_a_restarted_pod_read_the_stamp() -> Schedule:
    """Found by the swarm (seeds 68595, 80253): Redis's clock steps back 30 s, and a pod whose
    own clock is 35 s behind restarts at once, 12 s before the stored set's true expiry and
    before any replica's round saw the step: it measures the stepped clock and reads the set,
    stamped right, at face value (every clock it has says the set lives 30 s longer). The
    server is down, so no newer set replaces it. Another replica's round then sees the step
    and lowers the stored expiry (`lower_expiry`) before the true expiry, but the pod took the
    lower expiry only at its periodic look (MAX_SLEEP after its read), and served the set past
    its true expiry until then. A lowering is now announced (LOWERED), and the pod takes it
    at once."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        server.faults.down = True
        stored = world.store.state.tokens[world.key]
        # 12 s before the set's true expiry (the store's clock is right until now).
        await world.time.sleep(stored.expires_at - 12.0 - world.store_clock.time())
        world.store_clock.step = -30.0
        await world.crash(5)
        world.start_replica(5)
        await world.time.sleep(60.0)
        world.store_clock.step = 0.0
        await world.time.sleep(60.0)
        server.faults.down = False

    config = WorldConfig(replicas=6, lifetime=60.0, grace=0.0, offsets=[0.0] * 5 + [-35.0])
    return Schedule(
        seed=20_138,
        config=config,
        faults=(),
        duration=480.0,
        name="step_seen_after_a_restarted_pod_read_the_stamp",
        script=script,
        script_heals_by=240.0,
    )


def bound_evicted_with_the_set_written_back() -> Schedule:
    """Found by the swarm (seed 120513): Redis's clock steps back 20 s and the stored set is
    evicted at once. A pod whose own clock is 35 s behind restarts inside the step: it
    measures the stepped clock and finds no set. One replica's round sees the jump back and
    asks to lower the stored expiry, but the store holds no set; Redis's clock is put right,
    and that replica's next round drops the jump. Another replica, whose clock never left
    Redis's, writes the set back with its stamp in the frame before the step; the restarted
    pod reads it 20 s too long by every clock it has, and the server is down. A replica that
    asked for a bound now asks again when the store holds the set above it."""

    async def script(world: World) -> None:
        server = world.server
        await until(world, lambda: server.presentations)
        await until(world, lambda: world.store.state.tokens[world.key].rank > (1, 1))
        server.faults.down = True
        # Old enough that the restarted pod does not find it issued in the future (it would
        # serve it its lifetime from the read, and lower it: set_stamped_ahead_its_writer_gone),
        # and late enough that its next rounds (15 to 45 s, then 5 s to confirm) come after the
        # set's true expiry.
        await world.time.sleep(50.0)
        world.store_clock.step = -20.0
        world.evict_set()
        seer = world.replicas[0]
        clock = seer.refresher._clock
        assert isinstance(clock, FleetClock)
        # (a round of its own that falls inside the step: the swarm's rounds are spread)
        assert await clock.measure(seer.view) == "held"
        await world.time.sleep(1.0)
        await world.crash(2)
        world.start_replica(2)
        # Another replica's look finds no set and writes it back; the new pod reads it.
        world.replicas[1].refresher.notify_store_changed()
        await world.time.sleep(1.0)
        world.store_clock.step = 0.0
        assert await clock.measure(seer.view) == "smoothed"  # (the jump is dropped)
        await world.time.sleep(120.0)  # past the true expiry of the set
        server.faults.down = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0, 0.0, -35.0])
    return Schedule(
        seed=20_146,
        config=config,
        faults=(),
        duration=480.0,
        name="bound_evicted_with_the_set_written_back",
        script=script,
        script_heals_by=240.0,
    )


def rollback_erases_a_sent_record_with_its_spender_awake() -> Schedule:
    """Found by the swarm (seed 5310): a strict server rotates a refresh token and answers 500
    (the outcome is unknown), and the store is rolled back, at the moment the token is marked
    sent, to before the spend: the `sent` record and the lease are gone, the set is as it
    was (nothing to write back, nothing to show that the store forgot), and every
    subscription drops. The spender, awake and alive, re-subscribes after its backoff; a
    bystander whose command connection works takes the lease at once and spends the token
    after a short objection window, before the spender is back to veto (here 3 s): the grant
    is revoked. A dropped subscription is now evidence that the store may have forgotten:
    spends wait the long objection window, and the spender vetoes."""

    async def script(world: World) -> None:
        server = world.server
        # The server is down until 10 s before the token expires: every replica is due and
        # tries the lease, and the objection window is short (the token is nearly spent).
        server.faults.down = True
        await world.time.sleep(50.0)
        server.faults.down = False
        server.faults.error_after_acting = 500
        before: list[MemoryState] = []
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "announcing" and not before:
                before.append(world.store.snapshot())  # the lease held, no spend record yet
            elif phase == "sent" and before and not hit:
                hit.append(replica)
                world.roll_back(before[0])

        server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        # Once the spender has ended its spend (unknown) and released the lease, its
        # reconnect takes 3 s (its backoff, a slow network), the others' 0.5 s.
        await until(world, lambda: world.key not in world.store.state.leases, limit=20.0)
        spender = world.replicas[_index(world, hit[0])]
        spender.view.faults.partitioned = True
        await world.time.sleep(3.0)
        spender.view.faults.partitioned = False
        server.faults.error_after_acting = None

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_062,
        config=config,
        faults=(),
        duration=480.0,
        name="rollback_erases_a_sent_record_with_its_spender_awake",
        script=script,
        script_heals_by=120.0,
    )


def veto_for_a_spend_its_drained_spender_aborted() -> Schedule:
    """Found by the swarm (seed 5510): the store goes down right after it applied the
    spender's `mark_sent` (the answer lost: the token is never sent), and SIGTERM comes at that
    moment; the new pod starts while the old one drains. When the store is back, a bystander
    meets the `sent` record and learns its spender and fence; the drain then writes the abort,
    whose notice the bystander misses (its subscription is not back yet), and exits. The new
    pod spends the token, and the bystander vetoes that spend for the aborted one: a veto
    only that spend's spender could lift, and it is gone, so the fleet waited for a person.
    The store now refuses a veto that stands for the very spend its spender last aborted."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.set_store_outage(True)  # inside the round trip: the answer is lost
                world.terminate(_index(world, replica))

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        spender = _index(world, hit[0])
        bystanders = [r for i, r in enumerate(world.replicas) if i != spender]
        for bystander in bystanders:
            bystander.view.faults.lost_kinds = frozenset({"abort"})
        await world.time.sleep(1.0)
        world.start_replica(spender)  # the new pod, while the old one drains
        # Back past the token's expiry: every replica is due and meets the record at once.
        await world.time.sleep(30.0)
        world.set_store_outage(False)
        await world.time.sleep(30.0)
        for bystander in bystanders:
            bystander.view.faults.lost_kinds = frozenset()

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_063,
        config=config,
        faults=(),
        duration=480.0,
        name="veto_for_a_spend_its_drained_spender_aborted",
        script=script,
        script_heals_by=120.0,
    )


def veto_judged_before_the_spenders_abort() -> Schedule:
    """Found by the swarm (seeds 11103, 11700, 13712, 16670, 16908): the store goes down right
    after it applied the spender's `mark_sent` (the answer lost: never sent); the spender is
    back a little later than the others. A bystander meets the `sent` record, and while it
    reads the record again (is this its spender's own next spend?) the spender writes its
    abort and the third replica announces a spend of the token. The bystander had judged
    "remembered" before that read, and its memory was cleared by the abort notice during it:
    the veto went out naming no spend (`protects` None), which no abort can lift, and every
    replica waited for a person. Here the new spend is the spender's own (in the seeds it was
    the third replica's): the bystander forgave it on its notice, during the read, and vetoed
    it after. A veto is judged again right before it is sent."""

    async def script(world: World) -> None:
        spender_name = await _store_down_at_the_first_send(world)
        spender = _index(world, spender_name)
        owner = world.replicas[spender].name
        held: list[str] = []
        reads: dict[str, int] = {}

        def respent() -> bool:
            """The spender's abort is written and a spend of the token is announced anew."""
            record = world.store.state.spends.get(world.key)
            return record is not None and record.state == "announced"

        for bystander in world.replicas:
            if bystander is world.replicas[spender]:
                continue
            view = bystander.view
            original = view.load_spend

            async def slow_read(
                app: str,
                *,
                _name: str = bystander.name,
                _original: Callable[[str], Awaitable[SpendRecord | None]] = original,
            ) -> SpendRecord | None:
                record = await _original(app)
                if record is None or record.owner != owner or record.state != "sent" or held:
                    return record
                reads[_name] = reads.get(_name, 0) + 1
                if reads[_name] < 2:
                    return record  # its first read learns the owner; the second one is held
                held.append(_name)
                # The read answers after the spender's abort and the next spend: a slow hop.
                with contextlib.suppress(TimeoutError):
                    await until(world, respent, limit=20.0)
                return record

            view.load_spend = slow_read  # type: ignore[method-assign]
        await world.time.sleep(8.0)
        world.replicas[spender].view.faults.partitioned = True
        world.set_store_outage(False)
        await until(world, lambda: held, limit=60.0)
        world.replicas[spender].view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_064,
        config=config,
        faults=(),
        duration=480.0,
        name="veto_judged_before_the_spenders_abort",
        script=script,
        script_heals_by=120.0,
    )


def spenders_veto_lifted_by_its_abort() -> Schedule:
    """Found by the swarm (seeds 19564, 23720, 25049): C1's case (a slow server, a replaced
    pod, Redis restarting empty with the token on the wire), but the slow answer is a 429:
    the server did not act. The spender rightly vetoed the new pod's spend of its token on
    the wire; its veto named no spend, so its abort of the spend (not acted on) could not
    lift it, and the fleet waited for a person with the grant intact. The veto names the
    spend on the wire: the spender's abort lifts it, and the fleet refreshes again."""

    async def script(world: World) -> None:
        world.server.faults.slow = 9.0
        await until(world, lambda: world.server.sends)
        world.server.faults.status, world.server.faults.retry_after = 429, 1.0
        spender = _index(world, world.server.sends[0][1])
        replaced = (spender + 1) % 2
        await world.crash(replaced)
        world.start_replica(replaced)
        await until(world, lambda: world.replicas[replaced].refresher.token is not None)
        world.empty_restart()
        world.replicas[spender].view.faults.partitioned = True
        await world.time.sleep(3.0)
        world.replicas[spender].view.faults.partitioned = False
        await world.time.sleep(10.0)  # past the 429, answered ~9 s after the send
        world.server.faults.status, world.server.faults.retry_after = None, None
        world.server.faults.slow = 0.0

    config = WorldConfig(replicas=2, lifetime=60.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_065,
        config=config,
        faults=(),
        duration=480.0,
        name="spenders_veto_lifted_by_its_abort",
        script=script,
        script_heals_by=120.0,
    )


def _sigterm_at_mark_sent_in_an_outage(seed: int, name: str, outage: float) -> Schedule:
    """Swarm seed 27342's case, scripted: the store goes down for `outage` seconds right
    after it applied the spender's `mark_sent` (the answer lost: the token is never sent),
    and SIGTERM comes at that moment; the new pod starts while the old one drains, as in a
    rolling deploy. The drain retries the abort until its bound, 137.5 s (the lease plus the
    read timeout): an outage that ends inside it costs nothing (20_059's fix), one that
    outlasts it leaves the `sent` record for a spend nobody can end."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.set_store_outage(True)  # inside the round trip: the answer is lost
                world.terminate(_index(world, replica))

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        await world.time.sleep(1.0)
        world.start_replica(_index(world, hit[0]))  # the new pod, while the old one drains
        await world.time.sleep(outage - 1.0)
        world.set_store_outage(False)

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=seed,
        config=config,
        faults=(),
        duration=720.0,
        name=name,
        script=script,
        script_heals_by=240.0,
    )


def sigterm_in_an_outage_past_the_drain() -> Schedule:
    """The documented limit of a drain (swarm seed 27342): the outage lasts 140 s, past the
    drain's 137.5 s bound. The process must exit with its abort unwritten; the store, back
    2.5 s later, holds a `sent` record that no replica can tell from a request on the wire.
    The fleet announces `grant.outcome_unknown` and waits for a person, the grant intact;
    the checker counts this apart (`_stranded_by_drain`)."""
    return _sigterm_at_mark_sent_in_an_outage(20_100, "sigterm_in_an_outage_past_the_drain", 140.0)


def sigterm_in_an_outage_inside_the_drain() -> Schedule:
    """Its neighbour: the same outage, 130 s, inside the drain's bound. The drain writes the
    abort once the store is back, and the fleet serves again; nothing is excused."""
    return _sigterm_at_mark_sent_in_an_outage(
        20_101, "sigterm_in_an_outage_inside_the_drain", 130.0
    )


def _failover(world: World, before: MemoryState) -> None:
    """A failover to a replica that missed every write since `before`, or since the last one
    a replica acknowledged (`WAIT`): connections drop."""
    world.store.fail_over(before)
    world.restarts[0] += 1


def failover_loses_a_commit_after_its_writer_exited() -> Schedule:
    """Found by the swarm (seeds 21255, 21685, 27519): the spender's `sent` record is
    acknowledged (WAIT), a failover comes as the server rotates (it keeps the record, and drops
    every subscription), and SIGTERM comes as the server acts. The answer is committed on the
    promoted primary while the bystanders re-subscribe (they miss its notice), the drain sees
    it stored and the process exits; a second failover then loses the commit, which no replica
    had acknowledged. The fleet held only the `sent` record, which nobody could resolve: the
    grant was lost with the grant intact on the server (invariants 3 and 5). A commit is now
    WAITed for as `mark_sent` is, and a failover keeps it."""

    async def script(world: World) -> None:
        before = world.store.snapshot()  # before any spend
        key = world.key
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "acted" and not hit:
                hit.append(replica)
                _failover(world, before)  # keeps the acknowledged `sent` record
                world.terminate(_index(world, replica))

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        rank = before.tokens[key].rank
        await until(world, lambda: key in world.store.state.tokens, limit=5.0)
        await until(world, lambda: world.store.state.tokens[key].rank > rank, limit=5.0)
        await until(world, lambda: all(task.done() for task in world.draining), limit=5.0)
        _failover(world, before)  # before the bystanders are back (0.5 s): nobody heard it
        await world.time.sleep(30.0)
        world.start_replica(_index(world, hit[0]))

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_080,
        config=config,
        faults=(),
        duration=480.0,
        name="failover_loses_a_commit_after_its_writer_exited",
        script=script,
        script_heals_by=120.0,
    )


def failover_loses_an_abort_after_its_spender_exited() -> Schedule:
    """Found by the swarm (seed 23291): the server refuses a refresh without acting (429), the
    spender ends the spend as aborted and gets SIGTERM; its drain writes the abort again and
    the process exits. A failover then promotes a replica that holds the acknowledged `sent`
    record but not the abort, which no one waited for: only the exited spender could end that
    record, and every replica, the restarted pod too, met the token as unknown and waited for
    a person with the grant intact (invariant 5). An abort is now WAITed for, and a failover
    keeps it."""

    async def script(world: World) -> None:
        server, key = world.server, world.key
        before = world.store.snapshot()
        server.faults.status, server.faults.retry_after = 429, 1.0
        await until(world, lambda: server.sends)
        spender = _index(world, server.sends[0][1])
        await until(world, lambda: key not in world.store.state.spends, limit=5.0)
        server.faults.status, server.faults.retry_after = None, None
        world.terminate(spender)
        await until(world, lambda: all(task.done() for task in world.draining), limit=5.0)
        _failover(world, before)
        await world.time.sleep(20.0)
        world.start_replica(spender)

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_081,
        config=config,
        faults=(),
        duration=480.0,
        name="failover_loses_an_abort_after_its_spender_exited",
        script=script,
        script_heals_by=120.0,
    )


def sigterm_drain_waits_for_a_replica_to_hold_the_commit() -> Schedule:
    """The drain's part of the fix of seeds 21255, 21685, 27519: the primary's replicas
    acknowledge nothing from the moment the server acts (they are down) until 3 s later, and
    SIGTERM comes as the server acts. The `sent` record was acknowledged, the commit is not;
    the bystanders are cut off from the store from the send until after a failover 4 s after
    the answer (a partition: they never hear the commit's notice). The drain now asks again (a
    repeated commit, `WAIT`) until a replica holds the set, then exits, and the failover keeps
    it. A drain that exits once the commit is stored on the primary leaves the only copy
    there, and the failover loses it (invariants 3 and 5)."""

    async def script(world: World) -> None:
        before = world.store.snapshot()
        store = world.store
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                for other in world.replicas:
                    if other.name != replica:
                        other.view.faults.partitioned = True
            elif phase == "acted" and len(hit) == 1 and replica == hit[0]:
                hit.append(replica)
                store.replicas_acknowledge = False
                world.terminate(_index(world, replica))

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: len(hit) == 2)
        await world.time.sleep(3.0)
        store.replicas_acknowledge = True
        await world.time.sleep(1.0)
        _failover(world, before)
        for other in world.replicas:
            other.view.faults.partitioned = False
        await world.time.sleep(30.0)
        world.start_replica(_index(world, hit[0]))

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_082,
        config=config,
        faults=(),
        duration=480.0,
        name="sigterm_drain_waits_for_a_replica_to_hold_the_commit",
        script=script,
        script_heals_by=120.0,
    )


def _set_evicted(
    *, writer_exits: bool, erase: Literal["evict", "restore", "restart"] = "evict"
) -> Schedule:
    """Swarm seed 24380, scripted: Redis restarts empty as the server rotates (the `sent`
    record is gone, every subscription drops: the bystanders, which heard the `sent` notice,
    miss the commit's), the spender commits the answer into the empty store, and the store
    then evicts the set (a maxmemory policy other than `noeviction`). `writer_exits`: SIGTERM
    came as the server acted, and the drain has ended (the set was stored) when the eviction
    comes; otherwise the spender runs on and writes its set back at its next look. `erase`:
    how the store loses the set: an eviction; a restore of the store from a snapshot taken
    as the spend was announced (swarm seed 52433); or a second empty restart (swarm seed
    118156, where it came 44 ms after the drain ended)."""

    async def script(world: World) -> None:
        key = world.key
        rank = world.store.state.tokens[key].rank
        hit: list[str] = []
        before: list[MemoryState] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "announcing" and not before:
                before.append(world.store.snapshot())
            elif phase == "acted" and not hit:
                hit.append(replica)
                world.empty_restart()
                if writer_exits:
                    world.terminate(_index(world, replica))

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        stored = world.store.state.tokens
        await until(world, lambda: key in stored and stored[key].rank > rank, limit=5.0)
        await until(world, lambda: all(task.done() for task in world.draining), limit=5.0)
        # Before the bystanders are back (0.5 s): nobody else has it.
        if erase == "restore":
            world.roll_back(before[0])
        elif erase == "restart":
            world.empty_restart()
        else:
            world.evict_set()
        if writer_exits:
            await world.time.sleep(30.0)
            world.start_replica(_index(world, hit[0]))

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    erased = {"evict": "evicted", "restore": "rolled_back", "restart": "lost_in_an_empty_restart"}
    name = (
        f"set_{erased[erase]}_after_its_writer_exited"
        if writer_exits
        else f"set_{erased[erase]}_under_its_writer"
    )
    seeds = {
        ("evict", True): 20_083,
        ("evict", False): 20_084,
        ("restore", True): 20_133,
        ("restore", False): 20_134,
        ("restart", True): 20_142,
        ("restart", False): 20_143,
    }
    return Schedule(
        seed=seeds[(erase, writer_exits)],
        config=config,
        faults=(),
        duration=480.0,
        name=name,
        script=script,
        script_heals_by=120.0,
    )


def set_evicted_after_its_writer_exited() -> Schedule:
    """The documented limit, not a door (swarm seed 24380): the store evicts the newest set
    after its writer's drain stored it and the process exited, while the bystanders were
    re-subscribing after an empty restart. Nobody holds the server's newest refresh token: the
    grant is lost, announced (`grant.outcome_unknown`), and counted apart; no WAIT keeps a key
    that an eviction removes from the primary and its replicas alike, and
    `maxmemory-policy noeviction` (docs/operations.md) rules it out."""
    return _set_evicted(writer_exits=True)


def set_evicted_under_its_writer() -> Schedule:
    """The same eviction while the writer runs on: it writes its set back at its next look,
    so nothing is lost and nothing is excused."""
    return _set_evicted(writer_exits=False)


def _set_evicted_unheard(*, one_heard: bool) -> Schedule:
    """Swarm seed 72057, scripted: the bystanders miss the `sent` and `token` notices of a
    spend (in the seed a failover at that moment had every subscription re-subscribing),
    SIGTERM comes as the server acts, the drain commits the answer and exits, and the store
    then evicts the set. The commit resolved the `sent` record: the store holds nothing that
    says the token was spent, and nobody that can speak knows. A bystander writes its set,
    the one before, back (the long objection window follows) and spends its refresh token
    again. `one_heard`: one bystander heard the `sent` notice (it vetoes that spend)."""

    async def script(world: World) -> None:
        key = world.key
        rank = world.store.state.tokens[key].rank
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "announced" and not hit:
                hit.append(replica)
                spender = _index(world, replica)
                world.terminate_mid_spend(spender)
                for index, bystander in enumerate(world.replicas):
                    heard = one_heard and index == (spender + 1) % len(world.replicas)
                    if index != spender:
                        lost = {"token", "release", "lease"} | (set() if heard else {"sent"})
                        bystander.view.faults.lost_kinds = frozenset(lost)

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        stored = world.store.state.tokens
        await until(world, lambda: key in stored and stored[key].rank > rank, limit=30.0)
        await until(world, lambda: all(task.done() for task in world.draining), limit=5.0)
        world.evict_set()  # nobody else read it
        for replica in world.replicas:
            replica.view.faults.lost_kinds = frozenset()
        await world.time.sleep(30.0)
        world.start_replica(_index(world, hit[0]))

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    name = (
        "set_evicted_one_heard_of_its_spend" if one_heard else "set_evicted_none_heard_of_its_spend"
    )
    return Schedule(
        seed=20_141 if one_heard else 20_140,
        config=config,
        faults=(),
        duration=480.0,
        name=name,
        script=script,
        script_heals_by=120.0,
    )


def set_evicted_none_heard_of_its_spend() -> Schedule:
    """The documented limit, not a door (swarm seed 72057): the store evicts the newest set
    after its writer's drain stored it and exited, and no bystander heard of the spend that
    made it (its commit resolved the `sent` record). A bystander spends the refresh token
    before it again: revoked, announced (`grant.reuse_detected`), counted apart as a
    forgotten `sent` record is; `maxmemory-policy noeviction` rules it out."""
    return _set_evicted_unheard(one_heard=False)


def set_evicted_one_heard_of_its_spend() -> Schedule:
    """The same with one bystander that heard the `sent` notice: it vetoes the second spend,
    and the grant is lost, not revoked (as in seed 24380); without its veto the revocation is
    a failure, not excused."""
    return _set_evicted_unheard(one_heard=True)


def set_rolled_back_after_its_writer_exited() -> Schedule:
    """The same documented limit through a restore (swarm seed 52433, where the writer had
    crashed 32 ms before): a restore from a snapshot taken as the spend was announced erases
    the newest set after its writer's drain stored it and exited. Counted apart as the
    eviction is: a restore loses acknowledged writes on every node."""
    return _set_evicted(writer_exits=True, erase="restore")


def set_rolled_back_under_its_writer() -> Schedule:
    """The same restore while the writer runs on: it writes its set back, nothing is lost
    and nothing is excused."""
    return _set_evicted(writer_exits=False, erase="restore")


def set_lost_in_an_empty_restart_after_its_writer_exited() -> Schedule:
    """The same documented limit through a second empty restart (swarm seed 118156, 44 ms
    after the writer's drain ended): it erases the newest set after its writer's drain
    stored it and exited, while the bystanders were re-subscribing after the first. Counted
    apart as the eviction is: an empty restart loses acknowledged writes on every node."""
    return _set_evicted(writer_exits=True, erase="restart")


def set_lost_in_an_empty_restart_under_its_writer() -> Schedule:
    """The same second empty restart while the writer runs on: it writes its set back when
    its subscription is back, nothing is lost and nothing is excused."""
    return _set_evicted(writer_exits=False, erase="restart")


def abort_after_the_store_forgot_the_record() -> Schedule:
    """Found by the swarm (seeds 12554, 27015, 28726): Redis restarts empty (or evicts the
    record) the moment the spender marks its token sent, and SIGTERM comes then too; the server
    answers 429 (it did not act), so the drain ends the spend as aborted and exits. The store
    holds no record any more: the abort changed nothing and announced nothing. The bystanders
    heard the `sent` notice, so when a new pod spends the token, they veto that spend for the
    aborted one, naming its spender but no fence (a notice named none): a veto only that
    spender could lift, and it has exited, so the fleet waited for a person. The `sent` notice
    now names the fence, and an abort that finds no record is still kept (and announced): the
    store refuses a veto that stands for exactly that aborted spend."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.server.faults.slow = 2.0
                world.server.faults.status, world.server.faults.retry_after = 429, 1.0

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        spender = _index(world, hit[0])
        await world.time.sleep(0.1)  # the bystanders heard the `sent` notice
        bystanders = [r for i, r in enumerate(world.replicas) if i != spender]
        for bystander in bystanders:
            # Not subscribed again yet when the abort comes (in the seeds it came 67 ms after
            # the restart).
            bystander.view.faults.lost_kinds = frozenset({"abort"})
        world.empty_restart()
        world.terminate(spender)
        await world.time.sleep(3.0)  # the 429 came, the drain ended the spend and exited
        world.server.faults.status, world.server.faults.retry_after = None, None
        world.server.faults.slow = 0.0
        for bystander in bystanders:
            bystander.view.faults.lost_kinds = frozenset()
        world.start_replica(spender)  # the new pod: it never heard the `sent` notice

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_070,
        config=config,
        faults=(),
        duration=480.0,
        name="abort_after_the_store_forgot_the_record",
        script=script,
        script_heals_by=120.0,
    )


def restored_record_named_for_its_first_spender() -> Schedule:
    """Found by the swarm (seed 10135, with a split brain): on a grace server (30 s) the store
    goes down right after it applied the spender's `mark_sent` (the answer lost: the token is
    never sent), and the spender stays cut off a while. A bystander takes the lease once the
    store is back and gets the one grace retry of that `sent` record; the server refuses it
    (429), and the store restores the record of the unknown spend, under fence 0 and the
    retrier's name. Meeting it, the retrier took it for its own record and remembered the
    spend as nobody's, the other bystander as the retrier's: when the spender came back and
    ended its spend (the record went), both missed the abort notice and vetoed the spender's
    next spend of the token, a veto nobody could lift. The record names the spend it stands
    for (`SpendRecord.orig_owner`, `orig_fence`), and a replica remembers it as that spend."""

    async def script(world: World) -> None:
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase != "sent":
                return
            hit.append(replica)
            if len(hit) == 1:
                world.set_store_outage(True)  # inside the round trip: the answer is lost
                world.replicas[_index(world, replica)].view.faults.partitioned = True
            elif len(hit) == 2:
                world.server.faults.status, world.server.faults.retry_after = 429, 1.0

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        spender = _index(world, hit[0])
        await world.time.sleep(2.0)
        world.set_store_outage(False)
        await until(world, lambda: len(hit) > 1, limit=60.0)  # the grace retry
        await world.time.sleep(1.0)
        world.server.faults.status, world.server.faults.retry_after = None, None
        await world.time.sleep(20.0)  # both bystanders meet the restored record
        bystanders = [r for i, r in enumerate(world.replicas) if i != spender]
        for bystander in bystanders:
            bystander.view.faults.lost_kinds = frozenset({"abort"})
        world.replicas[spender].view.faults.partitioned = False
        await world.time.sleep(10.0)
        for bystander in bystanders:
            bystander.view.faults.lost_kinds = frozenset()

    config = WorldConfig(replicas=3, lifetime=60.0, grace=30.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_071,
        config=config,
        faults=(),
        duration=480.0,
        name="restored_record_named_for_its_first_spender",
        script=script,
        script_heals_by=120.0,
    )


def split_brain_answers_a_drained_abort_with_another_spend() -> Schedule:
    """Found by the swarm (seed 25279): the server refuses a refresh without acting (429) as a
    split brain leaves the spender and a bystander on the old primary, which no replica
    acknowledges; SIGTERM comes at once. The spender's abort is applied there and is not
    acknowledged (NotDurable), so its drain asks again; meanwhile the bystander finds no
    record on the old primary and begins a spend of its own (its `sent` is not acknowledged
    either: it never sends). Asked again, the old primary answered "that record is another
    spend's" without WAIT, and the drain took it as settled and exited. On the promoted side
    the third replica's grace retry, refused too, restored the spender's record as unknown;
    the heal discarded the abort and the fleet waited for a person with the grant intact
    (invariant 5). Now every abort's answer waits for a replica, and the drain waits for the
    abort as for a commit: after the heal it lifts the restored record."""

    async def script(world: World) -> None:
        server, key = world.server, world.key
        server.faults.status, server.faults.retry_after = 429, 1.0
        await until(world, lambda: server.sends)
        spender = _index(world, server.sends[0][1])
        owner = world.replicas[spender].refresher.fleet.owner
        bystander = next(i for i in range(len(world.replicas)) if i != spender)
        world.split_brain([spender, bystander])
        old = world.stale_primary
        assert old is not None
        await world.time.sleep(0.2)
        world.terminate(spender)

        def other_spend_on_the_old_side() -> bool:
            spend = old.state.spends.get(key)
            return spend is not None and spend.owner != owner

        await until(world, other_spend_on_the_old_side, limit=60.0)
        await world.time.sleep(10.0)  # the promoted side's grace retry was refused as well
        server.faults.status, server.faults.retry_after = None, None
        world.heal_split_brain()

    config = WorldConfig(replicas=3, lifetime=60.0, grace=30.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_110,
        config=config,
        faults=(),
        duration=480.0,
        name="split_brain_answers_a_drained_abort_with_another_spend",
        script=script,
        script_heals_by=150.0,
    )


def retry_aborted_after_both_sends_heard() -> Schedule:
    """Found by hand after swarm seed 30624 (which it generalises): the server refuses
    refreshes with 429 and answers the first one 0.5 s late. A split brain 10 ms after it is
    sent leaves both bystanders on the old primary, having heard its `sent` notice; the
    spender's abort lands on the promoted side only. On the old side a bystander takes the
    one grace retry, whose `sent` is not acknowledged (no replica there), so it aborts and
    restores the unknown record. The other bystander heard two replicas send the token and
    remembered it as nobody's spend: the retry's abort did not re-point it (only a memory of
    the retrier's spend was), so after the heal it vetoed every spend, naming none, and the
    fleet waited for a person with the grant intact (invariant 5). It now keeps every
    sender it heard, and when the others were just the retrier and the spender retried, the
    retry's abort leaves it that spender's spend, which its abort lifts. (Which bystander
    retries, and when, follows the seed: of seeds 20120..20131, 20120 and 20124 open the door
    on the old code.)"""

    async def script(world: World) -> None:
        server = world.server
        server.faults.status, server.faults.retry_after = 429, 1.0
        server.faults.stall_next = 0.5
        await until(world, lambda: server.sends)
        spender = _index(world, server.sends[0][1])
        await world.time.sleep(0.01)  # both bystanders heard the `sent` notice
        world.split_brain([i for i in range(len(world.replicas)) if i != spender])
        await world.time.sleep(25.0)  # the grace retry on the old side, never sent
        server.faults.status, server.faults.retry_after = None, None
        await world.time.sleep(10.0)
        world.heal_split_brain()

    config = WorldConfig(replicas=3, lifetime=60.0, grace=30.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_124,
        config=config,
        faults=(),
        duration=480.0,
        name="retry_aborted_after_both_sends_heard",
        script=script,
        script_heals_by=150.0,
    )


def fence_repeated_after_its_counter_was_evicted() -> Schedule:
    """Found in swarm seed 56916 (an eviction, an outage and SIGTERM at one send): the store
    evicts the app's fence counter while the first spend (fence 1) is on the wire to a slow
    server, and the spender is cut off from the store meanwhile, so it cannot veto. The other
    replica missed the `sent` notice; once the spender's lease lapses it gets fence 1 again,
    and its `begin_spend`, which compared only the fence, took the spender's `sent` record for
    its own and replaced it: it spent the token a second time and the grant was revoked
    (invariants 1 and 3; in the seed a bystander's veto stopped the second spend, and then
    nobody could lift that veto). A record under the caller's fence that another owner made
    is another spend's now: the second replica meets it as unknown and waits for the
    spender's answer, written back once the spender is back."""

    async def script(world: World) -> None:
        for replica in world.replicas:
            replica.view.faults.lost_kinds = frozenset({"sent"})
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                world.server.faults.slow = 30.0  # past the lease: a slow answer, not lost

        world.server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        spender = world.replicas[_index(world, hit[0])]
        spender.view.faults.partitioned = True
        world.store.state.fences.pop(world.key, None)  # evicted: the next grant is fence 1
        await world.time.sleep(45.0)
        world.server.faults.slow = 0.0
        spender.view.faults.partitioned = False
        for replica in world.replicas:
            replica.view.faults.lost_kinds = frozenset()

    config = WorldConfig(replicas=2, lifetime=120.0, grace=0.0, offsets=[0.0] * 2)
    return Schedule(
        seed=20_131,
        config=config,
        faults=(),
        duration=600.0,
        name="fence_repeated_after_its_counter_was_evicted",
        script=script,
        script_heals_by=120.0,
    )


def abort_after_another_spend_replaced_the_forgotten_record() -> Schedule:
    """Found by reading, beside swarm seed 56916: the store goes down as it applies the
    spender's `mark_sent` (the answer lost: never sent) and SIGTERM comes. When the store is
    back a bystander meets the `sent` record and reads whose it is; the store then evicts the
    record, and a replica that knew nothing (cut off meanwhile) begins a spend of the token.
    The drained spender's abort finds that spend's record: it kept nothing. The bystander,
    cut off when that spend was announced, vetoes it on its re-sync in the spender's name,
    and the store takes the veto; only the spender could lift it, and it has exited: the
    fleet waited for a person, the grant intact. An abort that finds another spend's record
    is kept now (unannounced), and the store refuses that veto."""

    async def script(world: World) -> None:
        spender = _index(world, await _store_down_at_the_first_send(world))
        others = [i for i in range(len(world.replicas)) if i != spender]
        knows, fresh = others
        fp = world.store.state.spends[world.key].refresh_fp
        world.replicas[spender].view.faults.partitioned = True
        world.replicas[fresh].view.faults.partitioned = True
        world.terminate(spender)
        await world.time.sleep(8.0)
        world.set_store_outage(False)
        await until(
            world, lambda: fp in world.replicas[knows].refresher.fleet.memory.foreign, limit=60.0
        )
        world.replicas[knows].view.faults.partitioned = True
        world.store.state.spends.pop(world.key, None)  # evicted
        world.replicas[fresh].view.faults.partitioned = False
        await until(
            world,
            lambda: (
                world.store.state.spends.get(world.key) is not None
                and world.store.state.spends[world.key].owner == world.replicas[fresh].name
            ),
            limit=60.0,
        )
        world.replicas[spender].view.faults.partitioned = False  # its drain writes the abort
        await world.time.sleep(1.0)
        world.replicas[knows].view.faults.partitioned = False

    config = WorldConfig(replicas=3, lifetime=120.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_136,
        config=config,
        faults=(),
        duration=600.0,
        name="abort_after_another_spend_replaced_the_forgotten_record",
        script=script,
        script_heals_by=150.0,
    )


def own_spend_retried_then_aborted() -> Schedule:
    """Swarm seeds 72135 and 62442, made small: on a 30 s grace server the spender freezes
    the moment its token is marked sent (a GC pause, before the request leaves) and the
    server goes down. Past the spender's lease a bystander takes the one grace retry, which
    the down server refuses, so it aborts and restores the unknown record, naming the
    spender's spend. The spender wakes, ends its spend as aborted (its lease ran out: never
    sent), and only then reads the retry's `sent` and abort notices. It remembered its own
    spend as another replica's, under its own name: no abort notice of its own reaches it, so
    it vetoed every other replica's spend of the token. A config reload then carried that
    memory to a refresher of another owner name, which no longer counts that name's spends
    as its own, and the fleet waited for a person with the grant intact (invariant 5). The
    spend retried is the spender's own now: what became of it is in its own memory."""

    async def script(world: World) -> None:
        server = world.server
        hit: list[str] = []

        def on_phase(phase: str, replica: str) -> None:
            if phase == "sent" and not hit:
                hit.append(replica)
                server.faults.down = True
                world.pause(_index(world, replica), 20.0)

        server.phases.listeners.append(on_phase)
        await until(world, lambda: hit)
        spender = _index(world, hit[0])
        await world.time.sleep(21.0)  # it woke, aborted, and read the retry's notices
        state = world.store.state
        # Between two of its spends (each ends without effect: the server is down).
        await until(world, lambda: world.key not in state.spends and world.key not in state.leases)
        world.reload(spender)
        await world.time.sleep(10.0)
        server.faults.down = False

    config = WorldConfig(replicas=3, lifetime=120.0, grace=30.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_126,
        config=config,
        faults=(),
        duration=480.0,
        name="own_spend_retried_then_aborted",
        script=script,
        script_heals_by=150.0,
    )


DOORS: dict[str, Callable[[], Schedule]] = {
    "h5_sigterm_mid_spend_after_an_outage": h5_sigterm_mid_spend_after_an_outage,
    "h2_grace_retry_on_a_long_lifetime_3": h2_grace_retry_on_a_long_lifetime_3,
    "h2_grace_retry_on_a_long_lifetime_1": h2_grace_retry_on_a_long_lifetime_1,
    "h3_aborted_grace_retry": h3_aborted_grace_retry,
    "c1_replaced_pod_empty_restart_3": c1_replaced_pod_empty_restart_3,
    "c1_replaced_pod_empty_restart_2": c1_replaced_pod_empty_restart_2,
    "h1_slow_answer_past_the_budget": h1_slow_answer_past_the_budget,
    "m4_500_after_rotating": m4_500_after_rotating,
    "empty_restart_on_short_tokens": empty_restart_on_short_tokens,
    "h4_split_brain_both_sides_spend": h4_split_brain_both_sides_spend,
    "m5_rolling_deploy_of_a_newer_protocol": m5_rolling_deploy_of_a_newer_protocol,
    "m6_second_fleet_with_another_client": m6_second_fleet_with_another_client,
    "m3_store_clock_steps_back_under_a_restarted_pod": (
        m3_store_clock_steps_back_under_a_restarted_pod
    ),
    "store_clock_step_back_after_a_send": store_clock_step_back_after_a_send,
    "config_reload_while_the_answer_is_unstored": config_reload_while_the_answer_is_unstored,
    "m2_half_open_spender": m2_half_open_spender,
    "aborted_grace_retry_respent_by_its_retrier": aborted_grace_retry_respent_by_its_retrier,
    "mark_sent_answer_lost_in_an_outage": mark_sent_answer_lost_in_an_outage,
    "paused_bystander_keeps_its_buffered_notices": paused_bystander_keeps_its_buffered_notices,
    "grace_retry_vetoed_on_a_resync": grace_retry_vetoed_on_a_resync,
    "grace_retry_of_a_spend_never_sent": grace_retry_of_a_spend_never_sent,
    "lost_notices_under_one_due_time": lost_notices_under_one_due_time,
    "reads_at_one_due_time": reads_at_one_due_time,
    "sigterm_with_the_answer_unstored": sigterm_with_the_answer_unstored,
    "spender_paused_between_mark_sent_and_sending": spender_paused_between_mark_sent_and_sending,
    "forgotten_while_the_spender_is_paused": forgotten_while_the_spender_is_paused,
    "a_pod_started_in_an_outage_with_its_clock_behind": (
        a_pod_started_in_an_outage_with_its_clock_behind
    ),
    "failover_loses_the_abort": failover_loses_the_abort,
    "split_brain_keeps_an_aborted_spend": split_brain_keeps_an_aborted_spend,
    "stale_copy_outlives_the_split": stale_copy_outlives_the_split,
    "purge_once_for_a_revoked_token": purge_once_for_a_revoked_token,
    "grace_retry_timed_by_a_stepped_store_clock": grace_retry_timed_by_a_stepped_store_clock,
    "grace_retry_of_a_rejected_token": grace_retry_of_a_rejected_token,
    "forgotten_while_the_spender_is_cut_off": forgotten_while_the_spender_is_cut_off,
    "config_reload_after_a_mark_sent_answer_lost": config_reload_after_a_mark_sent_answer_lost,
    "two_failovers_at_one_moment": two_failovers_at_one_moment,
    "veto_naming_a_spend_a_reload_carried": veto_naming_a_spend_a_reload_carried,
    "sigterm_during_a_reload_mid_spend": sigterm_during_a_reload_mid_spend,
    "config_reload_under_two_clocks_behind": config_reload_under_two_clocks_behind,
    "spend_record_resolved_while_its_reader_looks": spend_record_resolved_while_its_reader_looks,
    "record_owner_unread_in_a_flapping_store": record_owner_unread_in_a_flapping_store,
    "sigterm_with_an_abort_unwritten": sigterm_with_an_abort_unwritten,
    "set_stamped_while_a_jump_back_waits": set_stamped_while_a_jump_back_waits,
    "set_stamped_ahead_read_at_once": set_stamped_ahead_read_at_once,
    "rollback_erases_a_sent_record_with_its_spender_awake": (
        rollback_erases_a_sent_record_with_its_spender_awake
    ),
    "veto_for_a_spend_its_drained_spender_aborted": veto_for_a_spend_its_drained_spender_aborted,
    "veto_judged_before_the_spenders_abort": veto_judged_before_the_spenders_abort,
    "spenders_veto_lifted_by_its_abort": spenders_veto_lifted_by_its_abort,
    "sigterm_in_an_outage_past_the_drain": sigterm_in_an_outage_past_the_drain,
    "sigterm_in_an_outage_inside_the_drain": sigterm_in_an_outage_inside_the_drain,
    "failover_loses_a_commit_after_its_writer_exited": (
        failover_loses_a_commit_after_its_writer_exited
    ),
    "failover_loses_an_abort_after_its_spender_exited": (
        failover_loses_an_abort_after_its_spender_exited
    ),
    "sigterm_drain_waits_for_a_replica_to_hold_the_commit": (
        sigterm_drain_waits_for_a_replica_to_hold_the_commit
    ),
    "set_evicted_after_its_writer_exited": set_evicted_after_its_writer_exited,
    "set_evicted_under_its_writer": set_evicted_under_its_writer,
    "set_evicted_none_heard_of_its_spend": set_evicted_none_heard_of_its_spend,
    "set_evicted_one_heard_of_its_spend": set_evicted_one_heard_of_its_spend,
    "set_rolled_back_after_its_writer_exited": set_rolled_back_after_its_writer_exited,
    "set_rolled_back_under_its_writer": set_rolled_back_under_its_writer,
    "set_lost_in_an_empty_restart_after_its_writer_exited": (
        set_lost_in_an_empty_restart_after_its_writer_exited
    ),
    "set_lost_in_an_empty_restart_under_its_writer": set_lost_in_an_empty_restart_under_its_writer,
    "abort_after_the_store_forgot_the_record": abort_after_the_store_forgot_the_record,
    "restored_record_named_for_its_first_spender": restored_record_named_for_its_first_spender,
    "split_brain_answers_a_drained_abort_with_another_spend": (
        split_brain_answers_a_drained_abort_with_another_spend
    ),
    "retry_aborted_after_both_sends_heard": retry_aborted_after_both_sends_heard,
    "own_spend_retried_then_aborted": own_spend_retried_then_aborted,
    "pod_restarted_while_the_store_clock_is_back": pod_restarted_while_the_store_clock_is_back,
    "set_stamped_while_the_store_clock_was_ahead": set_stamped_while_the_store_clock_was_ahead,
    "step_between_two_rounds_under_a_restarted_pod": (
        step_between_two_rounds_under_a_restarted_pod
    ),
    "set_stamped_ahead_its_writer_gone": set_stamped_ahead_its_writer_gone,
    "set_stamped_by_a_frozen_spender_read_after_the_step": (
        set_stamped_by_a_frozen_spender_read_after_the_step
    ),
    "fence_counter_evicted_after_a_send": fence_counter_evicted_after_a_send,
    "commit_forgotten_while_its_spender_is_cut_off": commit_forgotten_while_its_spender_is_cut_off,
    "forgotten_then_down_then_its_spender_cut_off": forgotten_then_down_then_its_spender_cut_off,
    "fence_repeated_after_its_counter_was_evicted": fence_repeated_after_its_counter_was_evicted,
    "holder_back_soon_after_a_forgetful_outage": holder_back_soon_after_a_forgetful_outage,
    "spender_in_flight_back_soon_after_a_forgetful_outage": (
        spender_in_flight_back_soon_after_a_forgetful_outage
    ),
    "abort_after_another_spend_replaced_the_forgotten_record": (
        abort_after_another_spend_replaced_the_forgotten_record
    ),
    "step_seen_after_a_restarted_pod_read_the_stamp": (
        step_seen_after_a_restarted_pod_read_the_stamp
    ),
    "bound_evicted_with_the_set_written_back": bound_evicted_with_the_set_written_back,
}


if __name__ == "__main__":
    outcome = run(DOORS[sys.argv[1]]())
    print(outcome.report())
    sys.exit(0 if outcome.ok else 1)
