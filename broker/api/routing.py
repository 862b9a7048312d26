"""A small router for the local API: method and path → endpoint and path parameters.

The API runs on aiohttp's low-level `web.Server` (no `web.Application`, no middleware chain, no
UrlDispatcher): a token request then costs less CPU than a bare aiohttp application's. A route
is a template such as `/v1/token/{app}`; `{name}` matches one path segment, `{name:regex}` any
regex (e.g. `{path:.*}` for everything under a prefix). A route takes a list of methods, or
`"*"` for every method. Templates without parameters are looked up in a dict; the others are
tried in the order they were added. The template without its regexes is the route's metrics
label.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from aiohttp import web

ANY_METHOD = "*"

# An endpoint gets the request and the path parameters of its route.
Endpoint = Callable[[web.BaseRequest, Mapping[str, str]], Awaitable[web.StreamResponse]]

_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([^{}]*))?\}")
_NO_PARAMS: Mapping[str, str] = {}


@dataclass
class Route:
    """One path template and its endpoint per method."""

    template: str
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    pattern: re.Pattern[str] | None = None
    # The metrics label: the template without its regexes (`/v1/proxy/{app}/{path}`).
    label: str = field(init=False)

    def __post_init__(self) -> None:
        self.label = _PARAMETER.sub(r"{\1}", self.template)

    def allowed(self) -> str:
        """The Allow header of a 405 on this path."""
        return ", ".join(sorted(m for m in self.endpoints if m != ANY_METHOD))


class NoRoute(Exception):
    """No route has this path (404), or none has it with this method (405, `allow` set)."""

    def __init__(self, allow: str | None = None) -> None:
        super().__init__("no route" if allow is None else "method not allowed")
        self.allow = allow


class Router:
    """Routes requests by method and path (matched as aiohttp's router does: `path_safe`)."""

    def __init__(self) -> None:
        self._static: dict[str, Route] = {}
        self._dynamic: list[Route] = []

    def add(self, methods: str | Collection[str], template: str, endpoint: Endpoint) -> Route:
        """Route `methods` (or ANY_METHOD) on `template` to `endpoint`."""
        route = self._route(template)
        for method in [methods] if isinstance(methods, str) else methods:
            if method in route.endpoints:
                raise ValueError(f"{method} {template} is routed twice")
            route.endpoints[method.upper()] = endpoint
        return route

    def _route(self, template: str) -> Route:
        if _PARAMETER.search(template) is None:
            return self._static.setdefault(template, Route(template))
        for route in self._dynamic:
            if route.template == template:
                return route
        route = Route(template, pattern=_compile(template))
        self._dynamic.append(route)
        return route

    def resolve(self, method: str, path: str) -> tuple[Route, Endpoint, Mapping[str, str]]:
        """The route, endpoint and (unquoted) parameters for a request; raises NoRoute."""
        route = self._static.get(path)
        params = _NO_PARAMS
        if route is None:
            for candidate in self._dynamic:
                assert candidate.pattern is not None
                match = candidate.pattern.fullmatch(path)
                if match is not None:
                    route = candidate
                    params = {
                        k: unquote(v) if "%" in v else v for k, v in match.groupdict().items()
                    }
                    break
            else:
                raise NoRoute()
        endpoint = route.endpoints.get(method) or route.endpoints.get(ANY_METHOD)
        if endpoint is None:
            raise NoRoute(allow=route.allowed())
        return route, endpoint, params


def _compile(template: str) -> re.Pattern[str]:
    """`/v1/token/{app}` → a regex with one named group per parameter."""
    parts: list[str] = []
    position = 0
    for match in _PARAMETER.finditer(template):
        parts.append(re.escape(template[position : match.start()]))
        parts.append(f"(?P<{match.group(1)}>{match.group(2) or '[^/]+'})")
        position = match.end()
    parts.append(re.escape(template[position:]))
    return re.compile("".join(parts))
