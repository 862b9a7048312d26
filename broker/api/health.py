"""The metrics listener: /metrics, /healthz, /readyz, /readyz/{app}, and /v1/status."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.errors import StoreUnavailable
from broker.metrics import Metrics
from broker.service import TokenService


def build_metrics_app(
    service: TokenService,
    metrics: Metrics,
    *,
    status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> web.Application:
    """The metrics listener: /metrics, /healthz, /readyz, /readyz/{app}; and /v1/status when
    `status` is given (`server.status_endpoint`)."""

    # Rendered on the event loop: the per-app families keep their series' text (broker/
    # exposition.py), so a scrape at a thousand apps costs a few milliseconds of the loop.
    async def metrics_handler(_: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        response.charset = "utf-8"
        return response

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        unready = service.unready_apps()
        if unready:
            return web.json_response({"status": "not_ready", "apps": unready}, status=503)
        return web.json_response({"status": "ready"})

    async def readyz_app(request: web.Request) -> web.Response:
        # One app's readiness, required or not: for a probe or a check of a workload that
        # needs only this app (the pod's /readyz waits for every required app).
        name = request.match_info["app"]
        if name not in service.app_names():
            return web.json_response({"status": "unknown_app", "app": name[:64]}, status=404)
        if service.app_ready(name):
            return web.json_response({"status": "ready", "app": name})
        state = service.status(name).state.value
        return web.json_response({"status": "not_ready", "app": name, "state": state}, status=503)

    async def status_handler(_: web.Request) -> web.Response:
        assert status is not None
        try:
            document = await status()
        except StoreUnavailable as exc:
            return web.json_response(
                {"error": "store_unavailable", "message": str(exc)}, status=503
            )
        return web.json_response(document)

    app = web.Application()
    if status is not None:
        app.router.add_get("/v1/status", status_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/readyz/{app}", readyz_app)
    return app
