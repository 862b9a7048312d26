"""The layering rule: the core depends on protocols, never on aiohttp or redis."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BROKER = Path(__file__).resolve().parents[2] / "broker"
CORE = [
    "policy.py",
    "refresher.py",
    "serving.py",
    "adoption.py",
    "outcomes.py",
    "schedule.py",
    "events.py",
    "core.py",
    "model.py",
    "service.py",
    "clock.py",
    "errors.py",
    "sinks.py",
    "fleet/__init__.py",
    "fleet/protocol.py",
    "fleet/memory.py",
    "fleet/outcomes.py",
]
EDGES = (
    "aiohttp",
    "redis",
    "broker.app",
    "broker.api",
    "broker.store.redis_store",
    "broker.oauth.client",
    # Traces reach the core only through broker.tracing's seam, never the SDK or its adapter.
    "opentelemetry",
    "broker.otel",
)


# The decisions emit events (broker/events.py); only broker/observe.py counts and audits them.
OBSERVED = [
    "refresher.py",
    "serving.py",
    "adoption.py",
    "outcomes.py",
    "schedule.py",
    "fleet/__init__.py",
    "fleet/protocol.py",
    "fleet/memory.py",
    "fleet/outcomes.py",
    "core.py",
]
OBSERVERS = ("broker.metrics", "broker.observe", "prometheus_client")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


class TestLayers:
    @pytest.mark.parametrize("module", CORE)
    def test_core_modules_import_no_edge(self, module: str) -> None:
        """Core modules import neither aiohttp, redis, nor the concrete edges of the broker."""
        found = {n for n in imports(BROKER / module) if n.startswith(EDGES)}
        assert found == set()

    @pytest.mark.parametrize("module", OBSERVED)
    def test_the_core_neither_counts_nor_audits(self, module: str) -> None:
        """The refresher, the fleet protocol and the core import neither the metrics nor the
        audit logger: they hand events to a hook."""
        tree = ast.parse((BROKER / module).read_text())
        found = {n for n in imports(BROKER / module) if n.startswith(OBSERVERS)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "broker.logs":
                found |= {f"broker.logs.{a.name}" for a in node.names if a.name == "audit"}
            if isinstance(node, ast.ImportFrom) and node.module == "broker":
                found |= {
                    f"broker.{a.name}" for a in node.names if a.name in ("metrics", "observe")
                }
        assert found == set()

    def test_only_the_clock_reads_time_for_scheduling(self) -> None:
        """Outside clock.py, no broker module calls asyncio.sleep or time.time for scheduling."""
        offenders = []
        for path in BROKER.rglob("*.py"):
            if path.name in ("clock.py", "devserver.py"):
                continue
            text = path.read_text()
            if "asyncio.sleep(" in text or "time.time()" in text:
                offenders.append(path.name)
        assert offenders == []
