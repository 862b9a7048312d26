"""twilio-python with the broker: no Twilio credential in the service. Needs the `twilio` extra.

Two ways, one line each:

- The SDK calls Twilio itself, the broker is its token source::

      Client(account_sid=SID, credential_provider=BrokerCredentials("twilio"))

- The SDK calls the broker's injecting proxy (over its unix socket or TCP), which attaches the
  token and forwards to Twilio; the service never holds a token at all::

      Client(account_sid=SID, http_client=BrokerHttpClient("twilio", url="unix:/run/token-broker/api.sock"))

  (BrokerAsyncHttpClient for the SDK's `*_async` methods.)

`TWILIO_REGION` and `TWILIO_EDGE` (and `Client(region=..., edge=...)`) make the SDK rewrite
every URL's host, `api.twilio.com` to `api.<edge>.<region>.twilio.com`, inside
`Client.request`, before the HTTP client sees it. BrokerHttpClient undoes that: a host is
mapped to its upstream by its product label (`api`, `messaging`, ...) whatever edge and region
it names, so the variables cannot send a request anywhere but the broker, and the broker's
config alone decides which regional host is reached (`api: https://api.dublin.ie1.twilio.com`).
With BrokerCredentials the SDK calls Twilio directly and the variables work as the SDK
documents; the broker's token must then be valid in that region.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from requests.structures import CaseInsensitiveDict
from twilio.auth_strategy.auth_strategy import AuthStrategy
from twilio.auth_strategy.auth_type import AuthType
from twilio.credential.credential_provider import CredentialProvider
from twilio.http import AsyncHttpClient, HttpClient
from twilio.http.response import Response
from twilio.http.token_manager import TokenManager

from token_broker_client.errors import broker_error_body, error_for
from token_broker_client.source import TokenSource
from token_broker_client.transport import BrokerEndpoint, BrokerTransport

_logger = logging.getLogger("token_broker_client.twilio")

# `<product>.twilio.com`, `<product>.<region>.twilio.com`, `<product>.<edge>.<region>.twilio.com`
# (the shapes ClientBase.get_hostname writes).
_TWILIO_HOST = re.compile(r"(?P<product>[a-z0-9-]+)(?:\.[a-z0-9-]+){0,2}\.twilio\.com")

# What requests' requote_uri leaves alone in a path: the SDK's paths pass through unchanged,
# a character a URL may not hold is percent-encoded (the broker refuses it raw).
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"


class BrokerTokenManager(TokenManager):
    """A twilio-python `TokenManager` whose tokens come from the broker (for the SDK's own
    providers, e.g. `OrgsCredentialProvider(..., token_manager=BrokerTokenManager("twilio"))`).
    """

    def __init__(self, source: TokenSource | str, **options: Any) -> None:
        self.source = source if isinstance(source, TokenSource) else TokenSource(source, **options)

    def fetch_access_token(self, version: object = None) -> str:
        """The app's current access token (the source keeps it until it nears its expiry)."""
        return self.source.get_token()


class BrokerAuthStrategy(AuthStrategy):
    """`Authorization: Bearer <token>` from a TokenSource, asked at every request.

    Unlike the SDK's TokenAuthStrategy it needs no JWT decoding to know when a token is old
    (the broker's `expires_in` says) and does not reconfigure the root logger.
    """

    def __init__(self, source: TokenSource) -> None:
        super().__init__(AuthType.CLIENT_CREDENTIALS)
        self.source = source

    def get_auth_string(self) -> str:
        """The Authorization header's value."""
        return f"Bearer {self.source.get_token()}"

    def requires_authentication(self) -> bool:
        """Always: every Twilio request carries the token."""
        return True


class BrokerCredentials(CredentialProvider):
    """A credential provider for `Client(credential_provider=...)`: the SDK calls Twilio with
    the broker's token for `app`. `source` is a TokenSource or an app name (then `options` are
    TokenSource's: url, key, key_file, margin, ...)."""

    def __init__(self, source: TokenSource | str = "twilio", **options: Any) -> None:
        super().__init__(AuthType.CLIENT_CREDENTIALS)
        self.source = source if isinstance(source, TokenSource) else TokenSource(source, **options)
        self._strategy = BrokerAuthStrategy(self.source)

    def to_auth_strategy(self) -> BrokerAuthStrategy:
        """The strategy the SDK asks for the Authorization header of each request."""
        return self._strategy


class BrokerHttpClient(HttpClient):
    """A twilio-python HttpClient that sends every request through the broker's proxy.

    `https://<product>.twilio.com/<path>` goes to `/v1/proxy/{app}/<product>/<path>`, the route
    of an app with several `proxy.upstreams` named after Twilio's products (`api`, `messaging`,
    `verify`, ...). `hosts` maps host names to other upstream names. For an app with a single
    `proxy.upstream`, `upstream="api"` sends that product's host to `/v1/proxy/{app}/<path>`
    (and refuses every other host). A host that maps to nothing raises ValueError before
    anything is sent. `url`, `key` and `key_file` are as TokenSource's (environment defaults;
    over a unix socket no key is needed for a mapped uid).

    Basic credentials the SDK would add (`TWILIO_ACCOUNT_SID` and `TWILIO_AUTH_TOKEN` in the
    environment) and any `Authorization` header are never sent: the broker's own answers on a
    route are JSON errors raised as this library's exceptions (TokenUnavailable, Forbidden,
    ...); the upstream's answers, errors included, go back to the SDK unchanged. Redirects are
    returned, not followed.
    """

    def __init__(
        self,
        app: str = "twilio",
        *,
        url: str | None = None,
        key: str | None = None,
        key_file: str | os.PathLike[str] | None = None,
        upstream: str | None = None,
        hosts: Mapping[str, str] | None = None,
        timeout: float | None = None,
        logger: logging.Logger = _logger,
    ) -> None:
        super().__init__(logger, False, timeout)
        self.app = app
        self.upstream = upstream
        self.hosts = dict(hosts or {})
        if upstream is not None and self.hosts:
            raise ValueError("give upstream= (one proxy.upstream) or hosts= (proxy.upstreams)")
        self.endpoint = BrokerEndpoint.resolve(
            url, key=key, key_file=key_file, timeout=timeout or 60.0
        )
        self._transport = BrokerTransport(self.endpoint)
        self._route = f"/v1/proxy/{quote(app, safe='')}"

    def proxy_target(self, url: str) -> str:
        """The broker's path for an SDK URL (its query kept)."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        path = quote(parts.path or "/", safe=_PATH_SAFE)
        query = f"?{parts.query}" if parts.query else ""
        match = _TWILIO_HOST.fullmatch(host)
        product = match["product"] if match else None
        # Edge and region labels are dropped: the broker's config names the host it reaches.
        canonical = f"{product}.twilio.com" if product else host
        name: str | None
        if self.upstream is not None:
            if product == self.upstream:
                return f"{self._route}{path}{query}"
            name = None
        elif self.hosts:
            name = self.hosts.get(host) or self.hosts.get(canonical)
        else:
            name = product
        if name is None:
            raise ValueError(
                f"{parts.scheme}://{host} has no upstream at the broker's app {self.app!r}: "
                + (
                    f"this client sends only {self.upstream}.twilio.com (upstream=...)"
                    if self.upstream is not None
                    else "give hosts={host: upstream name} as the app's proxy.upstreams name it"
                )
            )
        return f"{self._route}/{quote(name, safe='')}{path}{query}"

    def request(  # noqa: PLR0917 (the SDK's HttpClient.request signature, called positionally)
        self,
        method: str,
        uri: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        """Send one SDK request through the broker; `auth` is dropped (the broker injects the
        token); returns the upstream's answer as the SDK's Response."""
        if timeout is None:
            timeout = self.timeout
        elif timeout <= 0:
            raise ValueError(timeout)
        sent = {
            name: value
            for name, value in (headers or {}).items()
            if name.lower() != "authorization"
        }
        target = self.proxy_target(uri)
        query = _form(params)
        if query:
            target += ("&" if "?" in target else "?") + query
        body: bytes | None = None
        if data is not None:
            kind = sent.get("Content-Type", "")
            if kind in ("application/json", "application/scim+json"):
                body = json.dumps(data).encode()
            else:
                body = _form(data).encode()
                sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        self.log_request({"method": method.upper(), "url": uri, "params": params, "headers": sent})
        self._test_only_last_response = None
        answer = self._transport.request(
            method.upper(), target, headers=sent, body=body, timeout=timeout
        )
        parsed = broker_error_body(answer.body) if answer.status >= 400 else None
        if parsed is not None:
            raise error_for(answer.status, answer.body, answer.headers.get("retry-after"))
        response = Response(
            answer.status,
            answer.body.decode("utf-8", "replace"),
            CaseInsensitiveDict(answer.headers),
        )
        self._test_only_last_response = response
        return response

    def close(self) -> None:
        """Close this thread's connection to the broker."""
        self._transport.close()


class BrokerAsyncHttpClient(AsyncHttpClient):
    """BrokerHttpClient for the SDK's `*_async` methods (`Client(http_client=...)` then
    `await client.messages.create_async(...)`): the same routes and rules, each request sent
    from a worker thread so the event loop never waits on the socket. `options` are
    BrokerHttpClient's."""

    def __init__(self, app: str = "twilio", **options: Any) -> None:
        self.sync = BrokerHttpClient(app, **options)
        super().__init__(self.sync.logger, True, self.sync.timeout)

    # The SDK's AsyncHttpClient itself overrides HttpClient.request with a coroutine.
    async def request(  # type: ignore[override]  # noqa: PLR0917 (the SDK's signature)
        self,
        method: str,
        uri: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the SDK's signature: the socket timeout)
        allow_redirects: bool = False,
    ) -> Response:
        """Send one SDK request through the broker, off the event loop."""
        return await asyncio.to_thread(
            self.sync.request, method, uri, params, data, headers, auth, timeout, allow_redirects
        )


def _form(values: Mapping[str, object] | None) -> str:
    """Form-encode as requests does: a list repeats its key, a None value is left out."""
    if not values:
        return ""
    pairs: list[tuple[str, object]] = []
    for name, value in values.items():
        items = value if isinstance(value, list | tuple) else [value]
        pairs.extend((name, item) for item in items if item is not None)
    return urlencode(pairs)
