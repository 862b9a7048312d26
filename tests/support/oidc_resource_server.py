"""An API that accepts oidc-provider's DPoP-bound tokens only with a valid proof (RFC 9449 §7).

The proof is checked by tests/support/dpop.py's `DpopVerifier` (written from the RFC, apart
from broker/dpop.py): `typ`, algorithm, public JWK and signature, `htm` and `htu` against the
request received, `iat`, `jti` never seen before, `ath` the hash of the presented token, the
key's thumbprint the token's `cnf.jkt`, and this server's nonce, which it asks for with a
`use_dpop_nonce` challenge and changes every `nonce_period` seconds. The token is checked at
oidc-provider's introspection endpoint: active, of type DPoP, and its `cnf.jkt`. Every
acceptance and the reason for each refusal are recorded.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.dpop import DpopVerifier, InvalidProof
from tests.support.oidc_provider import OIDCProvider
from tests.support.ports import free_port

NONCE_CHALLENGE = "use_dpop_nonce"


@dataclass
class IntrospectingResourceServer:
    """An HTTP API on loopback (`start()`/`stop()`); every path answers `{"ok": true}` to a
    request that proves possession of the key its token is bound to."""

    provider: OIDCProvider
    nonce_period: float = 10.0
    port: int = 0
    accepted: int = 0
    # The reason of each refusal: "nonce" for a nonce challenge, else the check that failed.
    refusals: Counter[str] = field(default_factory=Counter)
    verifier: DpopVerifier = field(default_factory=lambda: DpopVerifier(require_nonce=True))
    _nonce_at: float = field(default_factory=time.monotonic)
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
        if time.monotonic() - self._nonce_at >= self.nonce_period:
            self._nonce_at = time.monotonic()
            return self.verifier.rotate_nonce()
        return self.verifier.nonce

    async def _handle(self, request: web.Request) -> web.Response:
        self.current_nonce()
        try:
            await self._verify(request)
        except InvalidProof as refused:
            nonce = refused.error == NONCE_CHALLENGE
            self.refusals["nonce" if nonce else str(refused)] += 1
            headers = {
                "WWW-Authenticate": f'DPoP algs="ES256", error="{refused.error}"',
                "DPoP-Nonce": self.verifier.nonce,
            }
            return web.json_response({"error": str(refused)}, status=401, headers=headers)
        self.accepted += 1
        return web.json_response({"ok": True}, headers={"DPoP-Nonce": self.verifier.nonce})

    async def _verify(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "dpop" or not token:
            raise InvalidProof("no DPoP token", error="invalid_token")
        proofs = request.headers.getall("DPoP", [])
        if len(proofs) > 1:
            raise InvalidProof("more than one proof")
        introspection = await self.provider.introspect(token)
        if introspection.get("active") is not True:
            raise InvalidProof("token not active", error="invalid_token")
        jkt = introspection.get("cnf", {}).get("jkt")
        if introspection.get("token_type") != "DPoP" or not jkt:
            raise InvalidProof("token not DPoP-bound", error="invalid_token")
        url = f"{self.origin}{request.raw_path.partition('?')[0]}"
        self.verifier.verify(
            proofs[0] if proofs else None, request.method, url, access_token=token, jkt=jkt
        )


async def present(url: str, token: str, proof: str | None, scheme: str = "DPoP") -> tuple[int, str]:
    """GET `url` with `token` (and `proof`, if any), as a holder of a copied token would; the
    status and the refusal's reason (or "ok")."""
    headers = {"Authorization": f"{scheme} {token}"}
    if proof is not None:
        headers["DPoP"] = proof
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        body: dict[str, Any] = await response.json()
        return response.status, "ok" if body.get("ok") else str(body.get("error"))
