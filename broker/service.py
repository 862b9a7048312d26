"""What the local API needs from the broker core: the TokenService protocol and AppStatus."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from broker.model import AppState, TokenSet


@dataclass(frozen=True, slots=True)
class AppStatus:
    """An app as `GET /v1/apps` shows it. `last_error` is a classified, secret-free string."""

    name: str
    state: AppState
    expires_at: float | None
    last_refresh_at: float | None
    last_error: str | None


class TokenService(Protocol):
    """The broker core as seen by the API. Token lookups answer from memory.

    `get_token` and `force_refresh` raise (from broker.errors) `TokenUnavailable`,
    `NeedsAuthorization`, `RateLimited` (force only), and `ValueError` for a `min_ttl`
    the app cannot satisfy (longer than its token lifetime).
    """

    def app_names(self) -> Collection[str]:
        """Every configured app."""
        ...

    def now(self) -> float:
        """Wall time from the broker's clock (for `expires_in`)."""
        ...

    def cached_token(self, app: str, min_ttl: float = 0.0) -> TokenSet | None:
        """The in-memory token if it is servable with `min_ttl` seconds left, else None."""
        ...

    def current_token(self, app: str) -> TokenSet | None:
        """The token in memory, servable or not: whether an answer built from a token is current."""
        ...

    def remaining(self, app: str) -> float:
        """Seconds the current token has left by every clock (the fleet's, the pod's own, the
        monotonic guard): the `expires_in` of an answer built from the current token."""
        ...

    def servable_until(self, app: str) -> float:
        """The monotonic time after which the current token stops being servable, as the clocks
        stand now (-inf: no token)."""
        ...

    async def get_token(self, app: str, min_ttl: float = 0.0) -> TokenSet:
        """A token with more than the safety margin (and at least `min_ttl` seconds) left."""
        ...

    async def force_refresh(self, app: str) -> TokenSet:
        """Refresh now (coalesced, rate-limited), then answer as get_token."""
        ...

    async def token_refused(self, app: str, token: TokenSet) -> TokenSet:
        """The upstream refused `token` (the proxy's `refresh_on_status`): purge it fleet-wide
        (recorded in the store, refreshed once under the lease) and return the token to retry
        with, the refused one when no successor came in time. Raises RateLimited when the app's
        last purge is too recent."""
        ...

    def status(self, app: str) -> AppStatus:
        """The app's state for `GET /v1/apps`."""
        ...

    def unready_apps(self) -> list[str]:
        """Required apps without a servable token (empty: ready). Includes all while draining."""
        ...

    def app_ready(self, app: str) -> bool:
        """`app` has a servable token and the broker is not draining (required or not)."""
        ...
