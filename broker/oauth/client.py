"""The token endpoint client for one app: grants, client authentication, bounded reads."""

from __future__ import annotations

import base64
import dataclasses
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp

from broker import tracing
from broker.clock import Clock
from broker.credentials import Credentials
from broker.errors import PermanentTokenError, TokenEndpointError, TransientTokenError
from broker.logs import get_logger
from broker.metrics import Metrics
from broker.model import AppSpec, AssertionType, ClientAuth, TokenSet
from broker.oauth.parse import parse_token_response

if TYPE_CHECKING:
    from broker.dpop import AppDpop

log = get_logger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 60
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
# Seconds the transport's own timeout of a refresh-token request trails `refresh.read_timeout`.
REFRESH_BACKSTOP = 5.0


class OAuthClient:
    """Implements TokenSource against one app's token endpoint."""

    def __init__(
        self,
        spec: AppSpec,
        credentials: Credentials,
        session: aiohttp.ClientSession,
        clock: Clock,
        metrics: Metrics,
        *,
        timeout: float = 10.0,
        max_body_bytes: int = 1_048_576,
        dpop: AppDpop | None = None,
    ) -> None:
        self.spec = spec
        # The app's DPoP (broker/dpop.py) when it has `dpop: true`: every request carries a proof.
        self.dpop = dpop
        self.credentials = credentials
        self._session = session
        self._clock = clock
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 5.0))
        # A sent refresh token is waited for to the app's read timeout. The fleet protocol's
        # timer, on the injected clock, decides; this later one is only the transport's backstop.
        self._refresh_timeout = aiohttp.ClientTimeout(
            total=max(timeout, spec.refresh.read_timeout + REFRESH_BACKSTOP),
            sock_connect=min(timeout, 5.0),
        )
        self._max_body = max_body_bytes
        self.secret_in_use = "current"

    async def fetch(
        self, refresh_token: str | None = None, *, dpop_jkt: str | None = None
    ) -> TokenSet:
        """A new token set: the refresh_token grant when given one, else client_credentials.

        `dpop_jkt` names the DPoP key the refreshed set is bound to: its refresh is proved with
        that key (a server binds a public client's refresh token to it, RFC 9449 §5).
        """
        if refresh_token is not None:
            form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        else:
            form = {"grant_type": "client_credentials"}
            if self.spec.audience:
                form["audience"] = self.spec.audience
        if self.spec.scopes and refresh_token is None:
            form["scope"] = " ".join(self.spec.scopes)
        if refresh_token is None:
            form.update(self.spec.extra_params)
        return await self._request_with_fallback(form, dpop_jkt if refresh_token else None)

    async def exchange_code(
        self, code: str, redirect_uri: str, code_verifier: str | None = None
    ) -> TokenSet:
        """Exchange an authorization code (RFC 6749 §4.1.3), with the PKCE verifier if any."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        if code_verifier:
            form["code_verifier"] = code_verifier
        return await self._request_with_fallback(form)

    async def _request_with_fallback(
        self, form: Mapping[str, str], dpop_jkt: str | None = None
    ) -> TokenSet:
        """Try the current secret; on invalid_client, the previous one (a rotation's other half)."""
        try:
            token = await self._request(form, previous=False, dpop_jkt=dpop_jkt)
        except PermanentTokenError as exc:
            if not (
                exc.is_invalid_client
                and self.spec.client_auth is not ClientAuth.PRIVATE_KEY_JWT
                and self.credentials.previous_secret()
            ):
                raise
            token = await self._request(form, previous=True, dpop_jkt=dpop_jkt)
            self._note_secret("previous")
            return token
        self._note_secret("current")
        return token

    def _note_secret(self, which: str) -> None:
        if which == "previous":
            log.warning("app.previous_secret_used", app=self.spec.name, secret="previous")
            self._metrics.credential_reloads.labels(
                app=self.spec.name, outcome="previous_secret"
            ).inc()
        self.secret_in_use = which

    async def _request(
        self, form: Mapping[str, str], *, previous: bool, dpop_jkt: str | None = None
    ) -> TokenSet:
        if self.dpop is None:
            return await self._request_once(form, previous=previous)
        sent_nonce = self.dpop.nonces.get(self.spec.token_url)
        try:
            return await self._request_once(form, previous=previous, dpop_jkt=dpop_jkt)
        except TokenEndpointError as exc:
            # RFC 9449 §8: the server refused the request for want of its nonce (it acted on
            # nothing, a refresh token included) and sent one: once more, with it.
            nonce = self.dpop.nonces.get(self.spec.token_url)
            if exc.error != "use_dpop_nonce" or nonce is None or nonce == sent_nonce:
                raise
            self._metrics.dpop_nonce_retries.labels(
                app=self.spec.name, server="authorization_server"
            ).inc()
            return await self._request_once(form, previous=previous, dpop_jkt=dpop_jkt)

    async def _request_once(
        self, form: Mapping[str, str], *, previous: bool, dpop_jkt: str | None = None
    ) -> TokenSet:
        body = dict(form)
        headers = {"Accept": "application/json"}
        self._authenticate(body, headers, previous=previous)
        jkt = self._prove(headers, dpop_jkt)
        app = self.spec.name
        grant_type = form.get("grant_type", "")
        with tracing.span(
            "token_broker.token_endpoint", kind="client", app=app, grant_type=grant_type
        ) as span:
            tracing.inject(headers)
            try:
                token = await self._post(body, headers, grant_type, span)
            except TokenEndpointError as exc:
                span.set("outcome", type(exc).__name__)
                span.fail(type(exc).__name__)
                raise
        return token if jkt is None else self._bound(token, jkt)

    def _prove(self, headers: dict[str, str], dpop_jkt: str | None) -> str | None:
        """Add the DPoP proof of a token request (made now, at send time); its key's jkt."""
        if self.dpop is None:
            return None
        # Imported here: only DPoP apps load broker.dpop (pyjwt, cryptography).
        from broker.dpop import DpopKeyMissing

        try:
            key = self.dpop.keys.find(dpop_jkt)
            headers["DPoP"] = self.dpop.proof(
                "token_request", "POST", self.spec.token_url, jkt=key.jkt
            )
        except DpopKeyMissing as exc:
            # Nothing was sent: a refresh proved with another key would be refused (or taken
            # for a stolen token), so the set waits for its key to come back.
            raise PermanentTokenError(str(exc), error="dpop_key_missing") from None
        return key.jkt

    def _bound(self, token: TokenSet, jkt: str) -> TokenSet:
        """The set as bound to the key `jkt`; a Bearer answer to a DPoP request is kept unbound
        (it still works, as a bearer token) and said loudly."""
        if token.token_type.lower() == "dpop":
            return dataclasses.replace(token, token_type="DPoP", dpop_jkt=jkt)
        log.warning(
            "dpop.token_not_bound",
            app=self.spec.name,
            token_type=token.token_type[:16],
            reason="the server answered a DPoP request with a token it did not bind",
        )
        self._metrics.dpop_unbound_tokens.labels(app=self.spec.name).inc()
        return token

    async def _post(
        self, body: dict[str, str], headers: dict[str, str], grant_type: str, span: tracing.Span
    ) -> TokenSet:
        """POST the form; the answer parsed (TokenEndpointError for a failure)."""
        sent_at = self._clock.time()
        app = self.spec.name
        # tls_client_auth: the client certificate's context (None: the session's default).
        tls = self.credentials.tls_context()
        try:
            async with self._session.post(
                self.spec.token_url,
                data=body,
                headers=headers,
                ssl=tls if tls is not None else True,
                timeout=(self._refresh_timeout if grant_type == "refresh_token" else self._timeout),
                allow_redirects=False,
            ) as response:
                self._metrics.token_endpoint_responses.labels(
                    app=app, status=str(response.status)
                ).inc()
                span.set("http.response.status_code", response.status)
                if self.dpop is not None:
                    # Any answer may carry the server's next nonce (RFC 9449 §8.2).
                    self.dpop.nonces.note(self.spec.token_url, response.headers)
                payload = await self._read_bounded(response)
                return parse_token_response(
                    response.status,
                    response.headers,
                    payload,
                    sent_at=sent_at,
                    default_lifetime=self.spec.refresh.default_lifetime,
                    rotating=(
                        grant_type == "refresh_token" and not self.spec.refresh.server_transactional
                    ),
                )
        except aiohttp.ClientConnectorError as exc:
            # The connection was never made: the request certainly did not reach the server.
            self._metrics.token_endpoint_responses.labels(app=app, status="error").inc()
            raise TransientTokenError(f"token endpoint unreachable: {type(exc).__name__}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._metrics.token_endpoint_responses.labels(app=app, status="error").inc()
            raise TransientTokenError(
                f"token endpoint failed: {type(exc).__name__}", outcome_unknown=True
            ) from None

    async def _read_bounded(self, response: aiohttp.ClientResponse) -> bytes:
        declared = response.content_length
        if declared is not None and declared > self._max_body:
            raise TransientTokenError(
                f"http {response.status}: body of {declared} bytes exceeds the limit",
                status=response.status,
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > self._max_body:
                raise TransientTokenError(
                    f"http {response.status}: body exceeds {self._max_body} bytes",
                    status=response.status,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _authenticate(
        self, form: dict[str, str], headers: dict[str, str], *, previous: bool
    ) -> None:
        client_id = self.credentials.client_id()
        method = self.spec.client_auth
        if method is ClientAuth.PRIVATE_KEY_JWT:
            form["client_id"] = client_id
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = self._assertion(client_id)
            return
        if method is ClientAuth.CLIENT_ASSERTION:
            assertion = self.credentials.client_assertion(self._clock.time())
            if self.spec.assertion_type is AssertionType.TOKEN_EXCHANGE:
                _exchange(form, assertion)
                return
            # The platform's JWT as it is (RFC 7523 §2.2); its client_id is optional, sent when
            # configured (Entra and Okta want it beside the assertion).
            if client_id:
                form["client_id"] = client_id
            form["client_assertion_type"] = self.spec.assertion_type.urn
            form["client_assertion"] = assertion
            return
        if method is ClientAuth.TLS_CLIENT_AUTH:
            # RFC 8705 §2: the certificate authenticates; the form names the client.
            form["client_id"] = client_id
            return
        secret = (
            self.credentials.previous_secret() if previous else self.credentials.client_secret()
        )
        secret = secret or ""
        if method is ClientAuth.CLIENT_SECRET_BASIC:
            # RFC 6749 §2.3.1: each part is form-urlencoded before Basic encoding.
            pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        else:
            form["client_id"] = client_id
            form["client_secret"] = secret

    def _assertion(self, client_id: str) -> str:
        """An RFC 7523 client assertion signed with the app's private key (RS256 or ES256)."""
        # Imported here: only private_key_jwt apps need pyjwt and cryptography (about 9 MiB).
        import jwt
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        pem = self.credentials.private_key()
        if pem is None:
            raise PermanentTokenError("private_key_jwt without a private key", error="config")
        key = load_pem_private_key(pem, password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            algorithm = "RS256"
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            algorithm = "ES256"
        else:
            raise PermanentTokenError("private key is neither RSA nor EC", error="config")
        now = int(self._clock.time())
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": self.spec.assertion_audience or self.spec.token_url,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        headers = {"kid": self.spec.private_key_id} if self.spec.private_key_id else None
        return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def _exchange(form: dict[str, str], subject_token: str) -> None:
    """Turn a client-credentials request into an RFC 8693 exchange of the platform's JWT.

    The JWT is the subject; the request carries no client authentication (Google STS).
    """
    if form.get("grant_type") != "client_credentials":
        raise PermanentTokenError(
            "assertion_type token-exchange works with grant_type client_credentials only",
            error="config",
        )
    form["grant_type"] = TOKEN_EXCHANGE
    form["subject_token"] = subject_token
    form["subject_token_type"] = "urn:ietf:params:oauth:token-type:jwt"
    form.setdefault("requested_token_type", "urn:ietf:params:oauth:token-type:access_token")
