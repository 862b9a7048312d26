"""`token-broker dev` shows every path: the proxy against its echo API, the unix socket with the
current user mapped, and `token-broker authorize` onboarding an authorization-code app end to
end (the browser step driven by an HTTP client), all through real processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_dev import broker_env, dev_processes, start_dev, stop
from tests.support.broker_process import REPO_ROOT
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

__all__ = ["dev_processes"]  # the fixture, used by name


def banner_line(lines: list[str], start: str) -> str:
    """The first banner line (stripped) that starts with `start`."""
    return next(line.strip() for line in lines if line.strip().startswith(start))


def run_curl(line: str) -> dict[str, object]:
    """Run a printed curl line; its JSON answer."""
    out = subprocess.run(line, shell=True, capture_output=True, text=True, check=True, timeout=30)
    answer: dict[str, object] = json.loads(out.stdout)
    return answer


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: object, **__: object) -> None:
        return None


def consent(url: str) -> str:
    """The browser's step: open the authorize URL; the Location it redirects to."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        opener.open(url, timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code == 302, exc.read()
        return str(exc.headers["Location"])
    raise AssertionError("the authorize endpoint did not redirect")


class TestProxyExample:
    def test_the_printed_proxy_line_reaches_the_echo_api_with_a_valid_token(
        self, dev_processes: list[subprocess.Popen[str]]
    ) -> None:
        """The banner's proxy curl line answers from the echo API, which got a valid token."""
        proc, lines = start_dev("--port", "0")
        dev_processes.append(proc)
        answer = run_curl(banner_line(lines, "curl "))  # the token line comes first
        assert "access_token" in answer
        proxied = run_curl(next(x.strip() for x in lines if "/v1/proxy/demo/hello" in x))
        assert proxied["echo"] == "token-broker dev"
        assert proxied["path"] == "/hello"
        assert proxied["bearer_token_valid"] is True
        assert "--redis" in "".join(lines)  # says how to try the authorization-code app
        assert stop(proc)[0] == 0


class TestUnixSocket:
    def test_the_current_user_gets_a_token_over_the_socket_without_a_key(
        self, dev_processes: list[subprocess.Popen[str]], tmp_path: Path
    ) -> None:
        """`dev --socket PATH`: the printed curl line (no key) and `token-broker token` work."""
        socket = tmp_path / "api.sock"
        proc, lines = start_dev("--socket", str(socket))
        dev_processes.append(proc)
        curl = banner_line(lines, "curl ")
        assert "--unix-socket" in curl and "Authorization" not in curl
        assert run_curl(curl)["token_type"] == "Bearer"
        assert run_curl(next(x.strip() for x in lines if "/v1/proxy/demo/" in x))[
            "bearer_token_valid"
        ]
        token = subprocess.run(
            [sys.executable, "-m", "broker", "token", "demo"],
            capture_output=True,
            text=True,
            env=broker_env(TOKEN_BROKER_URL=f"unix:{socket}"),
            cwd=REPO_ROOT,
            timeout=60,
            check=False,
        )
        assert token.returncode == 0, token.stderr
        assert token.stdout.count(".") == 2
        assert stop(proc)[0] == 0
        assert not socket.exists()


class TestAuthorizationCode:
    def test_dev_then_authorize_onboards_demo_scim_and_refreshes_it(
        self,
        dev_processes: list[subprocess.Popen[str]],
        redis_server: RedisServer,
        tmp_path: Path,
    ) -> None:
        """`dev --redis URL`, then the printed `token-broker authorize demo-scim --config ...`:
        open the URL, paste the redirect; demo-scim serves a token, renewed with the rotated
        refresh token once it ages."""
        workdir = tmp_path / "dev"
        workdir.mkdir()
        proc, lines = start_dev(
            "--port", "0", "--lifetime", "6", "--redis", redis_server.url, "--dir", str(workdir)
        )
        dev_processes.append(proc)
        command = shlex.split(banner_line(lines, "token-broker authorize"))
        assert command[:3] == ["token-broker", "authorize", "demo-scim"]
        authorize = subprocess.Popen(
            [sys.executable, "-m", "broker", *command[1:]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=broker_env(),
        )
        try:
            assert authorize.stdout is not None
            url = ""
            while True:
                line = authorize.stdout.readline()
                assert line, "authorize exited before prompting"
                if line.strip().startswith("http"):
                    url = line.strip()
                if "paste the URL" in line:
                    break
            assert "code_challenge_method=S256" in url and "state=" in url
            redirected = consent(url)
            # The page the browser lands on shows the URL to paste.
            with urllib.request.urlopen(redirected, timeout=10) as page:
                assert "token-broker authorize" in page.read().decode()
            out, err = authorize.communicate(redirected + "\n", timeout=60)
        finally:
            if authorize.poll() is None:
                authorize.kill()
                authorize.communicate(timeout=10)
        assert authorize.returncode == 0, out + err
        assert "Authorized demo-scim" in out

        scim_curl = next(x.strip() for x in lines if x.strip().endswith("/v1/token/demo-scim"))
        first = poll_token(scim_curl, timeout=30)
        # 6 s tokens are renewed after about 4.5 s, with the rotated refresh token each time.
        deadline = time.monotonic() + 30
        second = first
        while second == first and time.monotonic() < deadline:
            time.sleep(0.5)
            second = poll_token(scim_curl, timeout=10)
        assert second != first
        code, output = stop(proc)
        assert code == 0
        assert "token.refreshed" in output and "app=demo-scim" in output
        # No refresh token, access token or client key in the output.
        key = re.search(r"client key:\s+(\S+)", "".join(lines))
        assert key is not None and key.group(1) not in output
        assert first not in output and second not in output
        assert (workdir / "dev.yaml").exists() and os.stat(
            workdir / "store.key"
        ).st_mode & 0o077 == 0


def poll_token(curl: str, timeout: float) -> str:
    """The access token the curl line gets, once the app serves one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            curl, shell=True, capture_output=True, text=True, timeout=30, check=False
        )
        try:
            answer = json.loads(out.stdout)
        except json.JSONDecodeError:
            answer = {}
        if "access_token" in answer:
            return str(answer["access_token"])
        time.sleep(0.3)
    raise AssertionError(f"no token from {curl}")
