"""Deterministic simulation of the fleet protocol: many seeded fault schedules, invariants checked
after every step (tests/simulation/schedule.py). A failing seed prints its schedule and how to
replay it; every seed that once failed stays in REGRESSION_SEEDS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest

from tests.simulation.schedule import (
    ALL_PAIRS,
    FAULT_KINDS,
    Result,
    legacy_schedule,
    make_schedule,
    run,
)

# How many seeded schedules the default test command runs (SIM_SCHEDULES overrides).
SCHEDULES = int(os.environ.get("SIM_SCHEDULES", "2000"))

# Seeds that failed while the protocol was built, with what they found (docs/architecture.md).
# They are seeds of the first generator (legacy_schedule), replayed as they ran then
# (`python -m tests.simulation.schedule SEED --legacy`).
REGRESSION_SEEDS = {
    2: "a slow server outlived a spend's budget: the cancelled request became 'unknown' and "
    "the fleet stopped refreshing (spends now get the full request budget)",
    5: "a store outage killed the simulated subscription and with it the core",
    7: "same as 5, after a 9 s outage",
    28: "a crash inside the objection window left a spend record that blocked the fleet "
    "(records are 'announced' until marked sent just before sending)",
    33: "same as 28",
    49: "SIGTERM drained on simulated time while the driver waited for it",
    57: "a lost reply on a grace server: the retry was allowed without checking the window",
    65: "a replica restarted during an outage spent an old (rolled back) set the moment the "
    "store returned, before the replicas holding the newer set had re-subscribed (with nothing "
    "servable the objection window is now longer than the watcher's reconnect bound)",
    70: "a grace server's retry came after the window and revoked the grant (the store now "
    "times the window from the send, on its own clock)",
    84: "crash inside the objection window (as 28)",
    93: "crash inside the objection window (as 28)",
    95: "crash inside the objection window (as 28)",
    671: "a lost reply, then a store that forgot the spend record, then a restarted replica "
    "spent the old token (replicas that remember now veto an announced spend)",
    914: "a request in flight when the schedule ended was judged a lost grant (the check now "
    "waits for answers in flight)",
    3225: "as 671",
    3888: "as 671",
    731: "a refresh sent just before the end was judged a lost grant (the checker now lets "
    "every request in flight finish; 766, 1237, 1338, 6266, 7847, 9501 and 9735 were the same)",
    1630: "a store rollback swallowed a spend's abort notice: replicas that had heard it sent "
    "vetoed its spender's next spends for good, and a veto on re-sync turned the rollback's "
    "ghost record into an unknown spend (a spender's own next spend now resolves its earlier "
    "one, vetoes need the spender's live lease, and another replica's spend in flight is no "
    "longer recorded as our own lost reply)",
    2331: "as 1630",
    4556: "a lost reply, an empty restart that forgot the spend record, an outage, and a "
    "replica restarted during it announced a spend of the old token while the replicas that "
    "remembered the lost reply were still re-subscribing, so they missed the notice (a replica "
    "now vetoes an announced spend of a token it remembers as spent when it re-syncs)",
    5813: "liveness, not safety (issue 20, H2): a lease lost while its holder's spend was in "
    "flight let a second replica start a grace-window retry, a third vetoed it, and the veto "
    "took the record's fence, so the first spender's abort could no longer clear it: the fleet "
    "waited for a person (a retry the store granted is now marked in its notice and nobody "
    "vetoes it)",
}


# Swarm seeds (make_schedule) past the CI sample that once broke an invariant, replayed as they
# run now (`python -m tests.simulation.schedule SEED`), with what they found.
SWARM_REGRESSION_SEEDS = {
    2668: "a set stamped by a fleet clock still ahead after Redis's clock went back, read at "
    "once by a replica whose clocks were right, served past its expiry (a set read from the "
    "store now lives at most its lifetime from the read)",
    5083: "a set stamped while the fleet clock held a jump back of Redis's clock, read 45 s "
    "later by a new pod, served past its expiry (a set is stamped in the earliest frame the "
    "fleet clock allows)",
    8952: "a pod whose first round took a brief step of Redis's clock stamped a set 11 s late, "
    "read at once by a bystander (as 2668)",
    11103: "a bystander judged a veto before reading the spend record, and sent it after the "
    "spender's abort came: the veto named no spend and blocked the fleet for good (a veto is "
    "judged again right before it is sent)",
    19564: "the spender vetoed a new pod's spend of its token on the wire after an empty "
    "restart, then got 429: the veto named no spend, and its abort could not lift it (the veto "
    "now names the spend on the wire)",
    12086: "a partition's heal went to the pod that replaced the partitioned one, which drained "
    "cut off past its bound with its abort unwritten (a model bug: a fault heals where it began)",
    21255: "a commit written after the last WAIT (the `sent` record's), its writer drained and "
    "exited, then a failover lost it: only the `sent` record was left, nobody could resolve it "
    "(a commit is now WAITed for with store.require_replica_ack, and the drain asks again)",
    21685: "as 21255, the writer killed just after its commit",
    23291: "as 21255 for an abort: the spender's abort (the server did not act) lost by a "
    "failover after its drain exited, the `sent` record stood for good (an abort is WAITed for)",
    24380: "the documented limit, counted apart: an empty restart as the server rotated, the "
    "commit stored after it, the writer's drain ended, then the set evicted (maxmemory-policy "
    "noeviction rules it out) before any other replica had read it",
    27519: "as 21255, with two failovers and a lost lease",
    26046: "the recovery check fell 1 ms after a commit, before its notice reached the "
    "replicas, whose clocks (17 to 54 s ahead) had stopped them serving the set before it; "
    "they served the new set 1 ms later (a checker bug: the clock-ahead excuse now includes "
    "the set a commit replaced within a notice's delivery and a read, ADOPTION_LAG)",
    12554: "Redis restarted empty as the token was marked sent, and the drained spender's abort "
    "found no record: the bystanders' veto of a new pod's spend named a spender that had exited "
    "(the abort is kept and announced anyway, and the `sent` notice names the fence)",
    27015: "the same, an empty restart and SIGTERM as the spender's token went out (as 12554)",
    28726: "the same with an eviction of the spend record and a crashed spender (as 12554)",
    10135: "the record an aborted grace retry restored was read as the retrier's: it remembered "
    "the spend as nobody's and vetoed the first spender's next spend for good (the record names "
    "the spend it stands for)",
    25279: "a split brain left the drained spender on the old primary, where another spend "
    "began after its unacknowledged abort; asked again, the old primary answered 'another "
    "spend's record' without WAIT and the drain exited; the heal discarded the abort (every "
    "abort's answer is now waited for, and the drain waits for the abort as for a commit)",
    4575: "a pod restarted while Redis's clock was stepped back, its own clock behind: every "
    "clock it had was behind and the set was stamped right, so it served the set past its "
    "expiry (a replica whose round holds or takes a jump back lowers the stored expiry to its "
    "own deadline in the new frame, `lower_expiry`)",
    8286: "as 4575",
    27232: "as 4575",
    16961: "a set stamped by a fleet clock ahead of Redis's with no jump held yet, read by a pod "
    "that scaled up long after (the replicas that held the jump back lowered the stored expiry, "
    "as 4575)",
    24067: "as 16961",
    13488: "a set stamped right while Redis's clock was ahead, read by a pod that joined after "
    "Redis went back (as 4575)",
    19018: "as 13488",
    20791: "a pod restarted inside a 15 s step back of Redis's clock that fell between two "
    "rounds of a fleet measuring in lockstep: nobody lowered the stored expiry (the fleet "
    "clock's waits are spread now, MEASURE_SPREAD, so some replica's round falls inside)",
    28259: "as 20791",
    2691: "a set stamped 22 s late by a replica whose fleet clock still had Redis's step "
    "ahead, the writer stopped (SIGTERM) before its next round; its replacement read it 52 s "
    "later and served it past its expiry (a replica that reads a set issued in the future "
    "lowers the stored expiry to its own bound)",
    5792: "as 2691, read by a replica that had been cut off from the store during the whole "
    "step (a lowered set keeps its lifetime, so a reader does not lower it again)",
    4340: "a spender frozen 33 s as Redis's clock went back 37 s stored its set stamped in the "
    "old frame; the replicas that had taken the step read it, and the stored expiry lowered "
    "after it by the others did not reach them (a look that finds the set served with an "
    "earlier expiry takes it)",
    30624: "a split brain's old primary held a spend whose abort went to the new one; a "
    "grace retry there was not durable and its abort restored the record; a bystander with it "
    "had heard only the retry's notices, and after the heal it vetoed the next spend for the "
    "retry, whose abort says nothing of the spend retried; and the store kept only the last "
    "abort, three later ones after the first: the fleet waited for a person, the grant intact "
    "(a retry's abort names the spend retried, the bystander's memory follows it, and the "
    "store refuses a veto for any of its ABORTS_KEPT latest aborts)",
    46315: "a pod restarted inside an empty restart found no set, then adopted the one a "
    "replica without the newest set wrote back, and spent it within the short objection window "
    "1.3 s before the replica holding the newest set wrote that back: the grant was revoked (a "
    "set of a later generation that is its key's first write is evidence the store forgot: "
    "the long objection window)",
    6938: "a drain ran to its bound on the replica's clock and ended 1e-13 s short of it in "
    "world time: counted as a drain that exited early holding the only copy of the newest set "
    "(a checker bug: the drain's elapsed time is compared within TIMER_ROUNDING)",
    75139: "an eviction 0.4 s after a send took the lease and the fence counter but not the "
    "`sent` record; the next holder was granted fence 1 again, and its begin_spend took the "
    "record under its own fence for its own and replaced it: the token was presented again "
    "(a spend is named by its owner and fence together: another owner's record under the same "
    "fence answers UNKNOWN, and mark_sent checks the owner too)",
    56916: "as 75139: an eviction as the token was marked sent took the lease and the fence "
    "counter; the next holder, granted the same fence, replaced the `sent` record, and a "
    "veto of its spend stood for good: the fleet waited for a person (invariant 5)",
    72057: "the documented limit, counted apart: a failover as the token was marked sent "
    "dropped every subscription, the spender committed and was paused 39 s (SIGTERM too), and "
    "an eviction took the committed set, the store's one trace of the spend; a bystander wrote "
    "its older set back and spent it (the checker counted only a lost `sent` record)",
    81490: "the documented limit, counted apart: a failover as the token was marked sent "
    "dropped every subscription, the spender's commit was acknowledged, a split brain left it "
    "on the old primary for 9.4 s, and Redis restarted empty; a bystander wrote its older set "
    "back and spent it after the long window (the checker counted only a lost `sent` record, "
    "not a lost commit, which was then the store's one trace of the spend)",
    94531: "the documented limit, counted apart: an empty restart as the token was marked "
    "sent, the store down 22.6 s from 59 ms later, and 63 ms after its return the spender and "
    "the replica that adopted its set left on the old primary of a split brain for 50 s (the "
    "checker counted the time to come back from the restart, not from the store's return)",
    88902: "an empty restart erased the `sent` record of a spend whose server rotated and "
    "answered 500; a bystander wrote the set back under a key the spender lacks and spent it "
    "after the long window: the spender's re-sync could not open the stored set and returned "
    "before its veto (a re-sync that finds our own set under a key we lack vetoes as well)",
    53285: "a spender paused 44 s 19 ms after its request left: the simulated server acted "
    "on it only when the sender resumed, after another replica's grace retry and past the "
    "grace window (a model bug: a request on the wire reaches the server whatever its "
    "sender's process does; a pause holds back only a request not yet sent, and the reply)",
    52433: "a failover as a spend was sent dropped every subscription; the spender committed "
    "the rotated set (its notice missed by the re-subscribing replicas) and crashed, and a "
    "restore 32 ms later erased that set: nobody held the server's newest refresh token (the "
    "documented limit, not a door; the checker counted only an eviction so, and now counts a "
    "restore too, as it does for a `sent` record)",
    55914: "a split brain as a spend was sent; the server answered 500, the spender's abort "
    "went to the old primary and a grace retry on the new one got 500 too (its abort restored "
    "the record); the spender had heard the retry's notices and remembered its own aborted "
    "spend as another replica's: it vetoed the next spend in its own name, and its own "
    "OutcomeUnknown kept it from the begin_spend that would have lifted the veto (a retry's "
    "abort that names our own spend leaves nothing foreign)",
    68595: "Redis's clock 44 s back from 288.9 to 318.9 s; r2 restarted at 293.7 s (its clock "
    "49 s behind), before any replica's round saw the step, and read the set stamped right at "
    "face value; r0's round lowered the stored expiry at 299.4 s, but r2 took it only at its "
    "periodic look, serving 9 s past the true expiry (313.5 s) (a lowering is announced: "
    "LOWERED, and its holders read the store at once)",
    80253: "Redis's clock 11 s back from 231.1 to 249.6 s; r5 restarted at 238.6 s (8 s "
    "behind) read the set at face value; r2's round lowered the stored expiry at 244.3 s, 1.5 s "
    "before the true expiry, and r5 served past it until its periodic look (a lowering is "
    "announced: LOWERED)",
    62442: "a spender's mark_sent and a bystander's grace retry both not durable; the retry's "
    "abort restored the record naming the spender's spend, and the spender, reading it, "
    "remembered its own spend as another replica's under its own name: it vetoed every other "
    "spend of the token for good (a retry's abort naming our own spend leaves nothing foreign)",
    72135: "as 62442: the spender, frozen as its token was marked sent, woke past a bystander's "
    "refused grace retry, aborted its own spend and then read the retry's notices; kept as "
    "another's under its own name, and after a config reload its new refresher vetoed naming "
    "that name alone, which no abort lifts (door own_spend_retried_then_aborted)",
    99854: "the documented limit, counted apart: a failover as the token was marked sent "
    "dropped every subscription, the spender committed, its SIGTERM drain exited, and a "
    "rollback 12 ms later brought back the set before it: nobody held the server's newest "
    "refresh token (the checker counted only an eviction so; a restore is counted too)",
    118156: "the documented limit, counted apart: an empty restart as the server rotated "
    "dropped every subscription, the spender's SIGTERM drain committed (its notice unheard) "
    "and exited, and a second empty restart 44 ms later erased that set: nobody held the "
    "server's newest refresh token (the checker counted an eviction or a restore so; an empty "
    "restart is counted too; door set_lost_in_an_empty_restart_after_its_writer_exited)",
    123915: "the documented limit, counted apart, as 118156 on a 30 s grace server: an empty "
    "restart as the server rotated dropped every subscription, the spender committed (its "
    "notice unheard), its SIGTERM drain exited, and a second empty restart 119 ms later erased "
    "that set; the bystanders had heard another replica granted the one grace retry, and "
    "vetoed every later spend (a third presentation could revoke the grant)",
    120513: "Redis's clock 13.5 s back from 137.5 to 141.5 s, the set evicted at 137.7 s; r2 "
    "restarted at 140.4 s (its clock 25.6 s behind) measured the stepped clock; r1's round at "
    "141.2 s found no set to lower, and r4 wrote it back at 149.4 s stamped before the step: "
    "r2 served it past its true expiry (152.7 s) (the bound asked is asked again when the store "
    "holds the set above it; door bound_evicted_with_the_set_written_back)",
}


# Swarm seeds (make_schedule) that still break an invariant, kept so they are replayed and
# cannot silently pass: a fix turns the strict xfail into a failure that says to move them.
# None of 0..1999 today: 734 and 1237 (eviction with a split brain, the record evicted right
# after the send while its spender was cut off on the old primary) are the documented limit of
# a store that forgets, counted apart since the checker counts a spender cut off past the long
# objection window as mute (issue 20; the broker needs `maxmemory-policy noeviction`).
# Seeds 50,000..99,999 (`bench/simulate.py --start 50000 --schedules 50000`, on c43b632 of
# 2026-12-07) broke an invariant in 15, each on 8158e3c too (before that day's two fixes).
# Analysed on 2026-12-07/08: 14 are fixed or shown to be the documented limit (now in
# SWARM_REGRESSION_SEEDS, and DOCUMENTED_LIMIT_SEEDS where so). One stays open, 83136. Seeds
# 100,000..124,999 on 2d8cc01 broke an invariant in 3 more, each on 8bac933 too (118156 and
# 123915 are the documented limit: an empty restart erased the newest set after its writer
# exited; 120513 is fixed: a bound asked again). Seeds 93084 and 127482 failed
# inside long runs and pass alone: the harness healed by id(fault) (fixed; test_loop.py).
OPEN_SEEDS: dict[int, str] = {
    83136: "config_reload, crash, server_slow, store_clock_step: an expired token served "
    "(invariant 2). Analysed: a step no replica's round falls inside (docs, Time): Redis 8.27 s "
    "back from 197.23 to 212.99 s, the fleet's rounds at 197.09 (r5) and 214.93 s (r2); r1 "
    "restarted inside it (its clock 28 s behind) measured the stepped clock first and served "
    "the set, stamped right, to 211.4 s (true expiry 209.19 s); nobody could lower it",
}

# Swarm seeds of the sample (and SWARM_REGRESSION_SEEDS) whose grant is revoked or lost by the
# documented limit (README, "What a crash can lose"): the store forgot an acknowledged `sent`
# record (or the committed set that resolved it) while every replica that knew (the spender, a
# replica that heard its notice or holds the newer set) could not speak, or evicted the newest
# set while no running process held it.
# Counted apart, not failing; any other seed so excused fails, so the excuse cannot widen
# unseen (and a seed listed here that stops being excused says to take it out).
DOCUMENTED_LIMIT_SEEDS: dict[int, str] = {
    194: "an empty restart as the token is marked sent, the spender frozen past the window",
    734: "an eviction right after the send, the spender and the replicas that adopted its set "
    "on the old primary of a split brain for 18 s",
    1237: "an empty restart and an eviction, the spender on the old primary of a split brain",
    24380: "the newest set evicted after its writer's drain ended, nobody else had read it",
    72057: "the spender's committed set evicted while it was paused 39 s, nobody else had "
    "heard of it",
    81490: "the spender's acknowledged commit lost in an empty restart while it (and the one "
    "replica holding its set) was on the old primary of a split brain for 9.4 s",
    94531: "an empty restart as the token was marked sent, the store down 22.6 s, and the "
    "spender and the replica holding its set on the old primary of a split brain for 50 s "
    "from 63 ms after the store came back",
    52433: "the newest set erased by a restore 32 ms after its writer crashed, the others "
    "re-subscribing after a failover had missed its notice",
    99854: "the newest set erased by a rollback 12 ms after its writer's drain ended, the "
    "others re-subscribing after a failover had missed its notice",
    118156: "the newest set erased by an empty restart 44 ms after its writer's drain ended, "
    "the others re-subscribing after an earlier empty restart had missed its notice",
    123915: "the newest set erased by an empty restart 119 ms after its writer's drain ended, "
    "the others re-subscribing after an earlier empty restart had missed its notice (a 30 s "
    "grace server, its one retry granted to a bystander that never sent it)",
}

# Swarm seeds of the sample stopped by the documented limit of a drain (README, "What a crash
# can lose"): the fleet waits for a person, the grant intact, behind the `sent` record of a
# spend never sent, whose spender got SIGTERM as the store became unreachable for it and
# exited at its drain's bound before it could reach the store again. Counted apart, not
# failing; none in the sample (swarm seed 27342 is one, below), and any seed so excused
# without being listed fails.
DRAIN_LIMIT_SEEDS: dict[int, str] = {}

_RESULTS: dict[int, Result] = {}


def outcome(seed: int) -> Result:
    """The run of swarm seed `seed`, once per test session (the coverage test reuses it)."""
    if seed not in _RESULTS:
        _RESULTS[seed] = run(make_schedule(seed))
    return _RESULTS[seed]


@pytest.mark.parametrize("seed", [s for s in range(SCHEDULES) if s not in OPEN_SEEDS])
def test_schedule_keeps_every_invariant(seed: int) -> None:
    """Under this seed's faults: no refresh token spent twice, no expired token served, no
    revoked grant, fair-weather requests within 1.1x one broker, and service again after heal."""
    result = outcome(seed)
    assert result.ok, result.report()
    assert excused(result) == (seed in DOCUMENTED_LIMIT_SEEDS), result.report()
    assert result.stranded_by_drain == (seed in DRAIN_LIMIT_SEEDS), result.report()


def excused(result: Result) -> bool:
    """The run was counted apart as the documented limit (a forgotten `sent` record or an
    evicted set)."""
    return result.revoked_forgotten_while_alone or result.lost_evicted_while_alone


@pytest.mark.parametrize("seed", sorted(REGRESSION_SEEDS))
def test_regression_seed(seed: int) -> None:
    """A seed that once broke an invariant keeps every invariant."""
    result = run(legacy_schedule(seed))
    assert result.ok, f"{REGRESSION_SEEDS[seed]}\n{result.report()}"


@pytest.mark.parametrize("seed", sorted(SWARM_REGRESSION_SEEDS))
def test_swarm_regression_seed(seed: int) -> None:
    """A swarm seed past the CI sample that once broke an invariant keeps every invariant."""
    result = outcome(seed)
    assert result.ok, f"{SWARM_REGRESSION_SEEDS[seed]}\n{result.report()}"
    assert excused(result) == (seed in DOCUMENTED_LIMIT_SEEDS), result.report()


def test_the_drains_limit_excuses_seed_27342_and_not_a_shorter_outage() -> None:
    """Seed 27342: the store down 139.8 s from the moment it applied the spender's `mark_sent`
    (the answer lost: never sent), SIGTERM at that moment; the drain's bound is 137.5 s. The
    fleet waits for a person behind the record, the grant intact: excused as the drain's
    limit. The same schedule with the outage 130 s long, inside the bound: the drain writes
    the abort, the fleet serves again, and nothing is excused."""
    result = outcome(27342)
    assert result.ok and result.stranded_by_drain, result.report()
    assert result.outcome_unknown_announced > 0 and not result.revoked, result.report()
    schedule = make_schedule(27342)
    outage = schedule.faults[0]
    assert outage.kind == "store_outage" and outage.phase == "sent", schedule.describe()
    shorter = dataclasses.replace(
        schedule, faults=(dataclasses.replace(outage, duration=130.0), *schedule.faults[1:])
    )
    neighbour = run(shorter)
    assert neighbour.ok and not neighbour.stranded_by_drain, neighbour.report()


def test_schedules_cover_every_fault_kind() -> None:
    """The seeds the suite runs include every kind of fault, swarm subsets of several kinds,
    faults aimed inside spends, and some fault-free schedules."""
    schedules = [make_schedule(seed) for seed in range(SCHEDULES)]
    kinds = {fault.kind for schedule in schedules for fault in schedule.faults}
    assert kinds == set(FAULT_KINDS)
    assert sum(schedule.fault_free for schedule in schedules) >= SCHEDULES // 20
    assert any(schedule.config.grace > 0 for schedule in schedules)
    assert all(len(s.enabled) >= 2 for s in schedules if not s.fault_free)
    aimed = sum(f.phase is not None for s in schedules for f in s.faults)
    assert aimed >= sum(len(s.faults) for s in schedules) // 2


# SHA-256 of the descriptions of swarm seeds 0..1499 as drawn before issue 22 (main at a430a90):
# the upstream 401s come from a generator of their own, so every other draw stays as it was.
SCHEDULES_BEFORE_UPSTREAM_401S = "bccea15486d1c79b723176165225b6b8d50e7d8aa01dd9af047b5e81d0cb5de4"


def test_upstream_401s_leave_every_other_draw_as_it_was() -> None:
    """Issue 22 added upstream 401s to a quarter of the schedules without redrawing any seed's
    fleet, server, clocks or faults; some fault-free schedules have them (the one-refresh-per-
    purge check applies there)."""
    schedules = [make_schedule(seed) for seed in range(1500)]
    digest = hashlib.sha256()
    for schedule in schedules:
        # DPoP apps (issue 23) come from a generator of their own too: left out as well.
        before = dataclasses.replace(
            schedule,
            upstream_401=(),
            config=dataclasses.replace(schedule.config, dpop=False),
        )
        digest.update(before.describe().encode())
    assert digest.hexdigest() == SCHEDULES_BEFORE_UPSTREAM_401S
    with_401s = [s for s in schedules if s.upstream_401]
    assert 1500 // 5 <= len(with_401s) <= 1500 // 3
    assert sum(s.fault_free for s in with_401s) >= 10


def test_every_pair_of_fault_kinds_meets_inside_one_spend() -> None:
    """Within the seeds the suite runs, every pair of fault kinds was active inside one spend
    (between its announcement and the end of its attempt) in at least one schedule."""
    met = set().union(*(outcome(seed).pairs for seed in range(SCHEDULES)))
    missing = sorted(ALL_PAIRS - met)
    assert not missing, f"{len(missing)} pairs never met inside a spend: {missing}"


if OPEN_SEEDS:

    @pytest.mark.parametrize("seed", sorted(OPEN_SEEDS))
    @pytest.mark.xfail(strict=True, reason="a known open seed (OPEN_SEEDS)")
    def test_open_seed(seed: int) -> None:
        """A known open seed still breaks an invariant (when it passes, it is fixed: move it)."""
        result = outcome(seed)
        assert result.ok, f"{OPEN_SEEDS[seed]}\n{result.report()}"
