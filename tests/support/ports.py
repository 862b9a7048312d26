"""Loopback ports for the servers tests start, reserved against every other test run on the machine.

Probing a port with `bind(0)` and closing it is racy when two suites run at once: between the
probe and the server's own bind, the other suite may be handed the same port, and a Redis that a
test restarts on "its" port after an outage may find it taken, or find the other run's server
listening there and talk to it. So ports come from below the kernel's ephemeral range (which
`bind(0)` and outgoing connections draw from), and each one is reserved with an exclusive `flock`
on a file in a directory every run shares. The kernel drops the lock when this process exits,
even on a crash, so a reservation never outlives its run. A test's reservations are released
when the test ends (tests/support/leftovers.py, once its processes are known to be stopped), so
a long run does not hold one open lock file per port it ever used: the second fresh-clone CI run
passed 1,024 descriptors that way, and `select()` refused the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path

# Ports below this are left to services; the range runs up to the ephemeral range's start.
FIRST_PORT = 15000
# Redis Cluster puts each node's bus on port + 10000 and refuses ports above 55535.
CLUSTER_BUS_OFFSET = 10000
MAX_CLUSTER_PORT = 55535

SHARED_LOCK_DIR = Path(tempfile.gettempdir()) / "token-broker-test-ports"
_held: dict[int, int] = {}  # port -> fd of its lock file, held until this process exits
_rng = random.Random()


def held() -> frozenset[int]:
    """The ports this process holds a reservation for right now."""
    return frozenset(_held)


def release(ports: frozenset[int] | set[int]) -> None:
    """Drop the reservations of `ports` (their servers are stopped): close their lock files."""
    for port in ports:
        fd = _held.pop(port, None)
        if fd is not None:
            os.close(fd)


def port_range() -> tuple[int, int]:
    """The ports handed out: from FIRST_PORT to just below the kernel's ephemeral range."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        ephemeral_low, ephemeral_high = (int(n) for n in text.split())
    except (OSError, ValueError):
        ephemeral_low, ephemeral_high = 32768, 60999
    if ephemeral_low - FIRST_PORT >= 4000:
        return FIRST_PORT, ephemeral_low - 1
    return ephemeral_high + 1, 65535


def free_port() -> int:
    """A loopback port nothing listens on, reserved for this test run until it exits."""
    low, high = port_range()
    for _ in range(2000):
        port = _rng.randint(low, high)
        if _reserve(port):
            return port
    raise RuntimeError(f"no free port between {low} and {high}")


def free_cluster_port() -> int:
    """A reserved port whose cluster bus port (port + 10000) is reserved and free too."""
    low, high = port_range()
    high = min(high - CLUSTER_BUS_OFFSET, MAX_CLUSTER_PORT)
    for _ in range(2000):
        port = _rng.randint(low, high)
        # A node port whose bus port is taken stays reserved (unused): cheap, and simpler.
        if _reserve(port) and _reserve(port + CLUSTER_BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def is_free(port: int) -> bool:
    """True when nothing is bound to 127.0.0.1:`port` right now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _reserve(port: int) -> bool:
    """Lock `port` for this process; False when another run holds it or something listens."""
    if port in _held:
        return False  # handed out already in this run
    fd = _open_lock(port)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    if not is_free(port):
        os.close(fd)
        return False
    _held[port] = fd
    return True


def _lock_dir() -> Path:
    """The shared lock directory; a private one if another user's makes it unusable."""
    if not SHARED_LOCK_DIR.is_dir():
        with contextlib.suppress(FileExistsError):
            SHARED_LOCK_DIR.mkdir()
            SHARED_LOCK_DIR.chmod(0o1777)  # every user's runs share it, as they share the ports
    if os.access(SHARED_LOCK_DIR, os.W_OK | os.X_OK):
        return SHARED_LOCK_DIR
    private = SHARED_LOCK_DIR.with_name(f"{SHARED_LOCK_DIR.name}-{os.getuid()}")
    private.mkdir(mode=0o700, exist_ok=True)
    return private


def _open_lock(port: int) -> int | None:
    """The port's lock file, created readable by all so another user's run can lock it too."""
    path = _lock_dir() / str(port)
    for flags in (os.O_RDONLY, os.O_RDONLY | os.O_CREAT | os.O_EXCL):
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o444)
        except (FileNotFoundError, FileExistsError):
            continue
        except PermissionError:
            return None
    with contextlib.suppress(FileNotFoundError, PermissionError):
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return None
