"""Onboarding an authorization-code app against the test OAuth server, as an operator does it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.broker_process import REPO_ROOT
from tests.support.oauth_server import OAuthTestServer

REDIRECT = "http://127.0.0.1:9/callback"


def ac_app(oauth: OAuthTestServer, **refresh: Any) -> dict[str, Any]:
    """The config of an authorization-code app on `oauth`; `refresh` overrides its policy."""
    return {
        "grant_type": "authorization_code",
        "token_url": oauth.token_url,
        "authorize_url": oauth.authorize_url,
        "redirect_uri": REDIRECT,
        "client_id": "test-client",
        "client_secret_file": "client_secret",
        "scopes": ["scim", "offline_access"],
        "refresh": {"min_remaining": 1, "jitter": 0.05, "safety_margin": 1, **refresh},
    }


class Onboarding:
    """Drives `token-broker authorize` interactively: read the URL, consent, paste the redirect."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "broker", "authorize", "app1", "--config", str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        self.printed: list[str] = []

    def authorize_url(self) -> str:
        """Read up to the paste prompt; return the printed authorize URL."""
        assert self.process.stdout is not None
        url = ""
        while True:
            line = self.process.stdout.readline()
            assert line, "authorize exited before prompting"
            self.printed.append(line)
            if line.strip().startswith("http"):
                url = line.strip()
            if "paste the URL" in line:
                return url

    def paste(self, text: str) -> tuple[int, str, str]:
        """Paste the redirected URL; returns the exit code, everything printed, and stderr."""
        out, err = self.process.communicate(text + "\n", timeout=60)
        return self.process.returncode, "".join(self.printed) + out, err


async def consent(url: str) -> str:
    """The login/consent step: the local server redirects with code and state."""
    async with aiohttp.ClientSession() as session:
        async with session.get(url, allow_redirects=False) as response:
            assert response.status == 302
            return response.headers["Location"]


async def authorize_via_code(config: Path, oauth_server: OAuthTestServer) -> None:
    """Onboard app1 through `token-broker authorize` (URL, consent, pasted redirect)."""
    onboarding = Onboarding(config)
    redirected = await consent(onboarding.authorize_url())
    code, out, err = await asyncio.to_thread(onboarding.paste, redirected)
    assert code == 0, out + err
