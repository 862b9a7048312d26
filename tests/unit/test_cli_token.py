"""`token-broker token`: TCP or unix-socket URLs, with or without a key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def token(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "broker", "token", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        timeout=60,
        check=False,
    )


class TestTokenCommand:
    def test_tcp_without_a_key_is_a_usage_error(self) -> None:
        """Over TCP a key is needed: exit 2 naming --key-file and the unix-socket way out."""
        out = token("app1", "--url", "http://127.0.0.1:9")
        assert out.returncode == 2
        assert "--key-file" in out.stderr
        assert "unix:/path" in out.stderr

    def test_a_url_that_is_neither_http_nor_unix_is_a_usage_error(self, tmp_path: Path) -> None:
        """--url must be http(s)://host:port or unix:/path: exit 2 naming --url."""
        (tmp_path / "key").write_text("k" * 40)
        out = token("app1", "--url", "ftp://127.0.0.1:9", "--key-file", str(tmp_path / "key"))
        assert out.returncode == 2
        assert "argument --url: 'ftp://127.0.0.1:9' is not an http(s) URL" in out.stderr
        assert "nor a unix socket, like unix:/" in out.stderr
        assert "k" * 40 not in out.stderr

    def test_a_unix_socket_needs_no_key_and_a_missing_one_is_a_runtime_failure(
        self, tmp_path: Path
    ) -> None:
        """Over a unix socket no key is required; nothing listening is exit 1."""
        out = token("app1", "--url", f"unix:{tmp_path}/missing.sock")
        assert out.returncode == 1
        assert "cannot reach the broker" in out.stderr
