"""Callers of the unix-socket API as chosen users: a child process that drops its privileges.

The child imports what it needs first (the interpreter may live where the target uid cannot
read), then calls setgroups/setgid/setuid, then connects: the kernel reports the new uid and
gid to the broker (SO_PEERCRED). Without root a child keeps the test's own uid and gid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0

_CHILD = r"""
import json, os, sys
from broker import cli
from broker.local_client import get_token

uid, gid, groups, command = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
if uid >= 0:
    os.setgroups([int(g) for g in groups.split(",") if g])
    os.setgid(gid)
    os.setuid(uid)
if command[0] == "get":
    url, app, key = command[1], command[2], command[3] or None
    try:
        status, body, _ = get_token(url, app, key=key)
    except OSError as exc:
        print(json.dumps({"connect_error": type(exc).__name__}))
    else:
        print(json.dumps({"status": status, "body": json.loads(body)}))
elif command[0] == "read":
    try:
        with open(command[1], encoding="utf-8") as token_file:
            print(json.dumps({"content": token_file.read()}))
    except OSError as exc:
        print(json.dumps({"read_error": type(exc).__name__}))
else:
    sys.exit(cli.main(command[1:]))
"""


@dataclass(frozen=True)
class Identity:
    """Who a child runs as: uid, primary gid, supplementary groups (-1: the test's own)."""

    uid: int = -1
    gid: int = -1
    groups: tuple[int, ...] = ()

    @property
    def effective_uid(self) -> int:
        """The uid the broker will see."""
        return os.geteuid() if self.uid < 0 else self.uid


SELF = Identity()


def _run(identity: Identity, *command: str) -> subprocess.CompletedProcess[str]:
    groups = ",".join(str(g) for g in identity.groups)
    return subprocess.run(
        [sys.executable, "-c", _CHILD, str(identity.uid), str(identity.gid), groups, *command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )


def request_token(identity: Identity, url: str, app: str, key: str | None = None) -> dict[str, Any]:
    """GET /v1/token/{app} as `identity`: {"status", "body"} or {"connect_error": name}."""
    out = _run(identity, "get", url, app, key or "")
    assert out.returncode == 0, out.stderr
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def read_file(identity: Identity, path: Path) -> dict[str, Any]:
    """Read `path` as `identity`: {"content"} or {"read_error": name}."""
    out = _run(identity, "read", str(path))
    assert out.returncode == 0, out.stderr
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def cli_token(identity: Identity, url: str, app: str) -> subprocess.CompletedProcess[str]:
    """`token-broker token APP --url URL` (no key) as `identity`."""
    return _run(identity, "cli", "token", app, "--url", url)


@contextmanager
def shared_directory() -> Iterator[Path]:
    """A short-named directory every uid may enter (pytest's tmp_path is private to root), for
    the socket (a unix socket path is limited to 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="tb-sock-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)
