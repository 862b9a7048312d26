"""The token endpoint client for one app: grants, client authentication, bounded reads."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
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
    ) -> None:
        self.spec = spec
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

    async def fetch(self, refresh_token: str | None = None) -> TokenSet:
        """A new token set: the refresh_token grant when given one, else client_credentials."""
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
        return await self._request_with_fallback(form)

    async def exchange_code(
        self, code: str, redirect_uri: str, code_verifier: str | None = None
    ) -> TokenSet:
        """Exchange an authorization code (RFC 6749 §4.1.3), with the PKCE verifier if any."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        if code_verifier:
            form["code_verifier"] = code_verifier
        return await self._request_with_fallback(form)

    async def _request_with_fallback(self, form: Mapping[str, str]) -> TokenSet:
        """Try the current secret; on invalid_client, the previous one (a rotation's other half)."""
        try:
            token = await self._request(form, previous=False)
        except PermanentTokenError as exc:
            if not (
                exc.is_invalid_client
                and self.spec.client_auth is not ClientAuth.PRIVATE_KEY_JWT
                and self.credentials.previous_secret()
            ):
                raise
            token = await self._request(form, previous=True)
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

    async def _request(self, form: Mapping[str, str], *, previous: bool) -> TokenSet:
        body = dict(form)
        headers = {"Accept": "application/json"}
        self._authenticate(body, headers, previous=previous)
        app = self.spec.name
        grant_type = form.get("grant_type", "")
        with tracing.span(
            "token_broker.token_endpoint", kind="client", app=app, grant_type=grant_type
        ) as span:
            tracing.inject(headers)
            try:
                return await self._post(body, headers, grant_type, span)
            except TokenEndpointError as exc:
                span.set("outcome", type(exc).__name__)
                span.fail(type(exc).__name__)
                raise

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
