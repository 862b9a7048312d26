"""The local HTTP API (tokens for callers in the pod) and the metrics listener.

The API runs on aiohttp's low-level `web.Server` with its own small router (broker/api/routing.py):
no `web.Application`, no middleware, no UrlDispatcher, so a token request costs less CPU than
a bare aiohttp application's. `build_api` composes it from one `ApiDependencies`:

- `server.py`: `ApiServer.__call__`, the per-request work every route shares (the Host and
  Forwarded checks, JSON errors, 404 and 405 included, and the request metrics), and the route
  table. The serving path logs nothing per request.
- `callers.py`: who is calling and which apps it may use. On the unix socket
  (`peer_identity`) a caller without a key is identified by the kernel's peer credentials; over
  TCP nothing is looked up.
- `token.py`: the endpoints (token, refresh, proof, apps, proxy); `proxy.py` forwards upstream.
- `health.py`: the metrics listener (/metrics, /healthz, /readyz, /v1/status).

A new route is one `self.router.add(methods, template, endpoint)` line in `ApiServer.__init__`:
`methods` is a list of methods or `"*"` for all of them, `template` a path such as
`/v1/proxy/{app}/{path:.*}`, and `endpoint` an `async (request, params) -> response`. The
template without its regexes (`/v1/proxy/{app}/{path}`) is the route's `route` metrics label.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.api.auth import ClientAuthenticator
from broker.api.callers import Callers
from broker.api.proxy import Proxy, Upstreams
from broker.api.server import ApiServer
from broker.api.token import TokenRoutes
from broker.clock import Clock
from broker.metrics import Metrics
from broker.service import TokenService

if TYPE_CHECKING:
    from broker.api.proxy_listener import ProxyListener
    from broker.dpop import AppDpop


@dataclass(frozen=True)
class ApiDependencies:
    """What the local API is built from; the composition root (broker/app.py) fills it in."""

    service: TokenService
    authenticator: ClientAuthenticator
    metrics: Metrics
    clock: Clock
    # The proxies' pools (none configured: no proxy).
    upstreams: Upstreams = field(default_factory=Upstreams)
    # It serves a unix socket, where callers without a key are identified by uid and gid.
    peer_identity: bool = False
    # The DPoP of each app with `dpop: true`: the composition root's live mapping, kept by
    # reference so that a reload's changes are seen.
    dpop: Mapping[str, AppDpop] = field(default_factory=dict)


def build_api(deps: ApiDependencies) -> ApiServer:
    """The local API as a low-level aiohttp handler: serve it with
    `web.Server(build_api(deps), **api_server_options())` (call inside the running loop)."""
    callers = Callers(deps.service, deps.authenticator, peer_identity=deps.peer_identity)
    proxy = Proxy(deps.service, deps.upstreams, deps.metrics, deps.dpop)
    routes = TokenRoutes(deps.service, callers, deps.clock, proxy, deps.dpop)
    return ApiServer(callers, routes, deps.metrics, deps.clock)


def build_proxy_listener(deps: ApiDependencies) -> ProxyListener:
    """The proxy listener (`server.proxy_listen`): the proxy route alone, on the lean data path
    (broker/api/proxy_listener.py). Serve it with `proxy_listener.serve` inside the loop."""
    # Imported here: httptools is loaded only by a broker with a proxy listener.
    from broker.api.proxy_listener import ProxyListener

    callers = Callers(deps.service, deps.authenticator, peer_identity=deps.peer_identity)
    proxy = Proxy(deps.service, deps.upstreams, deps.metrics, deps.dpop)
    return ProxyListener(proxy, deps.upstreams, callers, deps.metrics, deps.clock)


async def serve_proxy(listener: ProxyListener, **where: Any) -> asyncio.Server:
    """Start the proxy listener on `host`/`port` or a bound `sock`."""
    from broker.api.proxy_listener import serve

    return await serve(listener, **where)
