"""The command line: exit codes 0, 1 and 2, and messages that name the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.config import write_config

REPO = Path(__file__).resolve().parents[2]
SECRET = "cli-secret-0123456789-abcdefghijkl"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=60,
        check=False,
    )


def config(tmp_path: Path, **app: object) -> Path:
    return write_config(
        tmp_path,
        app={"client_id": "OQ1", "client_secret_file": "secret", **app},
        store=None,
        files={"secret": SECRET, "client.key": "c" * 40},
    )


class TestCli:
    def test_version(self) -> None:
        """`version` prints the version and exits 0."""
        out = run("version")
        assert out.returncode == 0
        assert out.stdout.startswith("token-broker ")

    def test_check_config_ok_prints_no_secret(self, tmp_path: Path) -> None:
        """A valid config: exit 0, a summary, no secret."""
        out = run("check-config", "--config", str(config(tmp_path)))
        assert out.returncode == 0, out.stderr
        assert "twilio" in out.stdout
        assert SECRET not in out.stdout + out.stderr

    def test_check_config_bad_exits_2_naming_the_key(self, tmp_path: Path) -> None:
        """A broken config: exit 2 and the offending key on stderr."""
        out = run("check-config", "--config", str(config(tmp_path, scopes="not-a-list")))
        assert out.returncode == 2
        assert "apps.twilio.scopes" in out.stderr

    def test_serve_with_a_bad_config_exits_2(self, tmp_path: Path) -> None:
        """`serve` refuses a broken config with exit 2 (given through TOKEN_BROKER_CONFIG)."""
        path = config(tmp_path, refresh={"jitter": 2})
        out = run("serve", env={"TOKEN_BROKER_CONFIG": str(path)})
        assert out.returncode == 2
        assert "apps.twilio.refresh.jitter" in out.stderr

    def test_serve_without_a_config_exits_2(self) -> None:
        """No --config and no TOKEN_BROKER_CONFIG: exit 2."""
        env = {k: v for k, v in os.environ.items() if k != "TOKEN_BROKER_CONFIG"}
        out = subprocess.run(
            [sys.executable, "-m", "broker", "serve"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**env, "PYTHONPATH": str(REPO)},
            timeout=60,
            check=False,
        )
        assert out.returncode == 2
        assert "--config" in out.stderr

    def test_unknown_command_exits_2(self) -> None:
        """argparse's usage error is exit code 2."""
        assert run("frobnicate").returncode == 2

    def test_token_without_a_broker_exits_1(self, tmp_path: Path) -> None:
        """`token` against nothing listening is a runtime failure: exit 1."""
        (tmp_path / "k").write_text("k" * 40)
        out = run(
            "token", "twilio", "--url", "http://127.0.0.1:9", "--key-file", str(tmp_path / "k")
        )
        assert out.returncode == 1
        assert "k" * 40 not in out.stderr
