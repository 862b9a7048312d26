"""A client of the token-broker sidecar: tokens from the broker, with the standard library alone.

`TokenSource("twilio").get_token()` asks the broker (over TCP or its unix socket) and keeps the
token until it nears its expiry. The adapters need their extras: `token_broker_client.httpx`
(`BrokerAuth`), `token_broker_client.requests` (`BrokerRequestsAuth`) and
`token_broker_client.twilio` (`BrokerCredentials`, `BrokerHttpClient`).
"""

from token_broker_client.errors import (
    BadRequest,
    BrokerError,
    BrokerUnreachable,
    DpopBound,
    Forbidden,
    NeedsAuthorization,
    NotFound,
    RateLimited,
    TokenUnavailable,
    Unauthorized,
    UpstreamError,
)
from token_broker_client.source import Token, TokenSource
from token_broker_client.transport import BrokerEndpoint

__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "BrokerEndpoint",
    "BrokerError",
    "BrokerUnreachable",
    "DpopBound",
    "Forbidden",
    "NeedsAuthorization",
    "NotFound",
    "RateLimited",
    "Token",
    "TokenSource",
    "TokenUnavailable",
    "Unauthorized",
    "UpstreamError",
    "__version__",
]
