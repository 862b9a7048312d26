"""`python -m broker` as a subprocess: exit codes, and what check-config prints and hides."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker import __version__
from tests.support import config

REPO = Path(__file__).resolve().parents[2]
CLIENT_SECRET = "cli-client-secret-9f8e7d6c5b4a3210"
CLIENT_KEY = "cli-client-key-" + "q" * 32
STORE_KEY = base64.b64encode(bytes(range(50, 82))).decode()


def run_broker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m broker ARGS` from the repo, without TOKEN_BROKER_* from the outside."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**clean, **(env or {})},
        timeout=60,
        check=False,
    )


def write_config(directory: Path, **app_overrides: object) -> Path:
    """A config with a redis store, one app and one client; its secrets in files beside it."""
    return config.write_config(
        directory,
        app=app_overrides,
        files={
            "app.secret": CLIENT_SECRET,
            "client.key": CLIENT_KEY,
            "store.key": f"k1 {STORE_KEY}",
        },
    )


class TestCliExitCodes:
    """The documented exit codes of the command line."""

    def test_version(self) -> None:
        """`version` prints the package version and exits 0."""
        result = run_broker("version")
        assert result.returncode == 0
        assert result.stdout.strip() == f"token-broker {__version__}"

    def test_check_config_valid(self, tmp_path: Path) -> None:
        """A valid config exits 0, says OK, and prints no secret file's content."""
        result = run_broker("check-config", "--config", str(write_config(tmp_path)))
        assert result.returncode == 0, result.stderr
        assert "config OK" in result.stdout
        output = result.stdout + result.stderr
        for secret in (CLIENT_SECRET, CLIENT_KEY, STORE_KEY):
            assert secret not in output

    def test_check_config_from_environment(self, tmp_path: Path) -> None:
        """TOKEN_BROKER_CONFIG stands in for --config."""
        path = write_config(tmp_path)
        result = run_broker("check-config", env={"TOKEN_BROKER_CONFIG": str(path)})
        assert result.returncode == 0, result.stderr

    @pytest.mark.parametrize(
        ("overrides", "key"),
        [
            pytest.param({"scopes": "read"}, "apps.twilio.scopes", id="scopes-as-string"),
            pytest.param({"refresh": {"jitter": 0.7}}, "apps.twilio.refresh.jitter", id="jitter"),
            pytest.param({"colour": "blue"}, "apps.twilio.colour", id="unknown-key"),
        ],
    )
    def test_check_config_broken(
        self, tmp_path: Path, overrides: dict[str, object], key: str
    ) -> None:
        """A broken config exits 2 and stderr names the offending key, without secrets."""
        result = run_broker("check-config", "--config", str(write_config(tmp_path, **overrides)))
        assert result.returncode == 2
        assert f"configuration error: {key}:" in result.stderr
        assert CLIENT_SECRET not in result.stderr + result.stdout

    def test_check_config_missing_file(self, tmp_path: Path) -> None:
        """A config path that does not exist exits 2 naming the path."""
        path = tmp_path / "absent.yaml"
        result = run_broker("check-config", "--config", str(path))
        assert result.returncode == 2
        assert str(path) in result.stderr

    def test_serve_without_config(self) -> None:
        """`serve` with neither --config nor TOKEN_BROKER_CONFIG exits 2 naming --config."""
        result = run_broker("serve")
        assert result.returncode == 2
        assert "--config" in result.stderr

    def test_unknown_command(self) -> None:
        """An unknown command is a usage error (exit 2)."""
        result = run_broker("frobnicate")
        assert result.returncode == 2
        assert "frobnicate" in result.stderr

    def test_no_command_prints_help(self) -> None:
        """`token-broker` alone prints the help on stdout and exits 0."""
        result = run_broker()
        assert result.returncode == 0
        assert result.stdout.startswith("usage: token-broker")
        assert "token-broker dev" in result.stdout
