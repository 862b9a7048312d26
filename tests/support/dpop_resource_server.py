"""A resource server that accepts DPoP-bound tokens only with a valid proof (RFC 9449 §7).

It checks everything a careful API checks, with its own code (not broker.dpop's): the proof's
`typ`, algorithm, public JWK and signature; `htm` and `htu` against the request it received;
`iat` within a minute; `jti` never seen before; `ath` the hash of the presented token; the
`nonce` it issued (it asks for one with a `use_dpop_nonce` challenge, and changes it every
`nonce_period` seconds); and, at the authorization server's introspection endpoint, that the
token is active, of type DPoP, and bound (`cnf.jkt`) to the key that signed the proof. Every
request and the reason for each refusal are recorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
from aiohttp import web

from tests.support.oidc_provider import OIDCProvider
from tests.support.ports import free_port

ASYMMETRIC = frozenset({"ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA"})
# RFC 7638: the required members of each key type, the thumbprint's input.
THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}
IAT_WINDOW = 60.0
NONCE_CHALLENGE = "use_dpop_nonce"


def b64url(data: bytes) -> str:
    """Base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK."""
    members = {name: jwk[name] for name in THUMBPRINT_MEMBERS[jwk["kty"]]}
    return b64url(
        hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    )


class Refused(Exception):
    """A request the resource server refuses; `reason` is recorded, `nonce` asks for one."""

    def __init__(self, reason: str, *, nonce: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.nonce = nonce


@dataclass
class DpopResourceServer:
    """An HTTP API on loopback (`start()`/`stop()`); every path answers `{"ok": true}` when the
    request proves possession of the key its token is bound to."""

    provider: OIDCProvider
    nonce_period: float = 10.0
    port: int = 0
    accepted: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    _seen_jti: set[str] = field(default_factory=set)
    _nonce: str = ""
    _nonce_at: float = 0.0
    _runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        """scheme://host:port, as the broker's `proxy.upstream` names it."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on a reserved loopback port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = self.port or free_port()
        try:
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def current_nonce(self) -> str:
        """The nonce proofs must carry now; a new one every `nonce_period` seconds."""
        now = time.monotonic()
        if not self._nonce or now - self._nonce_at >= self.nonce_period:
            self._nonce, self._nonce_at = secrets.token_urlsafe(16), now
        return self._nonce

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            await self._verify(request)
        except Refused as refused:
            self.refusals[refused.reason] += 1
            challenge = 'DPoP algs="ES256 ES384 ES512 RS256 PS256 EdDSA"'
            challenge += f', error="{NONCE_CHALLENGE if refused.nonce else "invalid_token"}"'
            headers = {"WWW-Authenticate": challenge, "DPoP-Nonce": self.current_nonce()}
            return web.json_response({"error": refused.reason}, status=401, headers=headers)
        self.accepted += 1
        return web.json_response(
            {"ok": True, "path": request.path}, headers={"DPoP-Nonce": self.current_nonce()}
        )

    async def _verify(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "dpop" or not token:
            raise Refused("no DPoP token")
        proofs = request.headers.getall("DPoP", [])
        if len(proofs) != 1:
            raise Refused("not exactly one proof")
        claims, jwk = self._check_proof(proofs[0])
        htu = f"{self.origin}{request.raw_path.partition('?')[0]}"
        if claims.get("htm") != request.method:
            raise Refused("htm")
        if claims.get("htu") != htu:
            raise Refused("htu")
        if claims.get("ath") != b64url(hashlib.sha256(token.encode("ascii")).digest()):
            raise Refused("ath")
        if abs(time.time() - float(claims.get("iat", 0))) > IAT_WINDOW:
            raise Refused("iat")
        if claims.get("nonce") != self.current_nonce():
            raise Refused("nonce", nonce=True)
        jti = str(claims.get("jti", ""))
        if not jti or jti in self._seen_jti:
            raise Refused("jti replayed")
        self._seen_jti.add(jti)
        introspection = await self.provider.introspect(token)
        if introspection.get("active") is not True:
            raise Refused("token not active")
        if introspection.get("token_type") != "DPoP":
            raise Refused("token not DPoP-bound")
        if introspection.get("cnf", {}).get("jkt") != thumbprint(jwk):
            raise Refused("token bound to another key")

    def _check_proof(self, proof: str) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            header = jwt.get_unverified_header(proof)
        except jwt.PyJWTError:
            raise Refused("proof not a JWT") from None
        jwk = header.get("jwk")
        if header.get("typ") != "dpop+jwt" or header.get("alg") not in ASYMMETRIC:
            raise Refused("proof header")
        if not isinstance(jwk, dict) or "d" in jwk:
            raise Refused("proof key")
        try:
            key = jwt.PyJWK(jwk, algorithm=header["alg"])
            claims: dict[str, Any] = jwt.decode(
                proof,
                key.key,
                algorithms=[header["alg"]],
                options={"require": ["jti", "htm", "htu", "iat"], "verify_iat": False},
            )
        except jwt.PyJWTError:
            raise Refused("proof signature") from None
        return claims, jwk


async def present(
    url: str, token: str, proof: str | None, scheme: str = "DPoP"
) -> tuple[int, dict[str, Any]]:
    """GET `url` with `token` (and `proof`, if any), as a holder of a copied token would."""
    headers = {"Authorization": f"{scheme} {token}"}
    if proof is not None:
        headers["DPoP"] = proof
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        body: dict[str, Any] = await response.json()
        return response.status, body
