"""What a schema library costs the broker: resident memory and time, all candidates in one run.

Run: `python bench/schema_libs.py [--repeat 200]`. pydantic comes from the `bench` extra, from
the lock like everything else:

    .venv-tools/bin/uv export --frozen --format requirements-txt --no-emit-project --no-dev \
        --extra bench -o /tmp/bench.txt
    .venv/bin/python -m pip install --require-hashes --no-deps -r /tmp/bench.txt

A candidate that is not installed is reported as not measured.
Each row is a fresh interpreter that first does `import broker.app` (what `serve` loads
anyway), then measures:

- import: the RSS growth and wall time of importing the library and defining the config's
  typed classes with it (what a start pays);
- 1st load: the first structuring (where a library generates its code);
- load: the mean time to turn a realistic config document (two apps with refresh, proxy and
  sinks, two clients) into those typed objects, and whether a document with three mistakes
  reports all three.

`broker.config` is the broker's own parser (whatever it is built on now), on the same document
with its secret files present. Figures differ from machine to machine: compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

DOCUMENT = {
    "server": {"listen": "127.0.0.1:8411", "metrics_listen": "0.0.0.0:9411"},
    "store": {"url": "redis://redis:6379/0", "key_prefix": "tb", "encryption_key_file": "s.key"},
    "apps": {
        "twilio": {
            "token_url": "https://oauth.twilio.com/v2/token",
            "client_id": "OQ123",
            "client_secret_file": "app.secret",
            "scopes": ["read", "write"],
            "extra_params": {"resource": "x"},
            "refresh": {"at_fraction": 0.5, "min_remaining": 600, "jitter": 0.1},
            "proxy": {"upstream": "https://api.twilio.com", "path_prefixes": ["/2010-04-01/"]},
            "sinks": [{"path": "/run/token-broker/twilio", "format": "header"}],
            "max_token_requests_per_minute": 30,
        },
        "scim": {
            "grant_type": "authorization_code",
            "token_url": "https://login.example.com/oauth/token",
            "authorize_url": "https://login.example.com/oauth/authorize",
            "redirect_uri": "http://localhost:8765/callback",
            "client_id": "scim-client",
            "client_secret_file": "app.secret",
            "refresh": {"read_timeout": 120, "reuse_grace": 0},
        },
    },
    "clients": {
        "billing": {"key_file": "client.key", "apps": ["twilio", "scim"]},
        "cron": {"key_file": "client.key", "apps": ["twilio"]},
    },
}


def _three_mistakes() -> dict[str, object]:
    document: dict[str, Any] = json.loads(json.dumps(DOCUMENT))
    apps = document["apps"]
    apps["twilio"]["refresh"]["jitter"] = "high"
    apps["scim"]["refresh"]["reuse_grace"] = "soon"
    document["clients"]["cron"]["apps"] = "twilio"
    return document


# The same shape in each library: plain types, so the row measures the library, not our rules.
_DATACLASSES = """
from dataclasses import dataclass, field
@dataclass
class Server:
    listen: str = "127.0.0.1:8411"
    metrics_listen: str = "0.0.0.0:9411"
@dataclass
class Store:
    url: str = "memory://"
    key_prefix: str = "token-broker"
    encryption_key_file: str | None = None
@dataclass
class Refresh:
    at_fraction: float = 0.75
    min_remaining: float = 0.0
    jitter: float = 0.05
    read_timeout: float = 120.0
    reuse_grace: float = 0.0
@dataclass
class Proxy:
    upstream: str
    path_prefixes: list[str] = field(default_factory=lambda: ["/"])
@dataclass
class Sink:
    path: str
    format: str = "raw"
@dataclass
class App:
    token_url: str
    grant_type: str = "client_credentials"
    client_id: str | None = None
    client_secret_file: str | None = None
    authorize_url: str | None = None
    redirect_uri: str | None = None
    scopes: list[str] = field(default_factory=list)
    extra_params: dict[str, str] = field(default_factory=dict)
    refresh: Refresh = field(default_factory=Refresh)
    proxy: Proxy | None = None
    sinks: list[Sink] = field(default_factory=list)
    max_token_requests_per_minute: int | None = None
@dataclass
class Client:
    apps: list[str]
    key_file: str | None = None
@dataclass
class Root:
    apps: dict[str, App]
    server: Server = field(default_factory=Server)
    store: Store = field(default_factory=Store)
    clients: dict[str, Client] = field(default_factory=dict)
"""

CANDIDATES = {
    "msgspec": (
        "import msgspec\n"
        + _DATACLASSES
        + "decoder = msgspec.convert\n"
        + "def load(doc):\n    return msgspec.convert(doc, Root, strict=True)\n"
        + "def errors(doc):\n"
        + "    try:\n        load(doc)\n    except msgspec.ValidationError as exc:\n"
        + "        return [str(exc)]\n    return []\n"
    ),
    "pydantic": (
        "import pydantic\n"
        + _DATACLASSES.replace(
            "@dataclass", "@pydantic.dataclasses.dataclass(config=CONFIG)"
        ).replace(
            "from dataclasses import dataclass, field",
            "from dataclasses import field\nCONFIG = pydantic.ConfigDict(extra='forbid')",
        )
        + "adapter = pydantic.TypeAdapter(Root)\n"
        + "def load(doc):\n    return adapter.validate_python(doc)\n"
        + "def errors(doc):\n"
        + "    try:\n        load(doc)\n    except pydantic.ValidationError as exc:\n"
        + "        return [e['loc'] for e in exc.errors()]\n    return []\n"
    ),
    "cattrs": (
        "import cattrs\n"
        + _DATACLASSES
        + "converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)\n"
        + "for kind in (str, int, float):\n"
        + "    def strict(value, kind, _k=kind):\n"
        + "        if type(value) is not _k and not (_k is float and type(value) is int):\n"
        + "            raise ValueError(f'not a {_k.__name__}')\n"
        + "        return value\n"
        + "    converter.register_structure_hook(kind, strict)\n"
        # Without this, cattrs turns the string "ab" into the list ["a", "b"].
        + "from cattrs.cols import is_sequence, list_structure_factory\n"
        + "def strict_list(kind, conv):\n"
        + "    inner = list_structure_factory(kind, conv)\n"
        + "    def hook(value, kind):\n"
        + "        if not isinstance(value, list):\n"
        + "            raise ValueError('not a list')\n"
        + "        return inner(value, kind)\n"
        + "    return hook\n"
        + "converter.register_structure_hook_factory(is_sequence, strict_list)\n"
        + "def load(doc):\n    return converter.structure(doc, Root)\n"
        + "def errors(doc):\n"
        + "    try:\n        load(doc)\n    except cattrs.BaseValidationError as exc:\n"
        + "        return cattrs.transform_error(exc)\n    return []\n"
    ),
    "broker.config": (
        "from pathlib import Path\n"
        "from broker.config import parse_config\n"
        "from broker.errors import ConfigError, ConfigErrors\n"
        "BASE = Path(sys.argv[1])\n"
        "def load(doc):\n    return parse_config(doc, base_dir=BASE)\n"
        "def errors(doc):\n"
        "    try:\n        load(doc)\n    except ConfigErrors as exc:\n"
        "        return [str(e) for e in exc.errors]\n"
        "    except ConfigError as exc:\n        return [str(exc)]\n    return []\n"
    ),
}

# One fresh interpreter per candidate: import broker.app, then time and weigh the library.
_PROBE = """
import gc, json, sys, time
sys.path.insert(0, {repo!r})
import broker.app

def rss_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")

preloaded = sorted(m for m in ("cattrs", "msgspec", "pydantic") if m in sys.modules)
gc.collect()
before = rss_kib()
started = time.perf_counter()
exec(compile({code!r}, "<candidate>", "exec"))
imported = time.perf_counter() - started
gc.collect()
after = rss_kib()
document, wrong = json.loads({document!r}), json.loads({wrong!r})
started = time.perf_counter()
load(document)
first = time.perf_counter() - started
started = time.perf_counter()
for _ in range({repeat}):
    load(document)
per_load = (time.perf_counter() - started) / {repeat}
print(json.dumps({{"base_mib": before / 1024, "rss_mib": (after - before) / 1024,
    "import_ms": imported * 1000, "first_ms": first * 1000, "load_ms": per_load * 1000,
    "errors": errors(wrong), "preloaded": preloaded}}))
"""


def measure(name: str, code: str, repeat: int, base_dir: Path) -> dict[str, object]:
    """One candidate's figures, from a fresh interpreter (or why it could not run)."""
    probe = _PROBE.format(
        repo=str(REPO),
        code=code,
        document=json.dumps(DOCUMENT),
        wrong=json.dumps(_three_mistakes()),
        repeat=repeat,
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(base_dir)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1]}
    figures: dict[str, object] = json.loads(result.stdout)
    return figures


def main() -> None:
    """Print one row per candidate, then each one's report of the three-mistake document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="loads timed per candidate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "app.secret").write_text("bench-client-secret-0123456789abcdef\n")
        (base / "client.key").write_text("bench-client-key-" + "k" * 32 + "\n")
        (base / "s.key").write_text("k1 S2V5LWJ5dGVzLWZvci10aGUtc3RvcmUtMzItYnl0ZXM=\n")
        rows = {name: measure(name, code, args.repeat, base) for name, code in CANDIDATES.items()}
    print(
        f"{'candidate':<14} {'+RSS MiB':>9} {'import ms':>10} {'1st load ms':>11} "
        f"{'load ms':>8}  errors of 3"
    )
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<14} not measured: {row['error']}")
            continue
        errors = row["errors"]
        assert isinstance(errors, list)
        print(
            f"{name:<14} {row['rss_mib']:>9.2f} {row['import_ms']:>10.1f} "
            f"{row['first_ms']:>11.2f} {row['load_ms']:>8.3f}  {len(errors)}"
        )
    base_mib = next((r["base_mib"] for r in rows.values() if "base_mib" in r), None)
    print(f"(RSS after `import broker.app`, before each candidate: {base_mib:.1f} MiB)")
    preloaded = next((r["preloaded"] for r in rows.values() if "preloaded" in r), [])
    if isinstance(preloaded, list) and preloaded:
        # Then its row shows only the classes' cost: compare the broker itself across
        # branches for the library's (bench/scale.py's idle RSS, or the start time).
        print(f"(already imported by broker.app: {', '.join(str(m) for m in preloaded)})")
    for name, row in rows.items():
        for error in row.get("errors", []) or []:  # type: ignore[attr-defined]
            print(f"  {name}: {error}")


if __name__ == "__main__":
    main()
