"""What a broker imports is what its config uses: memory:// and client secrets stay lean."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import config
from tests.support.broker_process import REPO_ROOT

# Heavy modules a broker loads only when its config needs them. (`cryptography` itself is a
# small package that redis-py imports to see whether it is installed; its Rust extension,
# which `cryptography.hazmat` loads, is what costs 8 MiB.)
HEAVY = (
    "redis",
    "Cryptodome",
    "jwt",
    "cryptography.hazmat",
    "cffi",
    "pycparser",
    "rich",
    "importlib.metadata",
    # The config schema's JSON Schema generator: `config-schema` alone imports it.
    "msgspec",
    # Traces are opt-in (OTEL_*): without them nothing of OpenTelemetry is loaded.
    "opentelemetry",
)

BUILD = """
import asyncio, json, sys
from broker.app import build_broker
from broker.config import load_config

async def main():
    broker = await build_broker(load_config(sys.argv[1]))
    await broker.session.close()

asyncio.run(main())
print(json.dumps([m for m in sys.argv[2:] if m in sys.modules]))
"""


def write_config(directory: Path, store_url: str) -> Path:
    """A config with one client_secret_post app and one client on `store_url`."""
    store: dict[str, str] = {"url": store_url}
    if not store_url.startswith("memory://"):
        store["encryption_key_file"] = "store.key"
    return config.write_config(
        directory,
        app={"token_url": "http://127.0.0.1:9/token", "client_id": "id"},
        store=store,
        server={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
    )


def imported_heavy_modules(config: Path) -> list[str]:
    """The HEAVY modules a fresh interpreter holds after building a broker from `config`."""
    out = subprocess.run(
        [sys.executable, "-c", BUILD, str(config), *HEAVY],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    found: list[str] = json.loads(out.stdout)
    return found


class TestImports:
    """Building a broker imports only what its store and apps need."""

    def test_memory_store_imports_none_of_the_heavy_modules(self, tmp_path: Path) -> None:
        """A memory:// broker with a client_secret_post app imports none of HEAVY."""
        assert imported_heavy_modules(write_config(tmp_path, "memory://")) == []

    def test_redis_store_imports_redis_and_pycryptodome_only(self, tmp_path: Path) -> None:
        """A Redis store loads redis-py and PyCryptodome's AES (through ctypes, not cffi).

        (So the check above can see a heavy import. redis-py itself imports
        importlib.metadata, for its own version.)
        """
        found = imported_heavy_modules(write_config(tmp_path, "redis://127.0.0.1:9/0"))
        # redis-py 8 imports OpenTelemetry's API and SDK metrics itself (redis.observability)
        # whenever they are installed, as the test extra installs them: not the broker's doing.
        assert sorted(set(found) - {"opentelemetry"}) == [
            "Cryptodome",
            "importlib.metadata",
            "redis",
        ]
