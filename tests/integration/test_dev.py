"""`token-broker dev`: zero setup, a banner whose every line works as printed, and the way on to
`serve` with examples/local.yaml against `dev --oauth-only`."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.dev import prepare_oauth_only_dir
from tests.support.broker_process import REPO_ROOT, BrokerProcess
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

EXAMPLE = REPO_ROOT / "examples" / "local.yaml"


def broker_env(**extra: str) -> dict[str, str]:
    """The environment for `python -m broker`: this checkout, no TOKEN_BROKER_* from outside."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}
    return {**clean, "PYTHONPATH": str(REPO_ROOT), **extra}


def start_dev(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """`python -m broker dev ARGS`, read up to the end of its banner."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "dev", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
        env=broker_env(),
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Press Ctrl-C" in line:
            return proc, lines
    proc.kill()
    proc.wait(timeout=10)
    raise AssertionError("dev did not start:\n" + "".join(lines))


@pytest.fixture
def dev_processes() -> Iterator[list[subprocess.Popen[str]]]:
    """dev processes a test starts; each is interrupted (then killed) at the end, whatever happens."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Ctrl-C, then the exit code and the rest of the output."""
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    return proc.returncode, out


def wait_ready(url: str, broker: BrokerProcess, timeout: float) -> None:
    """Poll /readyz until 200; fail with the broker's output when it does not come."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready within {timeout}s:\n{broker.output()[-3000:]}")


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


class TestDev:
    def test_printed_curl_line_returns_a_token_and_tokens_refresh(
        self, dev_processes: list[subprocess.Popen[str]]
    ) -> None:
        """The curl line printed by `dev` gets a token; with 4 s tokens a new one follows."""
        port = free_port()
        proc, lines = start_dev("--port", str(port), "--lifetime", "4")
        dev_processes.append(proc)
        curl = next(line.strip() for line in lines if line.strip().startswith("curl "))
        assert f"127.0.0.1:{port}/v1/token/demo" in curl
        first = json.loads(
            subprocess.run(curl, shell=True, capture_output=True, text=True, check=True).stdout
        )
        assert first["token_type"] == "Bearer"
        assert first["expires_in"] > 0
        time.sleep(4)
        second = json.loads(
            subprocess.run(curl, shell=True, capture_output=True, text=True, check=True).stdout
        )
        assert second["access_token"] != first["access_token"]
        key = re.search(r"client key:\s+(\S+)", "".join(lines))
        assert key is not None
        code, out = stop(proc)
        assert code == 0
        # The key is printed once for the operator, in the banner; never in a log line.
        log_output = (
            "".join(line for line in lines if "token.issued" in line or "broker." in line) + out
        )
        assert key.group(1) not in log_output
        assert first["access_token"] not in "".join(lines) + out

    def test_port_zero_banner_names_the_bound_addresses_and_exports_work(
        self, dev_processes: list[subprocess.Popen[str]]
    ) -> None:
        """`dev --port 0`: the banner's addresses are real, it says dev mode, its exports work."""
        proc, lines = start_dev("--port", "0")
        dev_processes.append(proc)
        banner = "".join(lines)
        assert ":0/" not in banner and not re.search(r":0\s", banner)
        assert "DEV MODE" in banner
        assert "tokens kept in memory only" in banner
        assert "Not for production" in banner

        api = re.search(r"API:\s+(http://127\.0\.0\.1:\d+)", banner)
        health = re.search(r"health:\s+(http://127\.0\.0\.1:\d+)/healthz", banner)
        assert api is not None and health is not None
        assert f"{api.group(1)}/openapi.json" in banner
        assert f"{health.group(1)}/readyz" in banner
        assert get(f"{api.group(1)}/openapi.json")[0] == 200
        assert get(f"{health.group(1)}/healthz")[0] == 200

        exports = dict(
            re.findall(r"^\s+export (TOKEN_BROKER_\w+)=(.+)$", banner, flags=re.MULTILINE)
        )
        assert exports.keys() == {"TOKEN_BROKER_URL", "TOKEN_BROKER_KEY_FILE"}
        env = broker_env(**{k: shlex.split(v)[0] for k, v in exports.items()})
        assert "token-broker token demo" in banner
        token = subprocess.run(
            [sys.executable, "-m", "broker", "token", "demo"],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=60,
            check=False,
        )
        assert token.returncode == 0, token.stderr
        assert token.stdout.count(".") == 2  # a JWT, alone on stdout
        assert get(f"{health.group(1)}/readyz")[0] == 200
        code, _ = stop(proc)
        assert code == 0

    def test_a_taken_port_is_named_with_the_option_to_change(self) -> None:
        """`dev --port N` with N taken: exit 1, naming --port and the way out, no traceback."""
        port = free_port()
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", port))
            holder.listen()
            result = subprocess.run(
                [sys.executable, "-m", "broker", "dev", "--port", str(port)],
                capture_output=True,
                text=True,
                env=broker_env(),
                cwd=REPO_ROOT,
                timeout=60,
                check=False,
            )
        assert result.returncode == 1
        assert f"--port: cannot listen on 127.0.0.1:{port}" in result.stderr
        assert "--port 0 picks any free port" in result.stderr
        assert "Traceback" not in result.stdout + result.stderr


class TestLocalExample:
    def test_check_config_accepts_the_example_as_shipped(self, tmp_path: Path) -> None:
        """examples/local.yaml with the files `dev --oauth-only` writes: valid, no warning."""
        shutil.copy(EXAMPLE, tmp_path / "local.yaml")
        prepare_oauth_only_dir(tmp_path / "local-secrets")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "broker",
                "check-config",
                "--config",
                str(tmp_path / "local.yaml"),
            ],
            capture_output=True,
            text=True,
            env=broker_env(),
            cwd=REPO_ROOT,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "config OK" in result.stdout
        assert "warning" not in result.stderr

    def test_serve_with_the_example_against_oauth_only_yields_a_token(
        self,
        tmp_path: Path,
        redis_server: RedisServer,
        dev_processes: list[subprocess.Popen[str]],
    ) -> None:
        """dev --oauth-only + a local Redis + serve --config local.yaml: `token demo` works.

        Only the example's addresses are changed, to reserved ports and the test's Redis.
        """
        oauth_port, api_port, metrics_port = free_port(), free_port(), free_port()
        text = EXAMPLE.read_text()
        for shipped, ours in [
            ("token_url: http://127.0.0.1:8412/", f"token_url: http://127.0.0.1:{oauth_port}/"),
            ("  listen: 127.0.0.1:8411", f"  listen: 127.0.0.1:{api_port}"),
            ("metrics_listen: 127.0.0.1:9411", f"metrics_listen: 127.0.0.1:{metrics_port}"),
            ("url: redis://127.0.0.1:6379/0", f"url: {redis_server.url}"),
        ]:
            assert text.count(shipped) == 1, shipped
            text = text.replace(shipped, ours)
        config = tmp_path / "local.yaml"
        config.write_text(text)
        secrets_dir = tmp_path / "local-secrets"

        proc, lines = start_dev(
            "--oauth-only", "--oauth-port", str(oauth_port), "--dir", str(secrets_dir)
        )
        dev_processes.append(proc)
        banner = "".join(lines)
        client_id = (secrets_dir / "client_id").read_text().strip()
        assert f"client id:       {client_id}" in banner
        assert str(secrets_dir / "client_secret") in banner
        assert (secrets_dir / "client_secret").read_text().strip() not in banner

        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", broker, timeout=60)
            token = subprocess.run(
                [sys.executable, "-m", "broker", "token", "demo"],
                capture_output=True,
                text=True,
                env=broker_env(
                    TOKEN_BROKER_URL=f"http://127.0.0.1:{api_port}",
                    TOKEN_BROKER_KEY_FILE=str(secrets_dir / "client.key"),
                ),
                cwd=REPO_ROOT,
                timeout=60,
                check=False,
            )
        finally:
            broker.terminate()
        assert token.returncode == 0, token.stderr + broker.output()[-2000:]
        assert token.stdout.count(".") == 2
