"""Several broker processes sharing one store: the fleet, and a poller that checks every answer."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from broker import policy
from broker.model import RefreshPolicy, TokenSet
from tests.support.authorization import ac_app, authorize_via_code
from tests.support.broker_process import BrokerFiles, BrokerProcess
from tests.support.oauth_server import OAuthTestServer
from tests.support.redis_server import RedisServer


@dataclass
class Replica:
    """One broker process and its config directory; `polled` False keeps pollers away."""

    files: BrokerFiles
    process: BrokerProcess
    polled: bool = True

    async def restart(self) -> None:
        """SIGTERM (a rolling deploy: waits for the exit), start again, wait until ready.

        The wait runs in a thread: the test's OAuth server shares this event loop, and must
        answer the refresh the replica finishes before it exits.
        """
        self.polled = False
        code = await self.process.terminate_async()
        assert code == 0, self.process.output()[-4000:]
        self.process.start()
        await self.process.wait_ready(self.files.metrics)
        self.polled = True


@dataclass
class FleetStats:
    """What polling the fleet saw."""

    ok: int = 0
    unavailable: int = 0
    server_errors: int = 0
    expired: int = 0
    other: list[int] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    # Every answer: (wall time, replica index, HTTP status).
    answers: list[tuple[float, int, int]] = field(default_factory=list)

    def of(self, index: int, since: float = 0.0) -> list[int]:
        """Statuses replica `index` answered from wall time `since` on."""
        return [status for at, i, status in self.answers if i == index and at >= since]

    def serving_again(self, index: int, since: float) -> float | None:
        """Seconds from `since` until replica `index` answered 200 (None: it never did)."""
        times = [at for at, i, status in self.answers if i == index and status == 200]
        later = [at for at in times if at >= since]
        return min(later) - since if later else None


class Fleet:
    """N replicas of `python -m broker serve`, same apps, same store."""

    def __init__(
        self,
        root: Path,
        token_url: str,
        store_url: str,
        size: int,
        app_overrides: Mapping[str, Any] | None = None,
        envs: Sequence[Mapping[str, str] | None] = (),
        apps: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """`envs[i]` is extra environment for replica i (e.g. a skewed clock)."""
        self.replicas: list[Replica] = []
        for i in range(size):
            files = BrokerFiles(
                directory=root / f"replica-{i}",
                token_url=token_url,
                store_url=store_url,
                app_overrides=app_overrides or {},
                apps=apps or {},
            )
            config = files.write()
            env = envs[i] if i < len(envs) else None
            process = BrokerProcess(config, root / f"replica-{i}.log", env=env)
            self.replicas.append(Replica(files, process))

    async def start(self, timeout: float = 20.0) -> None:
        """Start every replica and wait until each is ready (`timeout` for each); on any
        failure, stop them all."""
        try:
            for replica in self.replicas:
                replica.process.start()
            for replica in self.replicas:
                await replica.process.wait_ready(replica.files.metrics, timeout)
        except BaseException:
            await self.stop_async()
            raise

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every replica still running, then wait for all, `timeout` seconds each
        (killing any that hang)."""
        for replica in self.replicas:
            replica.process.signal_stop()
        failures = []
        for replica in self.replicas:
            try:
                replica.process.wait_stopped(timeout)
            except AssertionError as exc:
                failures.append(str(exc))
        if failures:
            raise AssertionError("; ".join(failures))

    async def stop_async(self, timeout: float = 20.0) -> None:
        """`stop()` from a test's event loop, without blocking it: a draining replica may wait
        for the answer to a refresh token it sent to an OAuth server on that loop (a blocked
        loop answers nothing; the CI run of 2026-12-07 killed one after 20 s)."""
        await asyncio.to_thread(self.stop, timeout)

    def alive(self) -> list[Replica]:
        """Replicas whose process is running."""
        return [r for r in self.replicas if r.process.process and r.process.process.poll() is None]

    async def poll(
        self, oauth: OAuthTestServer, seconds: float, interval: float = 0.1
    ) -> FleetStats:
        """Ask every live replica for a token every `interval` for `seconds`; check each answer."""
        poller = Poller(self, oauth, interval)
        poller.start()
        await asyncio.sleep(seconds)
        return await poller.stop()


class Poller:
    """Asks every live, polled replica for a token every `interval` until stopped.

    Each 200 is checked against the server's record of when that token expires.
    """

    def __init__(self, fleet: Fleet, oauth: OAuthTestServer, interval: float = 0.1) -> None:
        self.fleet = fleet
        self.oauth = oauth
        self.interval = interval
        self.stats = FleetStats()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start polling in the background."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> FleetStats:
        """Stop polling; what was seen."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return self.stats

    async def _run(self) -> None:
        stats = self.stats
        async with aiohttp.ClientSession() as session:
            while True:
                for index, replica in enumerate(self.fleet.replicas):
                    if not replica.polled or replica not in self.fleet.alive():
                        continue
                    try:
                        async with session.get(
                            f"{replica.files.api}/v1/token/app1", headers=replica.files.auth
                        ) as response:
                            body = await response.json()
                            status = response.status
                    except aiohttp.ClientError:
                        continue  # a replica the test just stopped
                    stats.answers.append((time.time(), index, status))
                    if status == 200:
                        stats.ok += 1
                        stats.tokens.add(body["access_token"])
                        if self.oauth.expiry[body["access_token"]] <= time.time():
                            stats.expired += 1
                    elif status == 503:
                        stats.unavailable += 1
                    elif status >= 500:
                        stats.server_errors += 1
                    else:
                        stats.other.append(status)
                await asyncio.sleep(self.interval)


async def metric_value(replica: Replica, name: str) -> float:
    """The value of an unlabelled metric on a replica's /metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{replica.files.metrics}/metrics") as response,
    ):
        text = await response.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"{name} not in /metrics of {replica.files.directory.name}")
    return float(match.group(1))


def requests_since(oauth: OAuthTestServer, since: float) -> list[float]:
    """Times (the server's clock) of the token requests received at or after `since`."""
    return [r.at for r in oauth.requests if r.at >= since]


def requests_per_lifetime(times: Sequence[float], lifetime: float) -> float:
    """Steady-state token requests per lifetime: the intervals between requests over their span.

    Unlike a count in a window, this does not depend on where the window's edges fall relative
    to the refresh schedule (a count is off by one for about one run in six); an extra request
    anywhere still shows, as a short interval.
    """
    if len(times) < 3:
        raise AssertionError(f"too few token requests to measure a rate: {len(times)}")
    ordered = sorted(times)
    return (len(ordered) - 1) * lifetime / (ordered[-1] - ordered[0])


def shared_jitter(access_token: str, lifetime: float, refresh: RefreshPolicy) -> float:
    """Seconds by which the fleet's token-derived jitter moves this token's due time.

    Every replica (and a lone broker) derives it alike from the token (policy.fleet_jitter_sample).
    """
    token = TokenSet(access_token, "Bearer", issued_at=0.0, expires_at=lifetime)
    sample = policy.fleet_jitter_sample(token)
    return policy.refresh_due(token, refresh, sample) - policy.refresh_due(token, refresh, 0.0)


def paced_requests_per_lifetime(
    oauth: OAuthTestServer, since: float, until: float, lifetime: float, refresh: RefreshPolicy
) -> float:
    """Steady-state token requests per lifetime between `since` and `until`, net of the shared
    jitter (`until` excludes requests the teardown held up: stopping processes blocks the loop).

    Each interval between two answered requests loses the offset the token-derived jitter gave
    the token answered first. That offset is the same for one broker and a fleet, but it is
    drawn anew for every token, so it is most of the run-to-run noise of a raw rate (about
    1.5 % with 5 % jitter and 15 intervals); without it the rate is the policy's pace plus what
    the protocol adds, and a replica refreshing before the shared due time shows in full.
    """
    answered = [r for r in oauth.requests if r.status == 200]
    # The server answers one request at a time per grant: the k-th token answered the k-th 200.
    assert len(answered) == len(oauth.issued_tokens), "a token request and its answer went apart"
    pairs = list(zip(answered, oauth.issued_tokens, strict=True))
    intervals = [
        later.at - earlier.at - shared_jitter(token, lifetime, refresh)
        for (earlier, token), (later, _) in itertools.pairwise(pairs)
        if earlier.at >= since and later.at <= until
    ]
    if len(intervals) < 2:
        raise AssertionError(f"too few token requests to measure a pace: {len(intervals)}")
    return len(intervals) * lifetime / sum(intervals)


@dataclass
class FleetRun:
    """A fleet with its own OAuth server and Redis, so its token requests are counted apart."""

    name: str
    oauth: OAuthTestServer
    redis: RedisServer
    fleet: Fleet

    async def poll(self, seconds: float, interval: float = 0.1) -> FleetStats:
        """Poll every live replica (see Fleet.poll)."""
        return await self.fleet.poll(self.oauth, seconds, interval)


@dataclass
class RunSpec:
    """What `side_by_side` starts: `size` replicas, optional per-replica environments."""

    name: str
    size: int
    envs: Sequence[Mapping[str, str] | None] = ()


@contextlib.asynccontextmanager
async def side_by_side(
    root: Path,
    lifetime: float,
    specs: Sequence[RunSpec],
    app_overrides: Mapping[str, Any] | None = None,
    ready_timeout: float = 60.0,
    rotating: Mapping[str, Any] | None = None,
) -> AsyncIterator[dict[str, FleetRun]]:
    """Start several fleets at once (e.g. one broker and its N-replica fleet), each apart.

    Run together, they see the same schedule and the same machine load, so their token requests
    compare fairly. Every process and port is stopped on exit, whatever happens.

    `rotating` (refresh-policy overrides) makes app1 an authorization-code grant whose refresh
    token the OAuth server rotates on every use: each run's grant is onboarded with `token-broker
    authorize` into its Redis, as an operator does, before its replicas start.
    """
    oauths: list[OAuthTestServer] = []
    redises: list[RedisServer] = []
    runs: dict[str, FleetRun] = {}
    try:
        for spec in specs:
            oauth = OAuthTestServer(lifetime=lifetime)
            oauths.append(oauth)
            await oauth.start()
            redis = RedisServer(directory=root / spec.name / "redis")
            redises.append(redis)
            redis.start()
            apps = {"app1": ac_app(oauth, **rotating)} if rotating is not None else None
            if apps is not None:
                seed = BrokerFiles(
                    directory=root / spec.name / "seed",
                    token_url=oauth.token_url,
                    store_url=redis.url,
                    apps=apps,
                )
                await authorize_via_code(seed.write(), oauth)
            fleet = Fleet(
                root / spec.name,
                oauth.token_url,
                redis.url,
                spec.size,
                app_overrides=app_overrides,
                envs=spec.envs,
                apps=apps,
            )
            runs[spec.name] = FleetRun(spec.name, oauth, redis, fleet)
        for run in runs.values():
            for replica in run.fleet.replicas:
                replica.process.start()
        for run in runs.values():
            for replica in run.fleet.replicas:
                await replica.process.wait_ready(replica.files.metrics, ready_timeout)
        yield runs
    finally:
        # Every part is stopped even when one fails to stop; the first failure is raised after.
        failures: list[AssertionError] = []
        for run in runs.values():
            try:
                await run.fleet.stop_async()
            except AssertionError as exc:
                failures.append(exc)
        for oauth in oauths:
            await oauth.stop()
        for redis in redises:
            redis.stop()
        if failures:
            raise failures[0]
