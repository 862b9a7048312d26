"""The hot path: CPU per request of `GET /v1/token/{app}` against a bare aiohttp app, same run.

Run: `python bench/api_bench.py [--rounds 5] [--seconds 5]` (needs `wrk` and `taskset`). The load
generator is pinned to core 0 and every server to core 1, so the two never share a core. Servers:

- `broker`: `token-broker serve` (memory://, one app, one client), on the default asyncio loop;
- `broker-uvloop`: the same under uvloop (the `fast` extra), when uvloop is installed;
- `bare`: an aiohttp `web.Application` whose one route returns a prebuilt body of the same size
  and the same headers as the broker's answer;
- `bare-uvloop`: the bare app under uvloop;
- `baseline` (with `--baseline DIR`): the broker of another source tree (a checkout of main,
  say) on the asyncio loop, in the same rounds, for a before/after figure from one run.

Throughput on a shared machine swings from run to run, so the steady figure is each server's own
CPU time per request (utime + stime from /proc/PID/stat over the requests wrk completed). Rounds
alternate between the servers (`wrk -t1 -c20`, one after the other), and the ratios are taken
within each round: `broker / bare` at or below 1.0 means the broker costs no more than the bare
app.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import (
    DEMO_CLIENT_KEY,
    DEMO_SECRET,
    REPO,
    cpu_seconds,
    free_port,
    start_oauth_child,
    stop,
    wait_port,
    wait_ready,
    write_demo_config,
)

LOAD_CORE = "0"
SERVER_CORE = "1"
CLIENT_KEY = DEMO_CLIENT_KEY

BARE_SERVER = textwrap.dedent(
    """
    import sys
    from aiohttp import web
    size, port, loop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if loop == "uvloop":
        import uvloop
        uvloop.install()
    prefix, suffix = b'{"access_token": "', b'", "token_type": "Bearer"}'
    BODY = prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix
    HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache",
               "Content-Type": "application/json"}
    async def token(request):
        return web.Response(body=BODY, headers=HEADERS)
    app = web.Application()
    app.router.add_get("/v1/token/{app}", token)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
    """
)


@dataclass
class Round:
    """One wrk run against one server."""

    requests: int
    rps: float
    p99_ms: float
    cpu_us_per_request: float


@dataclass
class Server:
    """A server under test: its process and the URL wrk loads."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    key: str | None


def run_wrk(server: Server, connections: int, seconds: int) -> Round:
    """Load `server` with a pinned `wrk -t1`; its CPU per completed request, rps and p99."""
    argv = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    argv += ["--latency", server.url]
    if server.key:
        argv[5:5] = ["-H", f"Authorization: Bearer {server.key}"]
    before = cpu_seconds(server.process.pid)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    used = cpu_seconds(server.process.pid) - before
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"{server.name}: errors during the load:\n{out}")
    requests = int(_find(r"(\d+) requests in", out))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    assert p99 is not None, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return Round(
        requests=requests,
        rps=float(_find(r"Requests/sec:\s+([\d.]+)", out)),
        p99_ms=float(p99.group(1)) * scale,
        cpu_us_per_request=used / requests * 1e6,
    )


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"no {pattern!r} in wrk's output:\n{text}")
    return match.group(1)


def pinned(argv: list[str]) -> list[str]:
    """`argv` pinned to the server core."""
    return ["taskset", "-c", SERVER_CORE, *argv]


def start_broker(
    workdir: Path, oauth_port: int, loop: str, tree: Path = REPO, name: str = ""
) -> tuple[subprocess.Popen[bytes], str]:
    """`token-broker serve` from source `tree` with one app on memory://, pinned; returns it
    and its token URL."""
    directory = workdir / (name or f"broker-{loop}")
    directory.mkdir()
    api, metrics = free_port(), free_port()
    write_demo_config(directory, oauth_port, f"127.0.0.1:{api}", f"127.0.0.1:{metrics}")
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKEN_BROKER_EVENT_LOOP": loop}
    proc = subprocess.Popen(
        pinned([sys.executable, "-m", "broker", "serve", "--config", "config.yaml"]),
        cwd=directory,
        env=env,
        stdout=(directory / "broker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_ready(metrics)
    return proc, f"http://127.0.0.1:{api}/v1/token/demo"


def start_bare(size: int, loop: str) -> tuple[subprocess.Popen[bytes], str]:
    """The bare aiohttp app answering `size` bytes, pinned; returns it and its URL."""
    port = free_port()
    proc = subprocess.Popen(pinned([sys.executable, "-c", BARE_SERVER, str(size), str(port), loop]))
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}/v1/token/demo"


def body_size(url: str, key: str) -> int:
    """Length of the broker's token answer."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return len(response.read())


def has_uvloop() -> bool:
    """True when uvloop can be imported by the servers' interpreter."""
    probe = subprocess.run(
        [sys.executable, "-c", "import uvloop"], capture_output=True, check=False
    )
    return probe.returncode == 0


def summarize(rounds: dict[str, list[Round]]) -> dict[str, object]:
    """Medians per server, and the per-round ratios against the bare app."""
    report: dict[str, object] = {}
    for name, runs in rounds.items():
        report[name] = {
            "cpu_us_per_request": round(statistics.median(r.cpu_us_per_request for r in runs), 1),
            "rps": round(statistics.median(r.rps for r in runs)),
            "p99_ms": round(statistics.median(r.p99_ms for r in runs), 3),
        }
    bare = rounds["bare"]
    ratios: dict[str, object] = {}
    for name, runs in rounds.items():
        if name == "bare":
            continue
        cpu = [r.cpu_us_per_request / b.cpu_us_per_request for r, b in zip(runs, bare, strict=True)]
        rps = [r.rps / b.rps for r, b in zip(runs, bare, strict=True)]
        ratios[f"{name}/bare"] = {
            "cpu_per_request": _spread(cpu),
            "throughput": _spread(rps),
            "cpu_per_round": [round(value, 3) for value in cpu],
        }
    report["ratios"] = ratios
    return report


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main() -> int:
    """Start every server, run the alternating rounds, print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another source tree (e.g. a checkout of main) whose broker runs in the same rounds",
    )
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"need {tool} on PATH", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("need two cores: the load and the server are pinned apart", file=sys.stderr)
        return 2

    loops = ["asyncio", "uvloop"] if has_uvloop() else ["asyncio"]
    servers: list[Server] = []
    oauth_port = free_port()
    oauth = start_oauth_child(oauth_port, "bench", DEMO_SECRET, 3600)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            size = 0
            for loop in loops:
                proc, url = start_broker(Path(tmp), oauth_port, loop)
                name = "broker" if loop == "asyncio" else "broker-uvloop"
                servers.append(Server(name, proc, url, CLIENT_KEY))
                size = body_size(url, CLIENT_KEY)
            if args.baseline is not None:
                proc, url = start_broker(
                    Path(tmp), oauth_port, "asyncio", args.baseline.resolve(), "baseline"
                )
                servers.append(Server("baseline", proc, url, CLIENT_KEY))
            for loop in loops:
                proc, url = start_bare(size, loop)
                servers.append(
                    Server("bare" if loop == "asyncio" else "bare-uvloop", proc, url, None)
                )
            for server in servers:  # warm-up: connections, caches, the first token.issued line
                run_wrk(server, args.connections, 1)
            rounds: dict[str, list[Round]] = {s.name: [] for s in servers}
            for _ in range(args.rounds):
                for server in servers:
                    rounds[server.name].append(run_wrk(server, args.connections, args.seconds))
    finally:
        for server in servers:
            stop(server.process)
        stop(oauth)

    report = summarize(rounds)
    report["setup"] = {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "connections": args.connections,
        "body_bytes": size,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"wrk -t1 -c{args.connections}, {args.seconds:g} s per run, {args.rounds} alternating "
        f"rounds; load on core {LOAD_CORE}, servers on core {SERVER_CORE}; body {size} bytes"
    )
    print(f"{'server':16} {'CPU µs/req':>11} {'req/s':>9} {'p99 ms':>8}   (medians)")
    for name in rounds:
        row = report[name]
        assert isinstance(row, dict)
        print(f"{name:16} {row['cpu_us_per_request']:11.1f} {row['rps']:9d} {row['p99_ms']:8.3f}")
    print("ratios within each round (median [min-max]); CPU below 1.0 = cheaper than bare")
    ratios = report["ratios"]
    assert isinstance(ratios, dict)
    for name, ratio in ratios.items():
        cpu, rps = ratio["cpu_per_request"], ratio["throughput"]
        print(
            f"  {name:22} CPU/req {cpu['median']:.3f} [{cpu['min']:.3f}-{cpu['max']:.3f}]"
            f"   throughput {rps['median']:.3f} [{rps['min']:.3f}-{rps['max']:.3f}]"
        )
        print(
            f"  {'':22} CPU/req per round: {' '.join(f'{v:.3f}' for v in ratio['cpu_per_round'])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
