"""Who is calling the local API, and may it use the app it names (401, 404, 403 otherwise)."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

from aiohttp import web

from broker.api.auth import ClientAuthenticator, PeerCredentials, unauthorized_message
from broker.api.errors import ApiError
from broker.service import TokenService

# (presented key, app) pairs whose authorization is remembered: only valid keys are, so the
# table is as large as the config makes it; the bound is a second line of defence.
MAX_GRANTS = 4096

# Per-request labels for the metrics: a configured app and client name, or "".
APP_LABEL = web.RequestKey("app_label", str)
CLIENT_LABEL = web.RequestKey("client_label", str)


class Callers:
    """Authenticates callers (a key, or on the unix socket the kernel's peer credentials) and
    checks the apps they may use, remembering each decision per presented key and app."""

    def __init__(
        self, service: TokenService, authenticator: ClientAuthenticator, *, peer_identity: bool
    ) -> None:
        self.service = service
        self.auth = authenticator
        # Only the unix-socket API reads peer credentials; on TCP nothing is looked up.
        self._peers = PeerCredentials() if peer_identity else None
        # (Authorization header, app) → client, for callers already authenticated and allowed
        # the app; emptied whenever the client keys or grants change (config reload, rotation).
        self._grants: dict[tuple[str, str], str] = {}
        self._grants_generation = authenticator.generation

    def peer(self, transport: asyncio.BaseTransport | None) -> tuple[int, int] | None:
        """The caller's (uid, gid) on the unix socket; None over TCP or when unknown."""
        return self._peers.of(transport) if self._peers is not None else None

    def caller(self, request: web.BaseRequest) -> str:
        """The calling client's name (401 when the caller is no configured client)."""
        return self._caller(request.headers.get("Authorization"), request.transport, request)

    def _caller(
        self,
        authorization: str | None,
        transport: asyncio.BaseTransport | None,
        labels: MutableMapping[Any, Any],
    ) -> str:
        client = self.auth.identify(authorization)
        if client is None:
            if authorization is None and self._peers is not None:
                # No key presented, on the unix socket: the kernel says who is calling.
                peer = self._peers.of(transport)
                client = None if peer is None else self.auth.identify_peer(*peer)
            if client is None:
                raise ApiError(
                    401,
                    "unauthorized",
                    unauthorized_message(authorization, peer_identity=self._peers is not None),
                    {"WWW-Authenticate": 'Bearer realm="token-broker"'},
                )
        labels[CLIENT_LABEL] = client
        return client

    def client_and_app(self, request: web.BaseRequest, app: str) -> tuple[str, str]:
        """Authenticate the caller and check it may use `app` (401, 404, 403 otherwise).

        A decision is remembered per presented key and app: a dict lookup on the header's
        string (its hash is salted per process, so a wrong key's lookup times nothing of the
        right one) instead of a SHA-256 and a comparison with every configured key. A caller
        identified by its peer credentials presented no key, so nothing is remembered for it.
        """
        return self.authorize(request.headers.get("Authorization"), request.transport, app, request)

    def authorize(
        self,
        authorization: str | None,
        transport: asyncio.BaseTransport | None,
        app: str,
        labels: MutableMapping[Any, Any],
    ) -> tuple[str, str]:
        """`client_and_app` for a request given by its parts (the proxy listener's): the
        Authorization header, the connection, and where the metrics labels go."""
        if self._grants_generation != self.auth.generation:
            self._grants.clear()
            self._grants_generation = self.auth.generation
        client = self._grants.get((authorization, app)) if authorization else None
        if client is not None and app in self.service.app_names():
            labels[CLIENT_LABEL] = client
            labels[APP_LABEL] = app
            return client, app
        client = self._caller(authorization, transport, labels)
        app = self._app_for(labels, client, app)
        if authorization and len(self._grants) < MAX_GRANTS:
            self._grants[(authorization, app)] = client
        return client, app

    def _app_for(self, labels: MutableMapping[Any, Any], client: str, app: str) -> str:
        if app not in self.service.app_names():
            usable = sorted(self.auth.apps_of(client) & set(self.service.app_names()))
            raise ApiError(
                404,
                "unknown_app",
                f"no app named {_quoted(app)} is configured; "
                f"this client may use: {', '.join(usable) or 'no app'}",
            )
        labels[APP_LABEL] = app
        if not self.auth.allowed(client, app):
            raise ApiError(403, "forbidden", f"client {client} may not use app {app}")
        return app


def _quoted(name: str) -> str:
    """A caller-supplied name, shortened and quoted, to repeat in an error message."""
    return repr(name[:64] + ("..." if len(name) > 64 else ""))
