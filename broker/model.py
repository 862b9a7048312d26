"""Value objects shared by every part: token sets, app and client specs, the parsed config.

The config specs are also the config file's schema: each field's `Annotated` rule (from
broker/schema.py) says what its key accepts; broker/config.py structures a file into them.
"""

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Self

from broker import schema as S

# The fleet protocol's version, written into every notice, lease and stored set (issue 20, M5).
# A mark without a version (written by a release before this field existed) reads as 1: that
# release speaks this protocol. A replica never spends a set written by a newer version, and
# spends nothing while it sees a replica of a newer version in the fleet.
PROTOCOL_VERSION = 1


def fingerprint(secret: str) -> str:
    """A short, non-reversible fingerprint of a token or key, safe for logs."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class TokenSet:
    """What one successful token request gave us.

    `issued_at` is the wall time the request was sent; `expires_at` is anchored to it.
    `version` is the store's write counter for this set (0: never stored). `lineage` and
    `generation` say which set is newer: an authorization starts a lineage (a larger number
    than any before it) at generation 1, and every refresh adds one to the generation. They
    are kept inside the encrypted blob and, as plain numbers, beside it. `protocol` is the
    fleet protocol version of the replica that stored it (read from the store).
    """

    access_token: str = field(repr=False)
    token_type: str
    issued_at: float
    expires_at: float
    scope: str | None = None
    refresh_token: str | None = field(default=None, repr=False)
    version: int = 0
    lineage: int = 0
    generation: int = 0
    # The fleet protocol version of the replica that stored this set (PROTOCOL_VERSION).
    protocol: int = PROTOCOL_VERSION
    # The thumbprint (RFC 7638) of the DPoP key the server bound this set to; None: a bearer
    # set. Every proof for it, the refresh's included, is signed with that key (broker/dpop.py).
    dpop_jkt: str | None = None

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        """Itself: an immutable value (a store's snapshot shares its sets, as it shares their
        strings)."""
        return self

    @property
    def lifetime(self) -> float:
        """Seconds between issue and expiry."""
        return self.expires_at - self.issued_at

    def expiring_at(self, expires_at: float) -> Self:
        """This set moved earlier to expire at `expires_at`, its lifetime kept: a stored expiry
        lowered (`TokenStore.lower_expiry`) re-expresses a stamp made in another frame of
        Redis's clock, so the issue moves with it. (Kept in place, a reader would take the set
        for issued in the future and lower it again: swarm seed 5792.)"""
        return replace(
            self, issued_at=self.issued_at - (self.expires_at - expires_at), expires_at=expires_at
        )

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the access token, for audit lines."""
        return fingerprint(self.access_token)

    @property
    def refresh_fingerprint(self) -> str | None:
        """Fingerprint of the refresh token (what a spend record names), or None."""
        return fingerprint(self.refresh_token) if self.refresh_token else None

    @property
    def rank(self) -> tuple[int, int]:
        """(lineage, generation): the larger rank is the newer set, whatever the expiry."""
        return (self.lineage, self.generation)


class GrantType(enum.StrEnum):
    """The grants an app can use."""

    CLIENT_CREDENTIALS = "client_credentials"
    AUTHORIZATION_CODE = "authorization_code"


class ClientAuth(enum.StrEnum):
    """How the broker authenticates itself at the token endpoint."""

    CLIENT_SECRET_POST = "client_secret_post"
    CLIENT_SECRET_BASIC = "client_secret_basic"
    PRIVATE_KEY_JWT = "private_key_jwt"
    # A JWT the platform keeps fresh (a projected service-account token, a JWT-SVID): issue 23.
    CLIENT_ASSERTION = "client_assertion"
    # RFC 8705: the client certificate of the TLS connection authenticates the client.
    TLS_CLIENT_AUTH = "tls_client_auth"


class AssertionType(enum.StrEnum):
    """How a `client_assertion` app presents the JWT from its assertion_file."""

    JWT_BEARER = "jwt-bearer"  # RFC 7523 client assertion
    JWT_SPIFFE = "jwt-spiffe"  # draft-ietf-oauth-spiffe-client-auth, a JWT-SVID
    # RFC 8693: the JWT is the subject_token of a token-exchange grant, with no client
    # authentication (Google STS takes a federated identity this way).
    TOKEN_EXCHANGE = "token-exchange"

    @property
    def urn(self) -> str:
        """The client_assertion_type: urn:ietf:params:oauth:client-assertion-type:<this>."""
        return f"urn:ietf:params:oauth:client-assertion-type:{self.value}"


class DpopAlgorithm(enum.StrEnum):
    """The JWS algorithms a DPoP proof may be signed with (RFC 9449 §4.2)."""

    ES256 = "ES256"
    ES384 = "ES384"
    ES512 = "ES512"
    RS256 = "RS256"
    PS256 = "PS256"
    EDDSA = "EdDSA"


class SinkFormat(enum.StrEnum):
    """What a token file holds."""

    RAW = "raw"  # the bare access token
    JSON = "json"  # the API's answer body
    HEADER = "header"  # `Authorization: Bearer <token>`


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """A file an app's current token is written to, for programs that can only read files.

    `owner` and `group` are numeric ids (names are resolved when the config is loaded); None
    leaves the file owned by the broker's own uid and group.
    """

    path: Annotated[Path, S.SINK_PATH.described("absolute path of the token file")]
    format: Annotated[
        SinkFormat, S.Doc("raw: the token; json: the API's answer; header: Authorization")
    ] = SinkFormat.RAW
    mode: Annotated[int, S.SINK_MODE.described('the token file\'s mode, at most "0644"')] = 0o600
    owner: Annotated[
        int | None, S.USER_ID.described("owner (uid or user name) of the token file")
    ] = None
    group: Annotated[
        int | None, S.GROUP_ID.described("group (gid or group name) of the token file")
    ] = None


class AppState(enum.StrEnum):
    """What the API and the metrics say about an app."""

    FRESH = "fresh"
    REFRESHING = "refreshing"
    FAILING = "failing"
    NEEDS_AUTHORIZATION = "needs_authorization"


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """When to refresh and how long a token may be served (all durations in seconds).

    `min_remaining` is off by default: any fixed default moves short lifetimes away from
    `at_fraction` (5 minutes put every token up to 400 s on the quarter floor).
    """

    at_fraction: Annotated[
        float, S.AT_FRACTION.described("refresh at this fraction of the token's lifetime")
    ] = 0.75
    min_remaining: Annotated[
        float, S.DURATION_OR_ZERO.described("refresh at the latest this long before expiry")
    ] = 0.0
    jitter: Annotated[
        float,
        S.JITTER.described("random spread of the refresh time, a fraction of the lifetime"),
    ] = 0.05
    safety_margin: Annotated[
        float, S.DURATION_OR_ZERO.described("a token is served only while more than this is left")
    ] = 30.0
    default_lifetime: Annotated[
        float, S.DURATION.described("lifetime assumed when the answer has no expires_in")
    ] = 3600.0
    # Seconds for which the server accepts a refresh token again after rotating it (Okta,
    # Auth0 have such a grace period); 0 for a strict server. Allows one careful retry.
    reuse_grace: Annotated[
        float, S.DURATION_OR_ZERO.described("the server accepts a rotated refresh token this long")
    ] = 0.0
    # How long the answer to a sent refresh-token request is awaited. Such a request is never
    # cancelled sooner: the server may act on it, and its answer carries the only copy of the
    # rotated token (issue 20, H1).
    read_timeout: Annotated[
        float, S.DURATION.described("how long the answer to a sent refresh is awaited")
    ] = 120.0
    # The server's token endpoint is transactional: a 5xx answer means it did not rotate the
    # refresh token. Off by default: a 500 may follow a rotation (issue 20, M4).
    server_transactional: Annotated[
        bool, S.BOOL.described("a 5xx from the token endpoint means it did not rotate")
    ] = False


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One of the named upstreams of an app's proxy (`proxy.upstreams.<name>`).

    `origin` is `scheme://host[:port]` only; `path_prefixes` None: the proxy's own.
    """

    name: str
    origin: str
    path_prefixes: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ProxySpec:
    """An app's injecting proxy: the fixed upstream origin(s) and the limits of forwarding.

    Exactly one of `upstream` (one origin, `scheme://host[:port]` only) and `upstreams` (several,
    each under its name) is given. `allowed_networks` are CIDRs the upstreams may resolve into
    although they are loopback, link-local or private (broker/egress.py). Durations are
    seconds, sizes bytes.
    """

    upstream: Annotated[
        str | None,
        S.UPSTREAM.described("scheme and host of the real API, like https://api.example.com"),
    ] = None
    upstreams: Annotated[
        tuple[UpstreamSpec, ...],
        S.UPSTREAMS.described(
            "several upstreams by name, reached at /v1/proxy/<app>/<name>/<path> (instead of "
            "upstream): an origin each, or {origin, path_prefixes}"
        ),
    ] = ()
    path_prefixes: Annotated[
        tuple[str, ...],
        S.PATH_PREFIXES.described(
            "paths the proxy forwards (default: all); with upstreams, for each that names none"
        ),
    ] = ("/",)
    allowed_networks: Annotated[
        tuple[str, ...],
        S.NETWORKS.described(
            "loopback, link-local or private networks (CIDR) the upstreams may be reached in"
        ),
    ] = ()
    connect_timeout: Annotated[float, S.DURATION] = 5.0
    read_timeout: Annotated[float, S.DURATION] = 30.0
    max_buffered_body: Annotated[
        int, S.BUFFERED_BODY.described("request bodies up to this size are replayable")
    ] = 1024 * 1024
    max_request_body: Annotated[int, S.REQUEST_BODY] = 64 * 1024 * 1024
    ca_file: Annotated[
        Path | None, S.FILE.described("PEM CA certificates that alone verify the upstream")
    ] = None
    retry_on_401: Annotated[bool, S.BOOL.described("retry once with a new token on 401")] = True
    # The upstream statuses that mean "this token is refused": a fleet-wide purge and one
    # retry (issue 22). `retry_on_401: false` turns them all off.
    refresh_on_status: Annotated[
        tuple[int, ...],
        S.REFRESH_STATUSES.described("upstream statuses that purge the token and retry once"),
    ] = (401,)
    max_concurrent: Annotated[int, S.MAX_CONCURRENT_RULE] = 64


@dataclass(frozen=True, slots=True)
class AppSpec:
    """One OAuth app as configured."""

    # The key of `apps:` that holds it, not a key of its own.
    name: str = field(metadata={"from_file": False})
    token_url: Annotated[str, S.URL.described("the token endpoint (https, or http on loopback)")]
    grant_type: Annotated[GrantType, S.Doc("how the token is obtained")] = (
        GrantType.CLIENT_CREDENTIALS
    )
    required: Annotated[bool, S.BOOL.described("false: this app does not hold /readyz back")] = True
    client_id: Annotated[str | None, S.NON_EMPTY] = None
    client_id_file: Annotated[Path | None, S.FILE] = None
    client_secret_file: Annotated[Path | None, S.FILE] = None
    client_secret_previous_file: Annotated[
        Path | None, S.FILE.described("the secret before a rotation, tried second")
    ] = None
    client_auth: Annotated[
        ClientAuth, S.Doc("how the client authenticates to the token endpoint")
    ] = ClientAuth.CLIENT_SECRET_POST
    private_key_file: Annotated[
        Path | None, S.FILE.described("PEM RSA (2048 bits or more) or EC key")
    ] = None
    private_key_id: Annotated[str | None, S.STRING.described("the JWT's kid")] = None
    assertion_audience: Annotated[str | None, S.STRING.described("the client assertion's aud")] = (
        None
    )
    scopes: Annotated[tuple[str, ...], S.SCOPES] = ()
    audience: Annotated[str | None, S.STRING] = None
    extra_params: Annotated[
        Mapping[str, str], S.PARAMS.described("more form fields of the token request")
    ] = field(default_factory=dict)
    refresh: RefreshPolicy = field(default_factory=RefreshPolicy)
    authorize_url: Annotated[
        str | None, S.URL.described("the authorization endpoint (authorization_code)")
    ] = None
    redirect_uri: Annotated[
        str | None, S.REDIRECT_URL.described("the registered redirect URI (authorization_code)")
    ] = None
    pkce: Annotated[bool, S.BOOL] = True
    authorize_params: Annotated[
        Mapping[str, str], S.PARAMS.described("more query parameters of the authorization URL")
    ] = field(default_factory=dict)
    proxy: Annotated[ProxySpec | None, S.Doc("the injecting proxy of this app")] = None
    sinks: Annotated[tuple[SinkSpec, ...], S.Doc("files the app's token is written to")] = ()
    # DPoP (RFC 9449, broker/dpop.py): tokens bound to a key only the broker holds. The fleet
    # shares the key file as it shares the store key; memory:// may leave it out (one process).
    dpop: Annotated[
        bool, S.BOOL.described("bind the app's tokens to a DPoP key (RFC 9449); default false")
    ] = False
    dpop_algorithm: Annotated[
        DpopAlgorithm, S.Doc("the DPoP proofs' signature algorithm (default ES256)")
    ] = DpopAlgorithm.ES256
    dpop_key_file: Annotated[
        Path | None,
        S.FILE.described(
            "PEM private key(s) of the DPoP proofs, the first binds new tokens (required for a "
            "shared store)"
        ),
    ] = None
    # The fleet-wide budget of token requests per minute for this app (None: no budget).
    max_token_requests_per_minute: Annotated[
        int | None,
        S.REQUEST_BUDGET.described("the whole fleet's budget of token requests for this app"),
    ] = None
    # client_assertion (issue 23): the platform writes the JWT and rotates it; the broker reads.
    assertion_file: Annotated[
        Path | None,
        S.FILE.described(
            "a JWT the platform keeps fresh (projected service-account token, JWT-SVID), "
            "for client_auth client_assertion"
        ),
    ] = None
    assertion_type: Annotated[
        AssertionType,
        S.Doc(
            "jwt-bearer (RFC 7523) or jwt-spiffe: the client_assertion_type; token-exchange: "
            "the JWT is an RFC 8693 subject_token (Google STS)"
        ),
    ] = AssertionType.JWT_BEARER
    # tls_client_auth (RFC 8705): re-read on change, the TLS context rebuilt.
    tls_client_cert_file: Annotated[
        Path | None, S.FILE.described("PEM client certificate (chain), for tls_client_auth")
    ] = None
    tls_client_key_file: Annotated[
        Path | None, S.FILE.described("PEM private key of the client certificate")
    ] = None


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """The outcome of a failed refresh, shared through the store so the fleet backs off as one.

    `not_before` is in the fleet's time frame (the store's clock): no replica attempts again
    before it. `error` is the secret-free `last_error` text.
    """

    failures: int
    not_before: float
    error: str
    permanent: bool


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """A local caller allowed to ask for tokens of some apps.

    `key_sha256` holds hex digests given inline; `key_files` the files holding keys (several
    during a key rotation). `uids` and `gids` identify the caller by the peer credentials of a
    unix-socket connection instead of (or besides) a key.
    """

    name: str
    apps: tuple[str, ...]
    key_files: tuple[Path, ...] = ()
    key_sha256: tuple[str, ...] = ()
    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """Where the API and the metrics listener bind.

    `socket_mode` and `socket_group` (a numeric gid, None: the broker's own) apply to the API's
    unix socket, when `listen` is `unix:/path`.
    """

    listen: Annotated[
        str, S.API_LISTEN.described("the API: host:port on loopback, or unix:/absolute/path")
    ] = "127.0.0.1:8411"
    metrics_listen: Annotated[
        str, S.LISTEN.described("host:port of /metrics, /healthz, /readyz")
    ] = "0.0.0.0:9411"
    allow_non_loopback: Annotated[
        bool, S.BOOL.described("let the API listen beyond loopback (it serves tokens)")
    ] = False
    socket_mode: Annotated[
        int, S.SOCKET_MODE.described('mode of the API\'s unix socket, like "0660"')
    ] = 0o660
    socket_group: Annotated[
        int | None, S.GROUP_ID.described("group (gid or name) of the API's unix socket")
    ] = None
    # The proxy listener (broker/api/proxy_listener.py): the proxy's lean data path.
    proxy_listen: Annotated[
        str | None,
        S.API_LISTEN.described(
            "the proxy listener: host:port on loopback, or unix:/absolute/path; serves "
            "/v1/proxy/... only, on a lean HTTP/1.1 path (default: none, the API serves the proxy)"
        ),
    ] = None
    # GET /v1/status on the metrics listener (broker/status.py): off unless asked for.
    status_endpoint: Annotated[
        bool,
        S.BOOL.described(
            "serve GET /v1/status (every app's store record, no secrets) on the metrics "
            "listener; default false"
        ),
    ] = False

    @property
    def unix_path(self) -> str | None:
        """The API's unix socket path, or None when it listens on TCP."""
        return self.listen.removeprefix("unix:") if self.listen.startswith("unix:") else None

    @property
    def proxy_unix_path(self) -> str | None:
        """The proxy listener's unix socket path, or None (TCP, or no proxy listener)."""
        listen = self.proxy_listen
        return listen.removeprefix("unix:") if listen and listen.startswith("unix:") else None


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """Where tokens are shared and kept across restarts."""

    url: Annotated[
        str, S.STORE_URL.described("memory:// (one process), or a redis:// URL without a password")
    ] = "memory://"
    key_prefix: Annotated[
        str, S.KEY_PREFIX.described("prefix of every Redis key (no braces, no spaces)")
    ] = "token-broker"
    encryption_key_file: Annotated[
        Path | None, S.FILE.described("the AES key file (required for a shared store)")
    ] = None
    password_file: Annotated[
        Path | None, S.FILE.described("the file holding the Redis password")
    ] = None
    # Send a refresh token only after a replica acknowledged its `sent` record (WAIT): on by
    # default for Sentinel and Cluster URLs, where a failover or a split brain can lose it.
    require_replica_ack: Annotated[
        bool,
        S.BOOL.described(
            "send a refresh token only once a Redis replica acknowledged its spend record "
            "(WAIT); default true for redis+sentinel:// and redis+cluster://"
        ),
    ] = False
    # WAIT's own timeout, on the Redis server; the client's socket timeout is kept above it.
    replica_ack_timeout: Annotated[
        float,
        S.REPLICA_ACK_TIMEOUT.described(
            "how long WAIT waits for the replica's acknowledgement (at most 5s)"
        ),
    ] = 0.5


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration."""

    server: ServerSpec
    store: StoreSpec
    apps: Mapping[str, AppSpec]
    clients: Mapping[str, ClientSpec]
