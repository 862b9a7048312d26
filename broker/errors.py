"""The error tree. Messages never carry a secret, a client key or a token."""

from __future__ import annotations

from collections.abc import Sequence


class BrokerError(Exception):
    """Base of every error token-broker raises on purpose."""


class ConfigError(BrokerError):
    """A configuration mistake: names the offending key and the reason."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class ConfigErrors(ConfigError):
    """Several configuration mistakes, found in one pass. `key` and `reason` are the first's."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        super().__init__(errors[0].key, errors[0].reason)
        self.errors = tuple(errors)

    def __str__(self) -> str:
        return f"{len(self.errors)} mistakes:\n" + "\n".join(f"  {e}" for e in self.errors)


class TokenEndpointError(BrokerError):
    """The token endpoint did not give us a token."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        description: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.description = description


class TransientTokenError(TokenEndpointError):
    """Worth retrying: network errors, timeouts, 5xx, 429, a 200 whose body is not a token.

    `outcome_unknown` is True when the request may have reached the server and been acted on
    without an answer reaching us (a timeout or reset after sending, a gateway's 502/504, a
    200 with a broken body): a refresh token sent that way may have been rotated already.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        description: str | None = None,
        retry_after: float | None = None,
        outcome_unknown: bool = False,
    ) -> None:
        super().__init__(message, status=status, error=error, description=description)
        self.retry_after = retry_after
        self.outcome_unknown = outcome_unknown


class PermanentTokenError(TokenEndpointError):
    """Retrying will not help until something changes: RFC 6749 §5.2 errors, Twilio 32xxxx."""

    @property
    def is_invalid_client(self) -> bool:
        """True when the server rejected the client's credentials (a cue to try the old secret)."""
        return self.error in {"invalid_client", "322402"} or (
            self.error is None and self.status == 401
        )

    @property
    def is_invalid_grant(self) -> bool:
        """True when the grant (code or refresh token) is invalid, expired or revoked."""
        return self.error == "invalid_grant"


class StoreUnavailable(BrokerError):
    """The shared store could not be reached or answered with an error."""


class UnreadableTokenSet(StoreUnavailable):
    """The stored set exists but this replica cannot decrypt it (a key it lacks, or damage).

    Unreadable is not missing: for a grant with a refresh token it means "do not spend".
    `rank` is the stored (lineage, generation), readable beside the blob.
    """

    def __init__(self, message: str, *, rank: tuple[int, int], version: int) -> None:
        super().__init__(message)
        self.rank = rank
        self.version = version


class NotDurable(StoreUnavailable):
    """A write was applied on the store's primary, but no replica acknowledged it in time.

    With `store.require_replica_ack`, a spend record that only the primary holds may vanish in a
    failover (asynchronous replication), or live on a primary the rest of the fleet no longer
    writes to (a split brain): its refresh token is not sent.
    """


class TokenUnavailable(BrokerError):
    """No token with enough time left can be served now."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NeedsAuthorization(BrokerError):
    """The app's grant is missing or dead: an operator must run `token-broker authorize`."""


class RateLimited(BrokerError):
    """Too many forced refreshes for one app."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ListenError(BrokerError):
    """A listener could not bind: names the setting (`server.listen`), the address and why."""

    def __init__(self, setting: str, address: str, reason: str) -> None:
        super().__init__(f"{setting}: cannot listen on {address}: {reason}")
        self.setting = setting
        self.address = address
        self.reason = reason


class CredentialFileError(PermanentTokenError):
    """A credential file the platform keeps fresh is missing, unreadable or expired.

    Nothing was sent: the message names the key, the file and (for an assertion) its `exp`,
    never the file's content. Like any permanent error it waits long, and the file watcher
    wakes the refresh as soon as the file changes.
    """
