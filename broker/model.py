"""Value objects shared by every part: token sets, app and client specs, the parsed config."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

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

    @property
    def lifetime(self) -> float:
        """Seconds between issue and expiry."""
        return self.expires_at - self.issued_at

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

    path: Path
    format: SinkFormat = SinkFormat.RAW
    mode: int = 0o600
    owner: int | None = None
    group: int | None = None


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

    at_fraction: float = 0.75
    min_remaining: float = 0.0
    jitter: float = 0.05
    safety_margin: float = 30.0
    default_lifetime: float = 3600.0
    # Seconds for which the server accepts a refresh token again after rotating it (Okta,
    # Auth0 have such a grace period); 0 for a strict server. Allows one careful retry.
    reuse_grace: float = 0.0
    # How long the answer to a sent refresh-token request is awaited. Such a request is never
    # cancelled sooner: the server may act on it, and its answer carries the only copy of the
    # rotated token (issue 20, H1).
    read_timeout: float = 120.0
    # The server's token endpoint is transactional: a 5xx answer means it did not rotate the
    # refresh token. Off by default: a 500 may follow a rotation (issue 20, M4).
    server_transactional: bool = False


@dataclass(frozen=True, slots=True)
class ProxySpec:
    """An app's injecting proxy: the fixed upstream origin and the limits of forwarding.

    `upstream` is `scheme://host[:port]` only. Durations are seconds, sizes bytes.
    """

    upstream: str
    path_prefixes: tuple[str, ...] = ("/",)
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_buffered_body: int = 1024 * 1024
    max_request_body: int = 64 * 1024 * 1024
    ca_file: Path | None = None
    retry_on_401: bool = True
    max_concurrent: int = 64


@dataclass(frozen=True, slots=True)
class AppSpec:
    """One OAuth app as configured."""

    name: str
    token_url: str
    grant_type: GrantType = GrantType.CLIENT_CREDENTIALS
    required: bool = True
    client_id: str | None = None
    client_id_file: Path | None = None
    client_secret_file: Path | None = None
    client_secret_previous_file: Path | None = None
    client_auth: ClientAuth = ClientAuth.CLIENT_SECRET_POST
    private_key_file: Path | None = None
    private_key_id: str | None = None
    assertion_audience: str | None = None
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    extra_params: Mapping[str, str] = field(default_factory=dict)
    refresh: RefreshPolicy = field(default_factory=RefreshPolicy)
    authorize_url: str | None = None
    redirect_uri: str | None = None
    pkce: bool = True
    authorize_params: Mapping[str, str] = field(default_factory=dict)
    proxy: ProxySpec | None = None
    sinks: tuple[SinkSpec, ...] = ()
    # The fleet-wide budget of token requests per minute for this app (None: no budget).
    max_token_requests_per_minute: int | None = None


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

    listen: str = "127.0.0.1:8411"
    metrics_listen: str = "0.0.0.0:9411"
    allow_non_loopback: bool = False
    socket_mode: int = 0o660
    socket_group: int | None = None
    # GET /v1/status on the metrics listener (broker/status.py): off unless asked for.
    status_endpoint: bool = False

    @property
    def unix_path(self) -> str | None:
        """The API's unix socket path, or None when it listens on TCP."""
        return self.listen.removeprefix("unix:") if self.listen.startswith("unix:") else None


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """Where tokens are shared and kept across restarts."""

    url: str = "memory://"
    key_prefix: str = "token-broker"
    encryption_key_file: Path | None = None
    password_file: Path | None = None
    # Send a refresh token only after a replica acknowledged its `sent` record (WAIT): on by
    # default for Sentinel and Cluster URLs, where a failover or a split brain can lose it.
    require_replica_ack: bool = False
    # WAIT's own timeout, on the Redis server; the client's socket timeout is kept above it.
    replica_ack_timeout: float = 0.5


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration."""

    server: ServerSpec
    store: StoreSpec
    apps: Mapping[str, AppSpec]
    clients: Mapping[str, ClientSpec]
