"""`token-broker dev`: zero setup, and the printed curl line works as printed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.broker_process import REPO_ROOT
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


def start_dev(port: int, lifetime: float) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "dev", "--port", str(port), "--lifetime", str(lifetime)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Press Ctrl-C" in line:
            return proc, lines
    proc.kill()
    raise AssertionError("dev did not start:\n" + "".join(lines))


class TestDev:
    def test_printed_curl_line_returns_a_token_and_tokens_refresh(self, tmp_path: Path) -> None:
        """The curl line printed by `dev` gets a token; with 4 s tokens a new one follows."""
        port = free_port()
        proc, lines = start_dev(port, lifetime=4)
        try:
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
        finally:
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        # The key is printed once for the operator, in the banner; never in a log line.
        log_output = (
            "".join(line for line in lines if "token.issued" in line or "broker." in line) + out
        )
        assert key.group(1) not in log_output
        assert first["access_token"] not in "".join(lines) + out
