"""Traces, opt-in: the seam every part of the broker calls, with nothing of OpenTelemetry in it.

The parts open spans and add events through `span()`; until `start_from_env` finds the standard
OTEL_* variables asking for traces, the tracer is a do-nothing one: `span()` hands back one
shared inert span, no OpenTelemetry module is imported and no memory is spent. With traces on,
`broker.otel` (the only module importing the SDK, from the `otel` extra) is installed behind the
same calls.

Attribute values are names, states, outcomes, counts and HTTP statuses, written by the broker
itself; the adapter also scrubs every string through the log redaction's secret registry, so a
token, secret, key or fingerprint cannot reach an exporter even by mistake.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import Literal, Protocol

Attribute = str | int | float | bool
SpanKind = Literal["internal", "server", "client"]

# The variables that turn traces on: an OTLP endpoint (all signals, or traces only), or the
# exporter named outright (its endpoint then defaults to http://localhost:4318).
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class Span(Protocol):
    """An open span: attributes and events may be added until it ends."""

    def set(self, key: str, value: Attribute) -> None:
        """Set one attribute."""
        ...

    def event(self, name: str, **attributes: Attribute) -> None:
        """Add a timestamped event."""
        ...

    def fail(self, description: str) -> None:
        """Mark the span as an error; `description` is a class of error, never a message."""
        ...


class Tracer(Protocol):
    """What the broker needs of a tracer; `broker.otel.OtelTracer` is the real one."""

    def span(
        self,
        name: str,
        kind: SpanKind,
        remote_parent: Mapping[str, str] | None,
        attributes: Mapping[str, Attribute],
    ) -> AbstractContextManager[Span]:
        """A span, current while the `with` block runs (a child of the current span, or of
        the W3C trace context in `remote_parent`'s headers)."""
        ...

    def event(self, name: str, attributes: Mapping[str, Attribute]) -> None:
        """Add an event to the current span, if one records."""
        ...

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Write the current span's trace context (`traceparent`, ...) into `headers`."""
        ...

    def current_ids(self) -> tuple[str, str] | None:
        """(trace_id, span_id) in hex of the current recording span, or None."""
        ...

    def shutdown(self) -> None:
        """Export what is buffered, then stop."""
        ...


class _InertSpan:
    """The span handed out while traces are off: one shared instance that does nothing."""

    def __enter__(self) -> _InertSpan:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def set(self, key: str, value: Attribute) -> None:
        """Nothing: traces are off."""

    def event(self, name: str, **attributes: Attribute) -> None:
        """Nothing: traces are off."""

    def fail(self, description: str) -> None:
        """Nothing: traces are off."""


INERT = _InertSpan()


class _Installed:
    """The process's tracer (None: traces off); one per process, like the log pipeline."""

    tracer: Tracer | None = None


_installed = _Installed()


def span(
    name: str,
    *,
    kind: SpanKind = "internal",
    remote_parent: Mapping[str, str] | None = None,
    semantic: Mapping[str, Attribute] | None = None,
    **attributes: Attribute,
) -> AbstractContextManager[Span]:
    """A span named `name` around a `with` block (the inert span while traces are off).

    `semantic` holds attributes with dotted OpenTelemetry names (`http.route`, ...).
    """
    tracer = _installed.tracer
    if tracer is None:
        return INERT
    if semantic:
        attributes.update(semantic)
    return tracer.span(name, kind, remote_parent, attributes)


def event(name: str, **attributes: Attribute) -> None:
    """Add an event to the current span (nothing while traces are off, or outside a span)."""
    tracer = _installed.tracer
    if tracer is not None:
        tracer.event(name, attributes)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current trace context to outgoing `headers` (nothing while traces are off)."""
    tracer = _installed.tracer
    if tracer is not None:
        tracer.inject(headers)


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span for log lines, or None (traces off, no span)."""
    tracer = _installed.tracer
    return tracer.current_ids() if tracer is not None else None


def enabled() -> bool:
    """True once a tracer is installed."""
    return _installed.tracer is not None


def install(tracer: Tracer | None) -> None:
    """Make `tracer` the one every span goes to (None: traces off)."""
    _installed.tracer = tracer


def wanted(environ: Mapping[str, str]) -> bool:
    """True when the standard OTEL_* variables ask for exported traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return exporter == "otlp" or any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def start_from_env(environ: Mapping[str, str]) -> Callable[[], None] | None:
    """Install the OTLP tracer when `environ` asks for traces; returns its shutdown, or None.

    Traces are an aid, not a duty: without the SDK (the `otel` extra), or with a protocol the
    exporter does not speak, the broker says so once and runs without them.
    """
    if not wanted(environ):
        return None
    # Imported here: broker.logs reads the current span's ids through this module.
    from broker.logs import get_logger

    log = get_logger(__name__)
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol != "http/protobuf":
        log.warning(
            "traces.off",
            reason=f"OTLP protocol {protocol!r} is not supported: set http/protobuf",
        )
        return None
    try:
        from broker.otel import otlp_tracer
    except ImportError:
        log.warning(
            "traces.off",
            reason="OTEL_* asks for traces, but the OpenTelemetry SDK is not installed "
            "(pip install 'token-broker[otel]')",
        )
        return None
    tracer = otlp_tracer()
    install(tracer)
    log.info("traces.on", exporter="otlp", protocol=protocol)

    def stop() -> None:
        install(None)
        tracer.shutdown()

    return stop
