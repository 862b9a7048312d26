"""Several broker processes sharing one store: the fleet, and a poller that checks every answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.broker_process import BrokerFiles, BrokerProcess
from tests.support.oauth_server import OAuthTestServer


@dataclass
class Replica:
    """One broker process and its config directory."""

    files: BrokerFiles
    process: BrokerProcess


@dataclass
class FleetStats:
    """What polling the fleet saw."""

    ok: int = 0
    unavailable: int = 0
    server_errors: int = 0
    expired: int = 0
    other: list[int] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)


class Fleet:
    """N replicas of `python -m broker serve`, same apps, same store."""

    def __init__(
        self,
        root: Path,
        token_url: str,
        store_url: str,
        size: int,
        app_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.replicas: list[Replica] = []
        for i in range(size):
            files = BrokerFiles(
                directory=root / f"replica-{i}",
                token_url=token_url,
                store_url=store_url,
                app_overrides=app_overrides or {},
            )
            config = files.write()
            self.replicas.append(Replica(files, BrokerProcess(config, root / f"replica-{i}.log")))

    async def start(self) -> None:
        """Start every replica and wait until each is ready; on any failure, stop them all."""
        try:
            for replica in self.replicas:
                replica.process.start()
            for replica in self.replicas:
                await replica.process.wait_ready(replica.files.metrics)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM every replica still running, then wait for all (killing any that hang)."""
        for replica in self.replicas:
            replica.process.signal_stop()
        failures = []
        for replica in self.replicas:
            try:
                replica.process.wait_stopped()
            except AssertionError as exc:
                failures.append(str(exc))
        if failures:
            raise AssertionError("; ".join(failures))

    def alive(self) -> list[Replica]:
        """Replicas whose process is running."""
        return [r for r in self.replicas if r.process.process and r.process.process.poll() is None]

    async def poll(
        self, oauth: OAuthTestServer, seconds: float, interval: float = 0.1
    ) -> FleetStats:
        """Ask every live replica for a token every `interval` for `seconds`; check each answer."""
        stats = FleetStats()
        deadline = time.monotonic() + seconds
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                for replica in self.alive():
                    try:
                        async with session.get(
                            f"{replica.files.api}/v1/token/app1", headers=replica.files.auth
                        ) as response:
                            body = await response.json()
                            status = response.status
                    except aiohttp.ClientError:
                        continue  # a replica the test just killed
                    if status == 200:
                        stats.ok += 1
                        stats.tokens.add(body["access_token"])
                        if oauth.expiry[body["access_token"]] <= time.time():
                            stats.expired += 1
                    elif status == 503:
                        stats.unavailable += 1
                    elif status >= 500:
                        stats.server_errors += 1
                    else:
                        stats.other.append(status)
                await asyncio.sleep(interval)
        return stats
