"""A pytest plugin: a test that leaves a process or a listening port behind fails, and so does the run.

After each test, once its fixtures are torn down, the children of this pytest process and the
ports this process listens on are compared with what was there before the test. Anything new is
reported as an error at the test's teardown, naming the process (pid, command line, the ports it
listens on) or the port, and the processes are killed, so neither the next test nor the machine
inherits them. At the end of the session the same check runs against the state at its start, so
a session-scoped fixture or a hook that leaves something behind fails the run too.

psutil reads the process table and the sockets portably (it comes with the test extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import pytest

from tests.support import ports

# How long a leftover process gets to die after SIGKILL before it is reported as unkillable.
REAP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Snapshot:
    """The live children of this process and the TCP ports this process listens on."""

    children: dict[int, str] = field(default_factory=dict)
    ports: frozenset[int] = frozenset()

    def new_since(self, before: Snapshot) -> Snapshot:
        """What is here now that was not in `before`."""
        return Snapshot(
            children={p: d for p, d in self.children.items() if p not in before.children},
            ports=self.ports - before.ports,
        )

    def __bool__(self) -> bool:
        return bool(self.children or self.ports)

    def describe(self) -> str:
        """One line per leftover, for the failure message."""
        lines = [f"process {desc}" for desc in self.children.values()]
        lines += [
            f"port 127.0.0.1:{port} still listening in the pytest process"
            for port in sorted(self.ports)
        ]
        return "\n".join(f"  {line}" for line in lines)


def snapshot() -> Snapshot:
    """The current children (zombies, which run nothing, excluded) and listening ports."""
    me = psutil.Process()
    children: dict[int, str] = {}
    for child in me.children(recursive=True):
        try:
            with child.oneshot():
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                children[child.pid] = _describe(child)
        except psutil.NoSuchProcess:
            continue
    return Snapshot(children=children, ports=frozenset(_listening_ports(me)))


def _describe(process: psutil.Process) -> str:
    command = " ".join(process.cmdline())[:300] or process.name()
    ports = sorted(_listening_ports(process))
    listening = f", listening on {', '.join(map(str, ports))}" if ports else ""
    return f"pid {process.pid}: {command}{listening}"


def _listening_ports(process: psutil.Process) -> set[int]:
    try:
        connections = process.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return set()
    return {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}


def reap(leftovers: Snapshot) -> None:
    """SIGKILL every leftover process and wait for it (they are our children: no zombies)."""
    processes = []
    for pid in leftovers.children:
        try:
            process = psutil.Process(pid)
            process.kill()
            processes.append(process)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(processes, timeout=REAP_TIMEOUT)


def check(before: Snapshot, what: str) -> None:
    """Fail (after killing them) when processes or ports appeared since `before`."""
    left = snapshot().new_since(before)
    if left:
        reap(left)
        pytest.fail(
            f"{what} left behind (its processes are killed now; a fixture stops what it starts in a finally):\n"
            + left.describe(),
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def no_leftovers_at_session_end() -> Iterator[None]:
    """The run fails when anything outlives the session that started it."""
    before = snapshot()
    reserved = ports.held()
    yield
    try:
        check(before, "the test session")
    finally:
        ports.release(ports.held() - reserved)


@pytest.fixture(autouse=True)
def no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test fails at teardown when it leaves a process or a listening port behind.

    The ports the test reserved are released afterwards (its processes are stopped or killed by
    then), so their lock files do not pile up as open descriptors over a long run.
    """
    before = snapshot()
    reserved = ports.held()
    yield
    try:
        check(before, request.node.nodeid)
    finally:
        ports.release(ports.held() - reserved)
