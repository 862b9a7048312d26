"""Traces are opt-in: the standard OTEL_* variables turn them on; without them nothing of
OpenTelemetry is imported and every span is the shared inert one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from broker import tracing
from tests.support.broker_process import REPO_ROOT

# `serve`'s start in a fresh interpreter: the app imported, traces set up from `environ`.
START = """
import json, os, sys
import broker.app
from broker import tracing
stop = tracing.start_from_env(os.environ)
print(json.dumps({"on": stop is not None,
                  "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry"))[:3]}))
if stop is not None:
    stop()
"""


def start_in_fresh_interpreter(**environ: str) -> dict[str, object]:
    """What a fresh interpreter imported after `import broker.app` and the traces setup."""
    clean = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", START],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**clean, "PYTHONPATH": str(REPO_ROOT), **environ},
        timeout=60,
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class TestOptIn:
    def test_without_otel_variables_nothing_of_opentelemetry_is_imported(self) -> None:
        """`import broker.app` and the traces setup load no opentelemetry module."""
        assert start_in_fresh_interpreter() == {"on": False, "otel": []}

    def test_an_otlp_endpoint_turns_traces_on(self) -> None:
        """OTEL_EXPORTER_OTLP_ENDPOINT loads the SDK (so the check above can see an import)."""
        result = start_in_fresh_interpreter(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
        assert result["on"] is True
        assert result["otel"] != []

    @pytest.mark.parametrize(
        ("environ", "wanted"),
        [
            ({}, False),
            ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
            ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
            ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
            (
                {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
                False,
            ),
            ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
            ({"OTEL_SERVICE_NAME": "x"}, False),
        ],
    )
    def test_which_variables_ask_for_traces(self, environ: dict[str, str], wanted: bool) -> None:
        """An OTLP endpoint or OTEL_TRACES_EXPORTER=otlp asks; `none` and OTEL_SDK_DISABLED win."""
        assert tracing.wanted(environ) is wanted

    def test_grpc_is_refused_with_traces_off(self) -> None:
        """Only OTLP over HTTP (protobuf) is exported: a grpc protocol leaves traces off."""
        environ = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        }
        assert tracing.start_from_env(environ) is None
        assert not tracing.enabled()

    def test_spans_are_inert_while_traces_are_off(self) -> None:
        """Off: one shared inert span, no ids for log lines, no headers injected."""
        assert tracing.span("a", app="x") is tracing.span("b") is tracing.INERT
        assert tracing.current_ids() is None
        headers: dict[str, str] = {}
        tracing.inject(headers)
        assert headers == {}
