"""A DPoP (RFC 9449) proof verifier for the test servers, and a resource server that uses it.

`DpopVerifier.verify` checks what a server must (RFC 9449 §4.3): a JWT with `typ: dpop+jwt`, an
asymmetric `alg`, a public `jwk` in its header whose key verifies the signature, `htm` and `htu`
matching the request (the URI without query and fragment), `iat` within a window, a `jti` never
seen before, `ath` matching the presented access token, the nonce the server asked for, and the
key's thumbprint matching the token's `cnf.jkt`. It is written from the RFC with pyjwt, not with
broker/dpop.py, so it checks the broker rather than agreeing with it.

`DpopResourceServer` is an aiohttp API that accepts only `Authorization: DPoP <token>` with a
valid proof, the token verified by the OAuth test server (signature, expiry, `cnf.jkt`); it can
demand nonces (401 `WWW-Authenticate: DPoP error="use_dpop_nonce"` with a `DPoP-Nonce`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt
from aiohttp import web

ASYMMETRIC = ["ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA"]
_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}


class InvalidProof(Exception):
    """The proof fails a check; the message says which (`use_dpop_nonce` for a nonce)."""

    def __init__(self, reason: str, *, error: str = "invalid_dpop_proof") -> None:
        super().__init__(reason)
        self.error = error


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url."""
    members = {name: jwk[name] for name in _MEMBERS[jwk["kty"]]}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode())
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def normalized_uri(url: str) -> str:
    """The URI as `htu` must name it: lower-case scheme and host, no default port, no query or
    fragment (RFC 9449 §4.3 step 9, RFC 3986 §6.2.2-3)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(scheme):
        host = f"{host}:{parts.port}"
    return urlunsplit((scheme, host, parts.path or "/", "", ""))


@dataclass
class DpopVerifier:
    """Verifies proofs for one server; remembers every `jti` it accepted (replay)."""

    iat_window: float = 60.0
    require_nonce: bool = False
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    seen_jti: set[str] = field(default_factory=set)
    accepted: int = 0
    clock: Callable[[], float] = time.time

    def rotate_nonce(self) -> str:
        """A new nonce: proofs must carry it from now on (when nonces are required)."""
        self.nonce = secrets.token_urlsafe(16)
        return self.nonce

    def verify(
        self,
        proof: str | None,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        jkt: str | None = None,
    ) -> str:
        """Check `proof` for this request; returns the key's thumbprint (InvalidProof if not)."""
        if not proof:
            raise InvalidProof("no DPoP proof")
        try:
            header = jwt.get_unverified_header(proof)
        except jwt.PyJWTError:
            raise InvalidProof("not a JWS") from None
        if header.get("typ") != "dpop+jwt":
            raise InvalidProof("typ is not dpop+jwt")
        if header.get("alg") not in ASYMMETRIC:
            raise InvalidProof("alg is not an asymmetric algorithm")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict) or any(k in jwk for k in ("d", "p", "q", "dp", "dq", "qi")):
            raise InvalidProof("jwk missing, or a private key")
        try:
            key = jwt.PyJWK(jwk, algorithm=header["alg"])
            claims = jwt.decode(
                proof,
                key.key,
                algorithms=[header["alg"]],
                # iat is checked below, against this verifier's clock.
                options={"require": ["jti", "htm", "htu", "iat"], "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise InvalidProof(f"signature or claims: {exc}") from None
        if claims["htm"] != method:
            raise InvalidProof(f"htm {claims['htm']} is not {method}")
        if claims["htu"] != normalized_uri(url):
            raise InvalidProof(f"htu {claims['htu']} is not {normalized_uri(url)}")
        if abs(self.clock() - float(claims["iat"])) > self.iat_window:
            raise InvalidProof("iat outside the window")
        if access_token is not None:
            digest = hashlib.sha256(access_token.encode()).digest()
            if claims.get("ath") != base64.urlsafe_b64encode(digest).rstrip(b"=").decode():
                raise InvalidProof("ath does not match the access token")
        elif "ath" in claims:
            raise InvalidProof("ath without an access token")
        found = thumbprint(jwk)
        if jkt is not None and found != jkt:
            raise InvalidProof("the proof's key is not the one the token is bound to")
        if self.require_nonce and claims.get("nonce") != self.nonce:
            raise InvalidProof("a nonce is required", error="use_dpop_nonce")
        if claims["jti"] in self.seen_jti:
            raise InvalidProof("jti replayed")
        self.seen_jti.add(claims["jti"])
        self.accepted += 1
        return found


class DpopResourceServer:
    """An API on loopback that accepts only DPoP-bound tokens with a valid proof per request.

    `check_token(token) -> claims` verifies the access token itself (the OAuth test server's
    `verify_access_token`); its `cnf.jkt` must match the proof's key.
    """

    def __init__(self, check_token: Callable[[str], dict[str, Any]]) -> None:
        self.check_token = check_token
        self.verifier = DpopVerifier()
        self.accepted: list[str] = []  # request paths accepted
        self.refused: list[tuple[str, str]] = []  # (path, reason)
        self.challenges = 0  # nonce challenges answered
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Listen on 127.0.0.1 (a free port); returns the base URL."""
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.base_url

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        url = f"{self.base_url}{request.path}"
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            if scheme != "DPoP" or not token:
                raise InvalidProof("not a DPoP token", error="invalid_token")
            try:
                claims = self.check_token(token)
            except jwt.PyJWTError:
                raise InvalidProof("the token is not valid", error="invalid_token") from None
            jkt = claims.get("cnf", {}).get("jkt")
            if not jkt:
                raise InvalidProof("the token is not DPoP-bound", error="invalid_token")
            self.verifier.verify(
                request.headers.get("DPoP"), request.method, url, access_token=token, jkt=jkt
            )
        except InvalidProof as exc:
            self.refused.append((request.path, str(exc)))
            headers = {"WWW-Authenticate": f'DPoP error="{exc.error}", algs="ES256"'}
            if exc.error == "use_dpop_nonce":
                self.challenges += 1
                headers["DPoP-Nonce"] = self.verifier.nonce
            return web.json_response({"error": exc.error}, status=401, headers=headers)
        self.accepted.append(request.path)
        return web.json_response({"ok": True, "path": request.path})
