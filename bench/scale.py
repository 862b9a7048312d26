"""Scale: one broker with 1 to 1000 apps, and fleets of 1 to 30 replicas on one Redis.

Run: `python bench/scale.py` (five to eight minutes on a 2-core machine; `--apps 1 10 --replicas 1
10 --idle-seconds 3 --fleet-seconds 16` for a quick look). Real processes throughout: `redis-server` on loopback,
the dev OAuth server in a child process (it counts token requests), and `python -m broker
serve` brokers (`--python` picks the interpreter, e.g. a runtime-only venv). `--baseline DIR` also
runs the broker of another source tree (a checkout of main, say) in the same run, alternating
with this one, and prints both (`--compare PYTHON` does so with another interpreter's install).

Per app count, one broker against a fresh Redis:
- cold start (fetches every token), then a warm restart: time from process start to /readyz 200,
  and the token requests the warm restart made (0 when every token comes from Redis);
- idle resident memory and idle CPU per minute, after the warm restart settled;
- one /metrics scrape after the cold start, every app refreshed and served once: its series
  and bytes, the broker's CPU for it, the event loop's time for it (the CPU time of the
  broker's main thread, which runs the loop, over one scrape: the longest of 20), and the
  longest a token request waited while scrapes ran (a probe asks for a token back-to-back
  throughout), beside the longest wait with no scrape;
- Redis connections the broker holds (CLIENT LIST, matched to the broker's own sockets).

Per replica count, a fleet sharing one Redis, apps whose tokens live a few seconds: Redis
commands per token request (INFO commandstats over the window, divided by the token requests
the fleet made), connected clients, and the fleet's CPU per minute.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import (
    cpu_seconds,
    free_port,
    oauth_count,
    rss_mib,
    start_oauth_child,
    stop,
    wait_ready,
)
from tests.support.redis_server import RedisServer

CLIENT_ID = "bench"
SECRET = "bench-secret-0123456789abcdef"
CLIENT_KEY = "bench-client-key-" + "k" * 32
STORE_KEY = "k1 MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n"
CPU_SCRAPES = 20


@dataclass
class Broker:
    """One `broker serve` process and its ports."""

    process: subprocess.Popen[bytes]
    api: int
    metrics: int
    started_at: float


@dataclass
class AppsRow:
    """The figures for one app count."""

    apps: int
    memory_rss_mib: float = 0.0
    memory_ready_s: float = 0.0
    ready_s: float = 0.0
    warm_token_requests: int = 0
    idle_rss_mib: float = 0.0
    idle_cpu_s_per_min: float = 0.0
    scrape_series: int = 0
    scrape_kib: float = 0.0
    scrape_cpu_ms: float = 0.0
    scrape_loop_ms: float = 0.0
    stall_ms: float = 0.0
    stall_without_scrape_ms: float = 0.0
    redis_connections: int = 0
    build: str = ""  # whose broker ran (with --baseline or --compare, one of two)


@dataclass
class FleetRow:
    """The figures for one replica count."""

    replicas: int
    token_requests: int = 0
    redis_commands: int = 0
    commands_per_token_request: float = 0.0
    connected_clients: int = 0
    fleet_cpu_s_per_min: float = 0.0
    commands: dict[str, int] = field(default_factory=dict)
    build: str = ""  # whose broker ran (with --baseline or --compare, one of two)


@dataclass(frozen=True)
class Build:
    """Whose broker a run starts: an interpreter, with its own install of the broker or, with
    `tree`, that source tree's."""

    python: str
    tree: Path | None = None

    @property
    def label(self) -> str:
        """How the tables name it."""
        return str(self.tree) if self.tree is not None else self.python


def write_config(
    directory: Path, apps: int, token_url: str, store_url: str, refresh: dict[str, Any]
) -> tuple[Path, int, int]:
    """A serve config with `apps` apps and one client allowed them all; (path, api, metrics)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "secret").write_text(SECRET)
    (directory / "client.key").write_text(CLIENT_KEY)
    (directory / "store.key").write_text(STORE_KEY)
    names = [f"app{i:04d}" for i in range(apps)]
    spec: dict[str, Any] = {
        "token_url": token_url,
        "client_id": CLIENT_ID,
        "client_secret_file": "secret",
    }
    if refresh:
        spec["refresh"] = refresh
    api, metrics = free_port(), free_port()
    store = {"url": store_url, "key_prefix": "bench"}
    if not store_url.startswith("memory://"):
        store["encryption_key_file"] = "store.key"
    config = {
        "server": {"listen": f"127.0.0.1:{api}", "metrics_listen": f"127.0.0.1:{metrics}"},
        "store": store,
        "apps": {name: spec for name in names},
        "clients": {"svc": {"key_file": "client.key", "apps": names}},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, api, metrics


def start_broker(build: Build, config: Path, api: int, metrics: int, log: Path) -> Broker:
    """`python -m broker serve` on `config` (asyncio's loop, so runs compare like for like)."""
    env = {**os.environ, "TOKEN_BROKER_EVENT_LOOP": "asyncio"}
    env.pop("PYTHONPATH", None)  # the interpreter's own install of the broker...
    if build.tree is not None:
        env["PYTHONPATH"] = str(build.tree)  # ...or that tree's
    started = time.monotonic()
    proc = subprocess.Popen(
        [build.python, "-m", "broker", "serve", "--config", str(config)],
        cwd=config.parent,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    return Broker(proc, api, metrics, started)


def sigterm(broker: Broker) -> None:
    """Stop a broker gracefully."""
    if broker.process.poll() is None:
        broker.process.send_signal(signal.SIGTERM)
    try:
        broker.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        broker.process.kill()
        broker.process.wait(timeout=10)


def redis_command(port: int, *args: str) -> str:
    """One command over a raw socket (RESP); the reply's bulk text."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload.encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"$"):
                header, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(header[1:]) + 2:
                    return rest[: int(header[1:])].decode()
            elif data.endswith(b"\r\n"):
                return data.decode()
    return data.decode()


def commandstats(port: int) -> dict[str, int]:
    """calls per command from INFO commandstats."""
    stats: dict[str, int] = {}
    for line in redis_command(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            calls = dict(part.split("=") for part in rest.split(","))["calls"]
            stats[name.removeprefix("cmdstat_")] = int(calls)
    return stats


def connected_clients(port: int) -> int:
    """INFO clients' connected_clients (the bench's own connection excluded)."""
    for line in redis_command(port, "INFO", "clients").splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1]) - 1
    return 0


def local_ports_to(pid: int, remote_port: int) -> set[int]:
    """Local ports of `pid`'s TCP connections to 127.0.0.1:`remote_port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, inode = parts[1], parts[2], parts[9]
        if inode in inodes and int(remote.split(":")[1], 16) == remote_port:
            ports.add(int(local.split(":")[1], 16))
    return ports


def redis_connections_of(pid: int, redis_port: int) -> int:
    """Clients in Redis's CLIENT LIST whose address is one of `pid`'s sockets."""
    ports = local_ports_to(pid, redis_port)
    count = 0
    for line in redis_command(redis_port, "CLIENT", "LIST").splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if int(fields.get("addr", ":0").rpartition(":")[2]) in ports:
            count += 1
    return count


class Probe:
    """Asks the broker for a token back-to-back in a thread, recording each request's span."""

    def __init__(self, api: int, app: str) -> None:
        self._api = api
        self._app = app
        self.spans: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self._api, timeout=10)
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        while not self._stop.is_set():
            started = time.monotonic()
            connection.request("GET", f"/v1/token/{self._app}", headers=headers)
            response = connection.getresponse()
            response.read()
            self.spans.append((started, time.monotonic()))
            time.sleep(0.0005)
        connection.close()

    def longest(self, windows: list[tuple[float, float]]) -> float:
        """The longest request (ms) that overlapped any of `windows`."""
        worst = 0.0
        for start, end in self.spans:
            if any(start < w_end and end > w_start for w_start, w_end in windows):
                worst = max(worst, end - start)
        return worst * 1000


def ask_every_app(api: int, apps: int) -> None:
    """One token request per app, so every app has its request series."""
    connection = http.client.HTTPConnection("127.0.0.1", api, timeout=30)
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    try:
        for i in range(apps):
            connection.request("GET", f"/v1/token/app{i:04d}", headers=headers)
            connection.getresponse().read()
    finally:
        connection.close()


def scrape_once(port: int) -> bytes:
    """GET /metrics."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        return connection.getresponse().read()
    finally:
        connection.close()


def loop_thread_seconds(pid: int) -> float:
    """CPU time of the broker's main thread, which runs the event loop, in ns resolution.

    /proc/PID/task/PID/schedstat's first field is the time the thread spent on a CPU; unlike
    /proc/PID/stat's 10 ms ticks it can time one scrape.
    """
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9


def measure_scrapes(broker: Broker, first_app: str, scrapes: int) -> dict[str, float]:
    """Scrape `scrapes` times under the probe; CPU per scrape and the probe's longest waits."""
    pid = broker.process.pid
    body = scrape_once(broker.metrics)  # warm-up (and the figures of one exposition)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    # CPU over back-to-back scrapes: /proc counts in 10 ms ticks, so one scrape is too short.
    # The event loop's own time is read per scrape (the longest of them is reported): the
    # loop's thread spends it on the request and the rendering, and serves nothing meanwhile.
    before_cpu = cpu_seconds(pid)
    loop_times = []
    for _ in range(CPU_SCRAPES):
        before_loop = loop_thread_seconds(pid)
        scrape_once(broker.metrics)
        loop_times.append(loop_thread_seconds(pid) - before_loop)
    cpu = (cpu_seconds(pid) - before_cpu) / CPU_SCRAPES
    with Probe(broker.api, first_app) as probe:
        time.sleep(1.0)
        quiet = (time.monotonic(), time.monotonic() + 1.0)
        time.sleep(1.0)
        windows = []
        for _ in range(scrapes):
            before = time.monotonic()
            scrape_once(broker.metrics)
            windows.append((before, time.monotonic()))
            time.sleep(0.3)
    return {
        "series": series,
        "kib": len(body) / 1024,
        "cpu_ms": cpu * 1000,
        "loop_ms": max(loop_times) * 1000,
        "stall_ms": probe.longest(windows),
        "quiet_ms": probe.longest([quiet]),
    }


def measure_memory_store(args: argparse.Namespace, root: Path, row: AppsRow, build: Build) -> None:
    """A memory:// broker with the same apps: idle resident memory and time to ready."""
    oauth_port = free_port()
    oauth = start_oauth_child(oauth_port, CLIENT_ID, SECRET, 3600)
    broker: Broker | None = None
    try:
        token_url = f"http://127.0.0.1:{oauth_port}/token"
        config, api, metrics = write_config(root / "memory", row.apps, token_url, "memory://", {})
        broker = start_broker(build, config, api, metrics, root / "memory.log")
        row.memory_ready_s = wait_ready(metrics, timeout=300) - broker.started_at
        time.sleep(args.settle_seconds)
        row.memory_rss_mib = rss_mib(broker.process.pid)
    finally:
        if broker is not None:
            sigterm(broker)
        stop(oauth)


def measure_apps(args: argparse.Namespace, root: Path, apps: int, build: Build) -> AppsRow:
    """Cold start, warm restart, idle, scrapes and connections for `apps` apps."""
    row = AppsRow(apps, build=build.label)
    measure_memory_store(args, root, row, build)
    redis = RedisServer(directory=root / "redis")
    redis.start()
    oauth_port = free_port()
    oauth = start_oauth_child(oauth_port, CLIENT_ID, SECRET, 3600)
    broker: Broker | None = None
    try:
        token_url = f"http://127.0.0.1:{oauth_port}/token"
        config, api, metrics = write_config(root / "broker", apps, token_url, redis.url, {})
        log = root / "broker.log"
        cold = start_broker(build, config, api, metrics, log)
        wait_ready(metrics, timeout=300)
        # Steady state for the scrape: every app refreshed once and served once.
        ask_every_app(api, apps)
        scrape = measure_scrapes(cold, "app0000", args.scrapes)
        row.scrape_series = int(scrape["series"])
        row.scrape_kib = scrape["kib"]
        row.scrape_cpu_ms = scrape["cpu_ms"]
        row.scrape_loop_ms = scrape["loop_ms"]
        row.stall_ms = scrape["stall_ms"]
        row.stall_without_scrape_ms = scrape["quiet_ms"]
        sigterm(cold)
        before = oauth_count(oauth_port)
        broker = start_broker(build, config, api, metrics, log)
        row.ready_s = wait_ready(metrics, timeout=300) - broker.started_at
        time.sleep(args.settle_seconds)
        row.warm_token_requests = oauth_count(oauth_port) - before
        row.redis_connections = redis_connections_of(broker.process.pid, redis.port)
        idle_cpu = cpu_seconds(broker.process.pid)
        time.sleep(args.idle_seconds)
        row.idle_cpu_s_per_min = (
            (cpu_seconds(broker.process.pid) - idle_cpu) * 60 / args.idle_seconds
        )
        row.idle_rss_mib = rss_mib(broker.process.pid)
        row.redis_connections = max(
            row.redis_connections, redis_connections_of(broker.process.pid, redis.port)
        )
    finally:
        if broker is not None:
            sigterm(broker)
        stop(oauth)
        redis.stop()
    return row


def measure_fleet(args: argparse.Namespace, root: Path, replicas: int, build: Build) -> FleetRow:
    """`replicas` brokers on one Redis, short-lived tokens: Redis work per token request."""
    row = FleetRow(replicas, build=build.label)
    redis = RedisServer(directory=root / "redis")
    redis.start()
    oauth_port = free_port()
    oauth = start_oauth_child(oauth_port, CLIENT_ID, SECRET, args.fleet_lifetime)
    brokers: list[Broker] = []
    refresh = {"at_fraction": 0.75, "min_remaining": 1, "jitter": 0.05, "safety_margin": 1}
    try:
        token_url = f"http://127.0.0.1:{oauth_port}/token"
        for i in range(replicas):
            config, api, metrics = write_config(
                root / f"replica-{i}", args.fleet_apps, token_url, redis.url, refresh
            )
            brokers.append(start_broker(build, config, api, metrics, root / f"r{i}.log"))
        for broker in brokers:
            wait_ready(broker.metrics, timeout=300)
        time.sleep(args.fleet_lifetime)  # past the start-up: steady state from here
        stats, requests = commandstats(redis.port), oauth_count(oauth_port)
        cpu = {b.process.pid: cpu_seconds(b.process.pid) for b in brokers}
        time.sleep(args.fleet_seconds)
        after = commandstats(redis.port)
        row.token_requests = oauth_count(oauth_port) - requests
        row.commands = {
            name: calls - stats.get(name, 0)
            for name, calls in sorted(after.items())
            if calls - stats.get(name, 0) and not name.startswith("info")
        }
        row.redis_commands = sum(row.commands.values())
        row.commands_per_token_request = (
            row.redis_commands / row.token_requests if row.token_requests else float("nan")
        )
        row.connected_clients = connected_clients(redis.port)
        used = sum(cpu_seconds(pid) - before for pid, before in cpu.items())
        row.fleet_cpu_s_per_min = used * 60 / args.fleet_seconds
    finally:
        for broker in brokers:
            if broker.process.poll() is None:
                broker.process.send_signal(signal.SIGTERM)
        for broker in brokers:
            sigterm(broker)
        stop(oauth)
        redis.stop()
    return row


def print_tables(apps: list[AppsRow], fleet: list[FleetRow]) -> None:
    """Both tables, as Markdown."""
    print(
        "| apps | idle RSS MiB memory:// | ready s memory:// (cold) | idle RSS MiB redis:// "
        "| ready s redis:// (warm) | token requests on warm restart | idle CPU s/min "
        "| scrape series | scrape KiB | scrape CPU ms | event-loop time of one scrape ms "
        "| longest token wait during scrapes ms | (without scrapes) | Redis connections |"
    )
    print("|---:" * 14 + "|")
    two = len({r.build for r in apps}) > 1
    for r in apps:
        label = f" ({r.build})" if two else ""
        print(
            f"| {r.apps}{label} | {r.memory_rss_mib:.1f} | {r.memory_ready_s:.2f} "
            f"| {r.idle_rss_mib:.1f} | {r.ready_s:.2f} | {r.warm_token_requests} "
            f"| {r.idle_cpu_s_per_min:.2f} | {r.scrape_series} | {r.scrape_kib:.0f} "
            f"| {r.scrape_cpu_ms:.1f} | {r.scrape_loop_ms:.2f} | {r.stall_ms:.1f} "
            f"| {r.stall_without_scrape_ms:.1f} "
            f"| {r.redis_connections} |"
        )
    if not fleet:
        return
    print()
    print(
        "| replicas | token requests | Redis commands | commands per token request "
        "| connected clients | fleet CPU s/min |"
    )
    print("|---:" * 6 + "|")
    two = len({r.build for r in fleet}) > 1
    for f in fleet:
        label = f" ({f.build})" if two else ""
        print(
            f"| {f.replicas}{label} | {f.token_requests} | {f.redis_commands} "
            f"| {f.commands_per_token_request:.1f} | {f.connected_clients} "
            f"| {f.fleet_cpu_s_per_min:.2f} |"
        )
    for f in fleet:
        top = sorted(f.commands.items(), key=lambda kv: -kv[1])[:8]
        label = f" ({f.build})" if two else ""
        print(f"  {f.replicas} replicas{label}, commands: " + ", ".join(f"{k} {v}" for k, v in top))


def print_comparison(
    apps: list[AppsRow], fleet: list[FleetRow], before: Build, after: Build
) -> None:
    """The main figures of two builds, measured alternately in one run: `before / after`."""
    print()
    print(f"before: {before.label}")
    print(f"after: {after.label}")
    apps_figures = {
        "idle RSS MiB redis://": "idle_rss_mib",
        "ready s (warm)": "ready_s",
        "idle CPU s/min": "idle_cpu_s_per_min",
        "scrape CPU ms": "scrape_cpu_ms",
    }
    fleet_figures = {
        "commands per token request": "commands_per_token_request",
        "token requests": "token_requests",
        "fleet CPU s/min": "fleet_cpu_s_per_min",
    }
    for rows, count, figures in ((apps, "apps", apps_figures), (fleet, "replicas", fleet_figures)):
        print()
        print(f"| {count} | " + " | ".join(f"{name}, before / after" for name in figures) + " |")
        print("|---:" * (len(figures) + 1) + "|")
        for n in dict.fromkeys(getattr(r, count) for r in rows):
            by = {r.build: r for r in rows if getattr(r, count) == n}
            cells = [
                f"{getattr(by[before.label], f):.2f} / {getattr(by[after.label], f):.2f}"
                for f in figures.values()
            ]
            print(f"| {n} | " + " | ".join(cells) + " |")


def main() -> int:
    """Run both parts and print the tables (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python", default=sys.executable, help="interpreter running brokers")
    parser.add_argument("--apps", type=int, nargs="*", default=[1, 10, 100, 1000])
    parser.add_argument("--replicas", type=int, nargs="*", default=[1, 10, 30])
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--settle-seconds", type=float, default=2.0)
    parser.add_argument("--scrapes", type=int, default=5)
    parser.add_argument("--fleet-apps", type=int, default=5)
    parser.add_argument("--fleet-lifetime", type=float, default=8.0, help="token lifetime, s")
    parser.add_argument("--fleet-seconds", type=float, default=24.0)
    parser.add_argument("--json", action="store_true")
    before = parser.add_mutually_exclusive_group()
    before.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run the broker of this source tree (e.g. a checkout of main) on --python, "
        "alternating with this one under the same load, and print both (before: DIR)",
    )
    before.add_argument(
        "--compare",
        metavar="PYTHON",
        help="also run on this interpreter's install of the broker, alternating with --python "
        "under the same load, and print both (before: PYTHON, after: --python)",
    )
    args = parser.parse_args()
    after = Build(args.python)
    baseline = (
        Build(args.python, args.baseline.resolve())
        if args.baseline is not None
        else Build(args.compare)
        if args.compare
        else None
    )
    builds = [baseline, after] if baseline is not None else [after]

    apps_rows: list[AppsRow] = []
    fleet_rows: list[FleetRow] = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        root = Path(tmp)
        for count in args.apps:
            for n, build in enumerate(builds):
                apps_rows.append(measure_apps(args, root / f"apps-{count}-{n}", count, build))
                print(f"# {count} apps done ({build.label})", file=sys.stderr, flush=True)
        for count in args.replicas:
            for n, build in enumerate(builds):
                fleet_rows.append(measure_fleet(args, root / f"fleet-{count}-{n}", count, build))
                print(f"# {count} replicas done ({build.label})", file=sys.stderr, flush=True)
    if args.json:
        print(
            json.dumps(
                {"apps": [a.__dict__ for a in apps_rows], "fleet": [f.__dict__ for f in fleet_rows]}
            )
        )
    else:
        print(f"interpreter: {args.python}")
        print_tables(apps_rows, fleet_rows)
        if baseline is not None:
            print_comparison(apps_rows, fleet_rows, baseline, after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
