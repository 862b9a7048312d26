"""OpenTelemetry traces end to end: the span tree of a proxied request, the `traceparent` the
upstream receives, no secret in any exported span, and a real OTLP/HTTP export.

In process with the SDK's in-memory exporter; then a real `python -m broker serve` exporting over
OTLP/HTTP to a small receiver written with aiohttp (the OpenTelemetry Collector is not on PyPI).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker import tracing
from broker.logs import SECRETS, add_trace_ids
from broker.model import fingerprint
from broker.otel import tracer_with
from tests.support.broker_process import BrokerFiles, BrokerProcess, running_broker
from tests.support.oauth_server import OAuthTestServer

pytestmark = pytest.mark.integration

# The caller's trace: the broker's spans and the upstream's traceparent must continue it.
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


class EchoUpstream:
    """A plain-HTTP API on loopback that records the headers of every request."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.json_response({"path": request.path})


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint (protobuf): keeps every export request's raw body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        self.bodies.append(await request.read())
        return web.Response(
            body=b"", content_type="application/x-protobuf"
        )  # an empty ExportTraceServiceResponse: all accepted

    def spans(self) -> list[dict[str, Any]]:
        """Every received span as {name, trace_id, span_id, parent_id, attributes}."""
        found = []
        for body in self.bodies:
            export = ExportTraceServiceRequest()
            export.ParseFromString(body)
            for resource in export.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        found.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_id": span.parent_span_id.hex(),
                                "attributes": {
                                    a.key: a.value.WhichOneof("value") and str(a.value)
                                    for a in span.attributes
                                },
                            }
                        )
        return found


@pytest.fixture
async def echo_upstream() -> AsyncIterator[EchoUpstream]:
    """The recording upstream, stopped at the end."""
    upstream = EchoUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Traces on in this process, into the SDK's in-memory exporter; off again at the end."""
    exporter = InMemorySpanExporter()
    tracer = tracer_with(SimpleSpanProcessor(exporter))
    tracing.install(tracer)
    yield exporter
    tracing.install(None)
    tracer.shutdown()


def proxied_files(tmp_path: Path, oauth: OAuthTestServer, upstream: EchoUpstream) -> BrokerFiles:
    """A broker whose app1 proxies to the echo upstream."""
    return BrokerFiles(
        tmp_path,
        oauth.token_url,
        app_overrides={"proxy": {"upstream": upstream.url, "allowed_networks": ["127.0.0.0/8"]}},
    )


def secrets_of(files: BrokerFiles, oauth: OAuthTestServer) -> list[str]:
    """Every value no span may carry: the client secret and key, each issued token, and each
    token's fingerprint."""
    values = [files.client_secret, files.client_key]
    for token in oauth.issued_tokens:
        values += [token, fingerprint(token)]
    return values


def dump(spans: tuple[ReadableSpan, ...]) -> str:
    """Everything a span exports, as text: names, attributes, events, status."""
    return "\n".join(span.to_json() for span in spans)


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


class TestInMemory:
    async def test_a_proxied_request_is_one_span_tree_continued_upstream(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        echo_upstream: EchoUpstream,
        exported: InMemorySpanExporter,
    ) -> None:
        """proxy -> token fetch (the first token was still on its way) and proxy -> upstream,
        in the caller's trace; the upstream's traceparent names the upstream span."""
        oauth_server.delays = [4.0]  # the first token arrives after the request does
        files = proxied_files(tmp_path, oauth_server, echo_upstream)
        async with running_broker(files.write()), aiohttp.ClientSession() as session:
            async with session.get(
                f"{files.api}/v1/proxy/app1/items?page=1",
                headers={**files.auth, "traceparent": CALLER_TRACEPARENT},
            ) as response:
                assert response.status == 200
        spans = tuple(exported.get_finished_spans())
        [proxy] = by_name(spans, "token_broker.proxy")
        [fetch] = by_name(spans, "token_broker.token_fetch")
        [upstream] = by_name(spans, "token_broker.upstream")
        assert proxy.context is not None and upstream.context is not None
        assert format(proxy.context.trace_id, "032x") == CALLER_TRACE
        assert proxy.parent is not None and format(proxy.parent.span_id, "016x") == CALLER_SPAN
        assert fetch.parent is not None and fetch.parent.span_id == proxy.context.span_id
        assert upstream.parent is not None and upstream.parent.span_id == proxy.context.span_id
        assert upstream.context.trace_id == proxy.context.trace_id
        assert proxy.attributes is not None and upstream.attributes is not None
        assert proxy.attributes["http.response.status_code"] == 200
        assert proxy.attributes["http.route"] == "/v1/proxy/{app}/{path}"
        assert upstream.attributes["http.response.status_code"] == 200
        [received] = echo_upstream.headers
        span_id = format(upstream.context.span_id, "016x")
        assert received["traceparent"] == f"00-{CALLER_TRACE}-{span_id}-01"
        # The refresh and its token endpoint request were traced too, with the protocol's steps.
        [refresh] = by_name(spans, "token_broker.refresh")
        [endpoint] = by_name(spans, "token_broker.token_endpoint")
        assert refresh.context is not None
        assert endpoint.parent is not None and endpoint.parent.span_id == refresh.context.span_id
        assert refresh.attributes is not None and endpoint.attributes is not None
        assert refresh.attributes["outcome"] == "Fetched"
        assert endpoint.attributes["http.response.status_code"] == 200
        assert endpoint.attributes["grant_type"] == "client_credentials"
        events = [event.name for event in refresh.events]
        assert "lease.acquired" in events and "store.commit" in events
        # The token endpoint saw the refresh's trace context.
        [request] = oauth_server.requests
        endpoint_id = format(endpoint.context.span_id, "016x") if endpoint.context else ""
        assert request.headers["traceparent"].split("-")[2] == endpoint_id
        text = dump(spans)
        for secret in secrets_of(files, oauth_server):
            assert secret not in text

    async def test_token_requests_and_rotations_export_no_secret(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        echo_upstream: EchoUpstream,
        exported: InMemorySpanExporter,
    ) -> None:
        """Token requests and forced refreshes are spans; no secret, token or fingerprint is in
        any exported span (the same search the log tests make)."""
        files = proxied_files(tmp_path, oauth_server, echo_upstream)
        async with running_broker(files.write()), aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(
                    f"{files.api}/v1/token/app1/refresh", headers=files.auth
                ) as response:
                    assert response.status in (200, 429)
                async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as r:
                    assert r.status == 200
                    assert (await r.json())["access_token"] in oauth_server.issued_tokens
        spans = tuple(exported.get_finished_spans())
        tokens = by_name(spans, "token_broker.token")
        assert len(tokens) == 6
        assert {span.attributes["client"] for span in tokens if span.attributes} == {"svc"}
        assert len(oauth_server.issued_tokens) >= 1
        text = dump(spans)
        for secret in secrets_of(files, oauth_server):
            assert secret not in text


class TestLogCorrelation:
    def test_a_log_line_in_a_span_carries_its_ids(self, exported: InMemorySpanExporter) -> None:
        """Inside a span a line gets trace_id and span_id; outside one it gets neither."""
        with tracing.span("work") as _:
            line = add_trace_ids(None, "info", {"event": "x"})
        [span] = exported.get_finished_spans()
        assert span.context is not None
        assert line["trace_id"] == format(span.context.trace_id, "032x")
        assert line["span_id"] == format(span.context.span_id, "016x")
        assert "trace_id" not in add_trace_ids(None, "info", {"event": "y"})


class TestOtlpExport:
    async def test_a_real_broker_exports_the_proxy_tree_over_otlp_http(
        self, tmp_path: Path, oauth_server: OAuthTestServer, echo_upstream: EchoUpstream
    ) -> None:
        """`serve` with OTEL_EXPORTER_OTLP_ENDPOINT exports the proxy's span tree to an OTLP/HTTP
        receiver, continuing the caller's trace; no secret is in the exported bytes."""
        receiver = OtlpReceiver()
        await receiver.start()
        files = proxied_files(tmp_path, oauth_server, echo_upstream)
        broker = BrokerProcess(
            files.write(),
            tmp_path / "broker.log",
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                "OTEL_SERVICE_NAME": "token-broker-test",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            },
        )
        broker.start()
        try:
            await broker.wait_ready(files.metrics, timeout=60)
            async with aiohttp.ClientSession() as session:
                async with session.get(
                    f"{files.api}/v1/proxy/app1/items",
                    headers={**files.auth, "traceparent": CALLER_TRACEPARENT},
                ) as response:
                    assert response.status == 200
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                names = {span["name"] for span in receiver.spans()}
                if {"token_broker.proxy", "token_broker.upstream"} <= names:
                    break
                await asyncio.sleep(0.2)
            assert await broker.terminate_async() == 0
        finally:
            if broker.process is not None and broker.process.poll() is None:
                broker.kill()
            await receiver.stop()
        spans = receiver.spans()
        [proxy] = [s for s in spans if s["name"] == "token_broker.proxy"]
        [upstream] = [s for s in spans if s["name"] == "token_broker.upstream"]
        assert proxy["trace_id"] == CALLER_TRACE and proxy["parent_id"] == CALLER_SPAN
        assert upstream["parent_id"] == proxy["span_id"]
        [received] = echo_upstream.headers
        assert received["traceparent"] == f"00-{CALLER_TRACE}-{upstream['span_id']}-01"
        # The refresh at startup was exported too (flushed at the latest on shutdown).
        assert any(s["name"] == "token_broker.refresh" for s in spans)
        raw = b"".join(receiver.bodies)
        assert b"token-broker-test" in raw  # OTEL_SERVICE_NAME was honoured
        for secret in secrets_of(files, oauth_server):
            assert secret.encode() not in raw
        lines = broker.log_lines()
        assert any(line.get("event") == "traces.on" for line in lines)


class TestScrubbing:
    def test_a_registered_secret_or_a_jwt_never_reaches_an_exported_attribute(
        self, exported: InMemorySpanExporter
    ) -> None:
        """Belt and braces: the adapter scrubs every string attribute, event and status, as the
        log redaction does, even if a part of the broker put a secret in one."""
        secret = "sEcReT-value-0123456789abcdef"
        jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
        SECRETS.add(secret)
        try:
            with tracing.span("leaky", note=f"key={secret}") as span:
                span.set("token", jwt_like)
                span.event("step", detail=secret)
                span.fail(f"failed with {secret}")
        finally:
            SECRETS.discard([secret])
        text = dump(tuple(exported.get_finished_spans()))
        assert "leaky" in text and "[redacted]" in text
        assert secret not in text and jwt_like not in text
