"""The API's unix socket: bound with its configured mode and group before anyone can connect.

The socket is bound under a umask that leaves it readable and writable by the broker alone, then
given its group and mode, and only then listened on; so at no moment is it more open than the
config says (Vault Agent once ignored such settings silently: hashicorp/vault#9806). A socket
file left by a dead broker is removed; one that a live process still listens on is not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from broker.errors import ConfigError
from broker.logs import get_logger
from broker.model import ServerSpec

log = get_logger(__name__)

# How long the probe of an existing socket file waits for a live listener to answer.
PROBE_TIMEOUT = 1.0


@dataclass
class UnixListener:
    """A bound unix socket and the identity (device, inode) of its file."""

    path: Path
    sock: socket.socket
    identity: tuple[int, int]

    def remove(self) -> None:
        """Delete the socket file on shutdown, unless another broker has replaced it since.

        Called while our socket is still bound: a bound socket pins its file's inode, so an
        equal (device, inode) means the file is ours.
        """
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                self.path.unlink()


def bind_unix_socket(server: ServerSpec) -> UnixListener:
    """Bind `server.listen` (unix:/path) with `socket_mode` and `socket_group` applied."""
    assert server.unix_path is not None
    path = Path(server.unix_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        # umask is process-wide; nothing else creates files while the broker starts.
        previous = os.umask(0o177)
        try:
            sock.bind(str(path))
            bound = True
        finally:
            os.umask(previous)
        if server.socket_group is not None:
            try:
                os.chown(path, -1, server.socket_group)
            except OSError as exc:
                raise ConfigError(
                    "server.socket_group",
                    f"cannot give {path} to group {server.socket_group}: {exc.strerror} "
                    "(a broker not running as root can only use a group it belongs to)",
                ) from None
        os.chmod(path, server.socket_mode)
        st = os.lstat(path)
    except BaseException:
        sock.close()
        if bound:
            path.unlink(missing_ok=True)
        raise
    log.info(
        "api.unix_socket",
        path=str(path),
        mode=f"{server.socket_mode:04o}",
        gid=st.st_gid,
    )
    return UnixListener(path, sock, (st.st_dev, st.st_ino))


def _remove_stale(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError("server.listen", f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()
        log.info("api.stale_socket_removed", path=str(path))
        return
    except TimeoutError:
        pass  # a listener too busy to accept is still a listener
    except OSError as exc:
        raise OSError(exc.errno, f"cannot tell whether {path} is in use: {exc.strerror}") from None
    finally:
        probe.close()
    raise OSError(
        errno.EADDRINUSE, f"another process listens on {path} (stop it or change server.listen)"
    )
