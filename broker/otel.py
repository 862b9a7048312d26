"""The OpenTelemetry adapter behind `broker.tracing`: the only module that imports the SDK.

Imported only when traces are on (`tracing.start_from_env`), from the `otel` extra. The tracer
provider is the broker's own (not the global one): the OTLP/HTTP exporter, the resource, the
sampler and the propagators all follow the standard OTEL_* variables.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Status, StatusCode

from broker._version import __version__
from broker.logs import SECRETS
from broker.tracing import Attribute, SpanKind

_KINDS = {
    "internal": trace.SpanKind.INTERNAL,
    "server": trace.SpanKind.SERVER,
    "client": trace.SpanKind.CLIENT,
}


def _clean(value: Attribute) -> Attribute:
    """A string scrubbed of every registered secret and JWT (belt and braces: the broker never
    puts one in an attribute); other values as they are."""
    return SECRETS.scrub(value) if isinstance(value, str) else value


class _OtelSpan:
    """A recording span, seen through `tracing.Span`."""

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def set(self, key: str, value: Attribute) -> None:
        """Set one attribute (scrubbed)."""
        self._span.set_attribute(key, _clean(value))

    def event(self, name: str, **attributes: Attribute) -> None:
        """Add an event (attributes scrubbed)."""
        self._span.add_event(name, {k: _clean(v) for k, v in attributes.items()})

    def fail(self, description: str) -> None:
        """Status ERROR with a class of error as its description."""
        self._span.set_status(Status(StatusCode.ERROR, _clean(description)))  # type: ignore[arg-type]


class OtelTracer:
    """`tracing.Tracer` on an SDK tracer provider."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("token-broker", __version__)

    @contextmanager
    def span(
        self,
        name: str,
        kind: SpanKind,
        remote_parent: Mapping[str, str] | None,
        attributes: Mapping[str, Attribute],
    ) -> Iterator[_OtelSpan]:
        """A current span; an exception marks it ERROR with the exception's class name only
        (a message may quote what the broker must not export)."""
        parent = propagate.extract(dict(remote_parent)) if remote_parent is not None else None
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=_KINDS[kind],
            attributes={k: _clean(v) for k, v in attributes.items()},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield _OtelSpan(span)
            except BaseException as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise

    def event(self, name: str, attributes: Mapping[str, Attribute]) -> None:
        """An event on the current span, when it records."""
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(name, {k: _clean(v) for k, v in attributes.items()})

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """The current context as W3C `traceparent` (and what OTEL_PROPAGATORS adds)."""
        propagate.inject(headers)

    def current_ids(self) -> tuple[str, str] | None:
        """The current recording span's ids in hex, or None."""
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return format(context.trace_id, "032x"), format(context.span_id, "016x")

    def shutdown(self) -> None:
        """Export what is buffered, then stop the processors."""
        self.provider.shutdown()


def tracer_with(processor: SpanProcessor) -> OtelTracer:
    """A tracer whose spans go to `processor` (tests: a SimpleSpanProcessor of an in-memory
    exporter); the resource follows OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES."""
    resource = Resource.create({SERVICE_VERSION: __version__})
    if resource.attributes.get(SERVICE_NAME, "").startswith("unknown_service"):  # type: ignore[union-attr]
        resource = resource.merge(Resource({SERVICE_NAME: "token-broker"}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    return OtelTracer(provider)


def otlp_tracer(exporter: SpanExporter | None = None) -> OtelTracer:
    """The tracer `serve` installs: batches exported over OTLP/HTTP, configured by OTEL_*."""
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    return tracer_with(BatchSpanProcessor(exporter))
