"""The injecting proxy against a real peer: the same upstream direct, through nginx, through the broker.

Run: `python bench/proxy_bench.py [--rounds 3] [--seconds 5] [--baseline DIR]` (needs `wrk`,
`taskset`, Debian's `nginx` on PATH and the test extra for `trustme`; uvloop for the goal's loop).

One run starts, as separate processes on this machine:

- the upstream: an nginx over TLS (certificate from a throwaway trustme CA) that answers a
  200-byte JSON body to a request bearing `Authorization: Bearer ...`, and 401 otherwise. It is
  nginx, not Python, so that the upstream is never what limits a proxy;
- `nginx`: a second nginx, one worker, that proxies `/v1/proxy/bench/` to that upstream over a
  kept-alive TLS pool with a static `Authorization: Bearer <the app's token>` header: the floor
  for "a proxy that adds a header";
- `broker`: `token-broker serve` of this tree, whose app `bench` proxies to the same upstream
  (`/v1/proxy/bench/...`) on the API's proxy route (aiohttp's server and client), on uvloop
  (`--loop asyncio` for asyncio's loop);
- `listener`: the same broker process's proxy listener (`server.proxy_listen`, the lean data
  path of broker/api/proxy_listener.py: asyncio protocols and httptools), same app, same pool
  settings: the before (`broker`) and after (`listener`) of one process in one run;
- `aiohttp`: the floor of the broker's own stack, a bare aiohttp `web.Server` whose one
  handler sends the request upstream through one `ClientSession` (the same pool settings as
  the broker's) with the static header and answers the body read whole: what the broker costs
  beyond the HTTP server and client it is built on;
- `baseline` (with `--baseline DIR`): the broker of another source tree (a checkout of main,
  say) on the same loop, in the same rounds, for a before/after figure from one command.

The load (`wrk -t1`) and the upstream are pinned to core 0, each proxy under test to core 1
(`taskset`), so a proxy has one core to itself, as the goal reads ("on one core"). Scenarios:
`GET` at 1 and at 50 connections, and `POST` of a 1 KiB JSON body at 50. Each round loads every
target once per scenario, one after the other; ratios and added latencies are taken within a
round (`p50(target) - p50(direct)`), and the report gives the median and the spread over rounds.

Throughput behind a proxy is capped by the proxy's core, but also by core 0 (wrk and the
upstream) once the proxy is fast: nginx's req/s may be the load's limit rather than its own.
So each proxy's own CPU time per request (utime + stime from /proc over the requests wrk
completed) is reported too: `nginx CPU / broker CPU` is the throughput ratio the two would have
if each saturated its core.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import trustme
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import REPO, cpu_seconds, free_port, start_oauth_child, stop, wait_port, wait_ready

LOAD_CORE = "0"  # wrk and the upstream
PROXY_CORE = "1"  # the proxy under test, alone
CLIENT_KEY = "bench-client-key-" + "b" * 32
SECRET = "bench-secret-0123456789abcdef"
# The upstream's answer: 200 bytes of JSON, as an API's small read.
BODY = json.dumps({"id": "1", "name": "widget", "tags": ["a", "b", "c"], "description": "x" * 120})
REQUEST_BODY = json.dumps({"name": "widget", "description": "y" * 1000})

# Shared by both nginx configs: one worker, no access log, temp files under the run's directory.
NGINX_COMMON = """\
worker_processes 1;
daemon off;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
{server}
}}
"""

UPSTREAM_SERVER = """\
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        default_type application/json;
        client_body_buffer_size 16k;
        location /v1/items/ {{
            if ($http_authorization !~ "^Bearer ") {{
                return 401 '{{"error": "invalid_token"}}';
            }}
            return 200 '{body}';
        }}
    }}
"""

# proxy_pass with a URI: /v1/proxy/bench/<rest> goes upstream as /<rest>, as the broker maps it.
PROXY_SERVER = """\
    upstream api {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_body_buffer_size 16k;
        location /v1/proxy/bench/ {{
            proxy_pass https://api/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{upstream_port};
            proxy_set_header Authorization "Bearer {token}";
            proxy_ssl_trusted_certificate {dir}/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
        }}
    }}
"""

BARE_PROXY = """\
import ssl, sys
import aiohttp
from aiohttp import web
port, upstream, ca_file, token, loop = sys.argv[1:6]
if loop == "uvloop":
    import uvloop
    uvloop.install()
DROP = {"host", "authorization", "connection", "content-length"}

async def handle(request):
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
    headers["Authorization"] = "Bearer " + token
    url = upstream + request.raw_path[len("/v1/proxy/bench"):]
    data = await request.read() if request.body_exists else None
    async with session.request(
        request.method, url, headers=headers, data=data, allow_redirects=False
    ) as answer:
        body = await answer.read()
        return web.Response(body=body, status=answer.status, headers={
            "Content-Type": answer.headers.get("Content-Type", "application/octet-stream")})

async def main():
    global session
    context = ssl.create_default_context(cafile=ca_file)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64, ssl=context), auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=30),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar())
    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(port)).start()
    await asyncio.Event().wait()

import asyncio
asyncio.run(main())
"""

POST_SCRIPT = """\
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""


@dataclass(frozen=True)
class Scenario:
    """One load shape: method (GET, or POST of REQUEST_BODY) and concurrent connections."""

    name: str
    connections: int
    post: bool = False


SCENARIOS = {
    "get-c1": Scenario("get-c1", 1),
    "get-c50": Scenario("get-c50", 50),
    "post1k-c50": Scenario("post1k-c50", 50, post=True),
}


@dataclass
class Target:
    """Where wrk sends the load: a URL, the header it carries, and the process that serves it."""

    name: str
    url: str
    authorization: str
    process: subprocess.Popen[bytes]


@dataclass
class Run:
    """What one wrk run measured."""

    rps: float
    p50_us: float
    p99_us: float
    cpu_us_per_request: float


def _us(value: str, unit: str) -> float:
    return float(value) * {"us": 1.0, "ms": 1000.0, "s": 1e6}[unit]


def _find(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"no {pattern!r} in wrk's output:\n{text}")
    return match


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and its children (nginx's master and its worker)."""
    total = cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        total += cpu_seconds(int(child))
    return total


def run_wrk(target: Target, scenario: Scenario, seconds: float, workdir: Path) -> Run:
    """Load `target` with a pinned `wrk -t1`: req/s, p50, p99, and the server's CPU per request."""
    argv = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{scenario.connections}"]
    argv += [f"-d{seconds:g}s", "--latency", "-H", f"Authorization: {target.authorization}"]
    if scenario.post:
        script = workdir / "post.lua"
        script.write_text(POST_SCRIPT.format(body=REQUEST_BODY))
        argv += ["-s", str(script)]
    argv.append(target.url)
    before = tree_cpu_seconds(target.process.pid)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    used = tree_cpu_seconds(target.process.pid) - before
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"{target.name}: errors during the load:\n{out}")
    requests = int(_find(r"(\d+) requests in", out).group(1))
    p50 = _find(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    p99 = _find(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    return Run(
        rps=float(_find(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        p50_us=_us(p50.group(1), p50.group(2)),
        p99_us=_us(p99.group(1), p99.group(2)),
        cpu_us_per_request=used / requests * 1e6,
    )


def start_nginx(workdir: Path, name: str, server: str, core: str) -> subprocess.Popen[bytes]:
    """Debian's nginx in the foreground (a child of this process) with a generated config."""
    directory = workdir / name
    directory.mkdir()
    config = directory / "nginx.conf"
    config.write_text(NGINX_COMMON.format(dir=directory, server=server))
    argv = ["taskset", "-c", core, "nginx", "-p", str(directory), "-c", str(config)]
    # -e: the startup error log too goes to the run's directory, not /var/log/nginx.
    return subprocess.Popen([*argv, "-e", str(directory / "error.log")])


def write_broker_config(directory: Path, oauth_port: int, upstream_port: int, tree: Path) -> Path:
    """A serve config: app `bench` against the OAuth child, proxied to the upstream (and a
    proxy listener when the tree has one)."""
    (directory / "secret").write_text(SECRET)
    (directory / "client.key").write_text(CLIENT_KEY)
    server = {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
    }
    if (tree / "broker" / "api" / "proxy_listener.py").exists():
        server["proxy_listen"] = f"127.0.0.1:{free_port()}"
    config = {
        "server": server,
        "store": {"url": "memory://"},
        "apps": {
            "bench": {
                "token_url": f"http://127.0.0.1:{oauth_port}/token",
                "client_id": "bench",
                "client_secret_file": "secret",
                "proxy": {
                    "upstream": f"https://127.0.0.1:{upstream_port}",
                    "ca_file": str(directory.parent / "ca.pem"),
                    "path_prefixes": ["/v1/"],
                    "max_concurrent": 64,
                },
            }
        },
        "clients": {"svc": {"key_file": "client.key", "apps": ["bench"]}},
    }
    if (tree / "broker" / "egress.py").exists():
        # The bench API is on loopback, which the egress guard refuses unless the app allows
        # it; a tree without the guard (an older baseline) would refuse the unknown key.
        proxy = config["apps"]["bench"]["proxy"]  # type: ignore[index]
        proxy["allowed_networks"] = ["127.0.0.0/8"]
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_broker(
    workdir: Path, name: str, tree: Path, loop: str, oauth_port: int, upstream_port: int
) -> tuple[subprocess.Popen[bytes], str, str | None]:
    """`token-broker serve` from source `tree`, pinned to the proxy core; returns it, its API
    and its proxy listener (None for a tree without one)."""
    directory = workdir / name
    directory.mkdir()
    config = write_broker_config(directory, oauth_port, upstream_port, tree)
    server = yaml.safe_load(config.read_text())["server"]
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKEN_BROKER_EVENT_LOOP": loop}
    process = subprocess.Popen(
        ["taskset", "-c", PROXY_CORE, sys.executable, "-m", "broker", "serve", "--config", config],
        cwd=directory,
        env=env,
        stdout=(directory / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(int(server["metrics_listen"].rsplit(":", 1)[1]))
    except RuntimeError:
        stop(process)
        log = (directory / "serve.log").read_text()[-2000:]
        raise RuntimeError(f"the {name} broker did not get ready; its log ends:\n{log}") from None
    listener = server.get("proxy_listen")
    return process, f"http://{server['listen']}", f"http://{listener}" if listener else None


def fetch_token(api: str) -> str:
    """The app's current access token, from a broker's token API."""
    request = urllib.request.Request(
        f"{api}/v1/token/bench", headers={"Authorization": f"Bearer {CLIENT_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        token: str = json.load(response)["access_token"]
        return token


def measure(
    args: argparse.Namespace, workdir: Path, scenarios: list[Scenario]
) -> dict[str, dict[str, list[Run]]]:
    """Start every process, run the rounds, stop every process; the runs per scenario and target."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    # "localhost" for nginx, which checks a DNS name; the broker connects to 127.0.0.1.
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
    cert.private_key_pem.write_to_path(str(workdir / "key.pem"))
    processes: list[subprocess.Popen[bytes]] = []
    oauth_port, upstream_port, nginx_port = free_port(), free_port(), free_port()
    try:
        processes.append(start_oauth_child(oauth_port, "bench", SECRET, 3600))
        upstream_server = UPSTREAM_SERVER.format(port=upstream_port, dir=workdir, body=BODY)
        upstream = start_nginx(workdir, "upstream", upstream_server, LOAD_CORE)
        processes.append(upstream)
        wait_port(upstream_port)
        brokers = [("broker", REPO)]
        if args.baseline is not None:
            brokers.append(("baseline", args.baseline.resolve()))
        targets: list[Target] = []
        token = ""
        for name, tree in brokers:
            process, api, listener = start_broker(
                workdir, name, tree, args.loop, oauth_port, upstream_port
            )
            processes.append(process)
            token = fetch_token(api)
            targets.append(
                Target(name, f"{api}/v1/proxy/bench/v1/items/1", f"Bearer {CLIENT_KEY}", process)
            )
            if listener is not None:
                targets.append(
                    Target(
                        "listener" if name == "broker" else f"{name}-listener",
                        f"{listener}/v1/proxy/bench/v1/items/1",
                        f"Bearer {CLIENT_KEY}",
                        process,
                    )
                )
        bare_port = free_port()
        bare = subprocess.Popen(
            [
                *("taskset", "-c", PROXY_CORE, sys.executable, "-c", BARE_PROXY, str(bare_port)),
                *(f"https://127.0.0.1:{upstream_port}", str(workdir / "ca.pem"), token, args.loop),
            ]
        )
        processes.append(bare)
        wait_port(bare_port)
        targets.insert(
            0,
            Target(
                "aiohttp",
                f"http://127.0.0.1:{bare_port}/v1/proxy/bench/v1/items/1",
                f"Bearer {CLIENT_KEY}",
                bare,
            ),
        )
        proxy_server = PROXY_SERVER.format(
            port=nginx_port, upstream_port=upstream_port, dir=workdir, token=token
        )
        nginx = start_nginx(workdir, "nginx", proxy_server, PROXY_CORE)
        processes.append(nginx)
        wait_port(nginx_port)
        targets.insert(
            0,
            Target("nginx", f"http://127.0.0.1:{nginx_port}/v1/proxy/bench/v1/items/1", "", nginx),
        )
        targets.insert(
            0,
            Target(
                "direct",
                f"https://127.0.0.1:{upstream_port}/v1/items/1",
                f"Bearer {token}",
                upstream,
            ),
        )
        for target in targets:
            if not target.authorization:  # nginx adds the token; wrk's header is the caller's
                target.authorization = f"Bearer {CLIENT_KEY}"
        for target in targets:  # warm-up: pools, caches, the first token.issued line
            for scenario in scenarios:
                run_wrk(target, scenario, 1, workdir)
        runs: dict[str, dict[str, list[Run]]] = {
            s.name: {t.name: [] for t in targets} for s in scenarios
        }
        for _ in range(args.rounds):
            for scenario in scenarios:
                for target in targets:
                    runs[scenario.name][target.name].append(
                        run_wrk(target, scenario, args.seconds, workdir)
                    )
        return runs
    finally:
        for process in reversed(processes):
            stop(process)


def _spread(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def summarize(runs: dict[str, dict[str, list[Run]]]) -> dict[str, object]:
    """Per scenario: medians per target, added latency and the ratios against nginx per round."""
    report: dict[str, object] = {}
    for scenario, by_target in runs.items():
        direct, nginx = by_target["direct"], by_target["nginx"]
        rows: dict[str, object] = {}
        for name, target_runs in by_target.items():
            row: dict[str, object] = {
                "rps": _spread([r.rps for r in target_runs], 0),
                "p50_us": round(statistics.median(r.p50_us for r in target_runs)),
                "p99_us": round(statistics.median(r.p99_us for r in target_runs)),
            }
            if name != "direct":
                pairs = list(zip(target_runs, direct, strict=True))
                row["added_p50_us"] = _spread([r.p50_us - d.p50_us for r, d in pairs], 0)
                row["added_p99_us"] = _spread([r.p99_us - d.p99_us for r, d in pairs], 0)
                row["cpu_us_per_request"] = _spread([r.cpu_us_per_request for r in target_runs], 1)
            if name not in ("direct", "nginx"):
                pairs = list(zip(target_runs, nginx, strict=True))
                row["throughput_vs_nginx"] = _spread([r.rps / n.rps for r, n in pairs])
                row["cpu_capacity_vs_nginx"] = _spread(
                    [n.cpu_us_per_request / r.cpu_us_per_request for r, n in pairs]
                )
                row["throughput_vs_direct"] = _spread(
                    [r.rps / d.rps for r, d in zip(target_runs, direct, strict=True)]
                )
            rows[name] = row
        report[scenario] = rows
    return report


def _fmt(spread: object, unit: str = "") -> str:
    assert isinstance(spread, dict)
    return f"{spread['median']:g}{unit} [{spread['min']:g}..{spread['max']:g}]"


def print_report(report: dict[str, object], args: argparse.Namespace) -> None:
    """The tables: one per scenario, medians with [min..max] over the rounds."""
    print(
        f"wrk -t1, {args.seconds:g} s per run, {args.rounds} round(s), loop {args.loop}; "
        f"wrk and the upstream (nginx, TLS) on core {LOAD_CORE}, each proxy alone on core "
        f"{PROXY_CORE}; added = p50/p99 minus direct's in the same round"
    )
    for scenario, rows in report.items():
        assert isinstance(rows, dict)
        print(f"\n{scenario}")
        print(
            f"  {'target':9} {'req/s':>22} {'p50 µs':>7} {'p99 µs':>7} {'added p50 µs':>20} "
            f"{'added p99 µs':>22} {'CPU µs/req':>22}"
        )
        for name, row in rows.items():
            added50 = _fmt(row["added_p50_us"]) if "added_p50_us" in row else "-"
            added99 = _fmt(row["added_p99_us"]) if "added_p99_us" in row else "-"
            cpu = _fmt(row["cpu_us_per_request"]) if "cpu_us_per_request" in row else "-"
            print(
                f"  {name:9} {_fmt(row['rps']):>22} {row['p50_us']:7d} {row['p99_us']:7d} "
                f"{added50:>20} {added99:>22} {cpu:>22}"
            )
        for name, row in rows.items():
            if "throughput_vs_nginx" in row:
                print(
                    f"  {name}/nginx: throughput {_fmt(row['throughput_vs_nginx'])}, "
                    f"CPU capacity {_fmt(row['cpu_capacity_vs_nginx'])}; "
                    f"{name}/direct throughput {_fmt(row['throughput_vs_direct'])}"
                )


def main() -> int:
    """Measure and print the tables (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5, help="length of one wrk run")
    parser.add_argument(
        "--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS)
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another source tree (e.g. a checkout of main) whose broker runs in the same rounds",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for tool in ("wrk", "taskset", "nginx"):
        if shutil.which(tool) is None:
            print(f"need {tool} on PATH (apt-get install -y wrk nginx)", file=sys.stderr)
            return 2
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        print("need uvloop (the `fast` extra), or --loop asyncio", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("need two cores: the load and the proxies are pinned apart", file=sys.stderr)
        return 2
    scenarios = [SCENARIOS[name] for name in args.scenarios]
    with tempfile.TemporaryDirectory() as tmp:
        report = summarize(measure(args, Path(tmp), scenarios))
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
