"""`token-broker authorize APP`: authorization-code onboarding (RFC 6749 §4.1, PKCE RFC 7636).

Prints the authorize URL (with `state`, and a PKCE S256 challenge unless the app turns it off),
reads the redirected URL (or the bare code) from stdin, checks `state`, exchanges the code at
once (it lives five minutes) and writes the token set to the shared store, where running brokers
pick it up.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp

from broker.clock import Clock, SystemClock
from broker.credentials import Credentials
from broker.errors import (
    BrokerError,
    ConfigError,
    PermanentTokenError,
    TokenEndpointError,
    UnreadableTokenSet,
)
from broker.fleetclock import FleetClock
from broker.logs import audit, get_logger
from broker.metrics import Metrics
from broker.model import AppSpec, Config, GrantType, TokenSet
from broker.oauth.client import OAuthClient
from broker.store import TokenSets, bound_name, client_binding
from broker.store.factory import open_store

if TYPE_CHECKING:
    from broker.dpop import AppDpop

log = get_logger(__name__)

CODE_LIFETIME_NOTE = "The code expires five minutes after you approve: paste it promptly."


class AuthorizationFailed(BrokerError):
    """The onboarding did not produce a stored token set; the message says why and what to do."""


@dataclass(frozen=True)
class AuthorizationRequest:
    """What the authorize URL carries and what the exchange needs back."""

    url: str
    state: str
    code_verifier: str | None


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge) per RFC 7636."""
    verifier = secrets.token_urlsafe(64)[:96]
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorization_request(spec: AppSpec, client_id: str) -> AuthorizationRequest:
    """The authorize URL for `spec`, with a random state and (unless disabled) PKCE."""
    if spec.authorize_url is None or spec.redirect_uri is None:
        raise ConfigError(f"apps.{spec.name}", "authorize needs authorize_url and redirect_uri")
    state = secrets.token_urlsafe(24)
    params = {
        "client_id": client_id,
        "response_type": "code",
        "redirect_uri": spec.redirect_uri,
        "state": state,
    }
    if spec.scopes:
        params["scope"] = " ".join(spec.scopes)
    verifier = None
    if spec.pkce:
        verifier, challenge = pkce_pair()
        params["code_challenge"] = challenge
        params["code_challenge_method"] = "S256"
    params.update(spec.authorize_params)
    separator = "&" if "?" in spec.authorize_url else "?"
    return AuthorizationRequest(
        url=f"{spec.authorize_url}{separator}{urlencode(params)}",
        state=state,
        code_verifier=verifier,
    )


def code_from_redirect(pasted: str, expected_state: str) -> str:
    """The code in a pasted redirect URL (state checked), or a pasted bare code."""
    text = pasted.strip()
    if not text:
        raise AuthorizationFailed("nothing was pasted")
    if "?" not in text and "=" not in text:
        raise AuthorizationFailed(
            "that is a bare code, but this prompt checks state: paste the whole redirected URL "
            "(or run with --code to skip the state check)"
        )
    query = parse_qs(urlsplit(text).query if "?" in text else text)
    if "error" in query:
        description = query.get("error_description", [""])[0][:200]
        raise AuthorizationFailed(f"the server refused: {query['error'][0]} {description}".strip())
    states = query.get("state", [])
    if not states:
        raise AuthorizationFailed("the redirected URL has no state: refusing it")
    if not secrets.compare_digest(states[0], expected_state):
        raise AuthorizationFailed("the state does not match this authorization: refusing it")
    codes = query.get("code", [])
    if not codes or not codes[0]:
        raise AuthorizationFailed("the redirected URL has no code")
    return codes[0]


async def new_lineage(store: TokenSets, app: str, clock: Clock) -> int:
    """A lineage number above every earlier one: an authorization outranks any older set.

    The time in milliseconds, so even a store that forgot the old lineage (emptied) ranks the
    new grant above the sets replicas still hold in memory.
    """
    try:
        current = await store.load(app)
        before = current.lineage if current is not None else 0
    except UnreadableTokenSet as exc:
        before = exc.rank[0]
    return max(before + 1, int(clock.time() * 1000))


def _dpop(spec: AppSpec, metrics: Metrics, clock: SystemClock) -> AppDpop | None:
    """The app's DPoP when it has `dpop: true`: the code is exchanged for a bound set."""
    if not spec.dpop:
        return None
    # Imported here: only DPoP apps load pyjwt and cryptography.
    from broker.dpop import app_dpop

    return app_dpop(spec, metrics, clock.time)


async def exchange_and_store(
    config: Config, spec: AppSpec, code: str, code_verifier: str | None
) -> TokenSet:
    """Exchange `code` at once and write the token set to the shared store."""
    base = SystemClock()
    metrics = Metrics()
    store = open_store(config.store, metrics, base)
    assert spec.redirect_uri is not None
    # The token set's expiry is written in the fleet's frame (the store's clock), like every
    # broker's; measuring it first also checks the store answers before the code is spent.
    clock = FleetClock(base)
    try:
        if await clock.measure(store) == "unavailable":
            raise AuthorizationFailed(
                "the store does not answer; the code was not used, run authorize again when "
                "Redis is reachable"
            )
        async with aiohttp.ClientSession() as session:
            client = OAuthClient(
                spec, Credentials(spec), session, clock, metrics, dpop=_dpop(spec, metrics, base)
            )
            try:
                token = await client.exchange_code(code, spec.redirect_uri, code_verifier)
            except PermanentTokenError as exc:
                if exc.is_invalid_grant or exc.error == "322403":
                    raise AuthorizationFailed(
                        "the server rejected the code (invalid_grant): it expired (codes live "
                        "five minutes), was already used, or redirect_uri does not match the "
                        "one registered for the app. Run authorize again."
                    ) from None
                raise AuthorizationFailed(f"the token endpoint refused: {exc}") from None
            except TokenEndpointError as exc:
                raise AuthorizationFailed(f"the token endpoint failed: {exc}") from None
        if not token.refresh_token:
            raise AuthorizationFailed(
                "the server returned no refresh token, so the broker could not renew the access "
                "token; ask for offline access (e.g. the offline_access scope) and run again"
            )
        # Stored under the app's client binding, as the brokers with this config read it: a
        # broker whose token URL, client id, grant, scopes or audience differ never uses it.
        name = bound_name(spec.name, client_binding(spec, Credentials(spec).client_id()))
        token = replace(token, lineage=await new_lineage(store, name, clock), generation=1)
        commit = await store.commit(name, token)
        if not commit.stored:
            raise AuthorizationFailed("another writer changed the stored token set; run again")
    finally:
        await store.close()
    audit(log, "app.authorized", app=spec.name, token_fingerprint=token.fingerprint)
    return token


async def authorize(
    config: Config,
    app: str,
    *,
    code: str | None,
    code_verifier: str | None,
    read_line: Callable[[], str],
    say: Callable[[str], None],
) -> TokenSet:
    """The whole onboarding; `read_line` and `say` are the terminal (stdin and stderr)."""
    spec = config.apps.get(app)
    if spec is None:
        raise ConfigError(
            "APP", f"no app named {app!r} in the config (apps: {', '.join(sorted(config.apps))})"
        )
    if spec.grant_type is not GrantType.AUTHORIZATION_CODE:
        raise ConfigError(f"apps.{app}.grant_type", "authorize is for authorization_code apps")
    # Checked before the URL is printed: the browser round trip spends the one-time code.
    if config.store.url.startswith("memory://"):
        raise ConfigError(
            "store.url",
            "is memory://: a token set stored by this command would vanish with it; "
            "authorize needs the shared (Redis) store the brokers read",
        )
    if code is None:
        request = authorization_request(spec, Credentials(spec).client_id())
        say("Open this URL in a browser, sign in and approve access:\n")
        say(f"  {request.url}\n")
        say(CODE_LIFETIME_NOTE)
        say("Then paste the URL you were redirected to (it holds the code and the state):")
        code = code_from_redirect(read_line(), request.state)
        code_verifier = request.code_verifier
    token = await exchange_and_store(config, spec, code, code_verifier)
    say(f"Authorized {app}: token set stored; running brokers pick it up now.")
    return token
