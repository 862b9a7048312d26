"""DPoP (RFC 9449): an app's proof keys, the proofs they sign, and the nonces servers ask for.

An app with `dpop: true` proves possession of a private key with every token request and every
request that presents its access token: a short JWT (`typ: dpop+jwt`, the public key in its
header) over the method, the target URI without query and fragment (`htu`), the time (`iat`),
a unique id (`jti`) and, beside an access token, its hash (`ath`). The server binds the tokens
to the key's thumbprint (`cnf.jkt`), so a token copied out of the pod is useless without the key.

The fleet shares one token set per app, so it shares the key: `dpop_key_file` holds one PEM
private key or several, like the store key file's lines: the first binds new tokens, each one
proves for the sets bound to it (a set records its key's thumbprint), so a key is rolled in two
steps (docs/operations.md). A broker on `memory://` (one process) may leave the file out and
use a key made at start. The key and a proof's `jti` are never logged.

Imported only when an app has `dpop: true` (pyjwt and cryptography cost about 9 MiB).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.algorithms import get_default_algorithms
from yarl import URL

from broker.errors import ConfigError
from broker.logs import get_logger
from broker.metrics import Metrics
from broker.model import AppSpec, DpopAlgorithm, TokenSet

log = get_logger(__name__)

PROOF_TYPE = "dpop+jwt"
NONCE_HEADER = "DPoP-Nonce"
USE_NONCE = "use_dpop_nonce"
# Servers whose nonce is remembered, per app: a bound, since the proxy's upstream is one origin
# and the token endpoint another; more is a misconfiguration, not a reason to grow.
MAX_NONCE_SERVERS = 64
MIN_RSA_BITS = 2048
_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL
)  # one private key per block
_CURVES: Mapping[DpopAlgorithm, type[ec.EllipticCurve]] = {
    DpopAlgorithm.ES256: ec.SECP256R1,
    DpopAlgorithm.ES384: ec.SECP384R1,
    DpopAlgorithm.ES512: ec.SECP521R1,
}
# The members of each key type's public JWK, in the order RFC 7638's thumbprint sorts them.
_JWK_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}
# RFC 9449 §7.1 and §9: the resource server's challenge names the DPoP scheme and this error.
_DPOP_SCHEME = re.compile(r"(?i)(?:^|,)\s*dpop(?:\s|$)")
_NONCE_ERROR = re.compile(r'(?i)\berror\s*=\s*"?use_dpop_nonce\b')

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DpopKeyMissing(Exception):
    """A token set is bound to a key that `dpop_key_file` no longer holds."""


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def access_token_hash(access_token: str) -> str:
    """The `ath` claim: base64url of the SHA-256 of the access token's ASCII."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def target_uri(url: str | URL) -> str:
    """The `htu` claim: the request's URI without query and fragment (RFC 9449 §4.2).

    The scheme and host are lower case and a default port is left out (RFC 3986 §6.2.2-3), as
    the verifying server normalises them; the path keeps its percent-encoding.
    """
    parsed = url if isinstance(url, URL) else URL(url, encoded=True)
    host = (parsed.raw_host or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parsed.explicit_port
    if port is not None and port != {"http": 80, "https": 443}.get(parsed.scheme.lower()):
        host = f"{host}:{port}"
    return f"{parsed.scheme.lower()}://{host}{parsed.raw_path or '/'}"


def origin_of(url: str | URL) -> str:
    """The server a nonce belongs to: scheme, host and port."""
    parsed = url if isinstance(url, URL) else URL(url, encoded=True)
    return f"{parsed.scheme.lower()}://{(parsed.raw_host or '').lower()}:{parsed.port}"


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638: base64url SHA-256 of the required members, sorted, without whitespace."""
    members = {name: jwk[name] for name in _JWK_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return b64url(hashlib.sha256(canonical).digest())


class ProofKey:
    """One private key and what every proof it signs shares: the encoded header.

    The header (typ, alg, the public JWK) is the same for every proof, so it is encoded once;
    a proof costs a JSON of five claims and one signature.
    """

    def __init__(self, private_key: PrivateKey, algorithm: DpopAlgorithm) -> None:
        self._key = private_key
        self.algorithm = algorithm
        self._signer: Any = get_default_algorithms()[algorithm.value]
        full = json.loads(self._signer.to_jwk(private_key.public_key()))
        self.jwk: dict[str, str] = {name: full[name] for name in _JWK_MEMBERS[full["kty"]]}
        self.jkt = jwk_thumbprint(self.jwk)
        header = {"typ": PROOF_TYPE, "alg": algorithm.value, "jwk": self.jwk}
        self._header = b64url(json.dumps(header, separators=(",", ":")).encode())

    def __repr__(self) -> str:
        # Never the key: its thumbprint (public) names it.
        return f"ProofKey({self.algorithm.value}, jkt={self.jkt})"

    def proof(
        self,
        method: str,
        url: str | URL,
        now: float,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
    ) -> str:
        """A fresh proof (a new `jti`) for one request."""
        claims: dict[str, object] = {
            "jti": secrets.token_urlsafe(16),
            "htm": method.upper(),
            "htu": target_uri(url),
            "iat": int(now),
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{self._header}.{payload}"
        signature = self._signer.sign(signing_input.encode("ascii"), self._key)
        return f"{signing_input}.{b64url(signature)}"


@dataclass(frozen=True)
class ProofKeys:
    """An app's keys: the first binds new tokens, each proves for the sets bound to it."""

    keys: tuple[ProofKey, ...]
    generated: bool = False

    @property
    def current(self) -> ProofKey:
        """The key new token requests are proved with."""
        return self.keys[0]

    def find(self, jkt: str | None) -> ProofKey:
        """The key with thumbprint `jkt` (None: the current one); DpopKeyMissing if absent."""
        if jkt is None:
            return self.current
        for key in self.keys:
            if key.jkt == jkt:
                return key
        raise DpopKeyMissing(
            f"the token set is bound to DPoP key {jkt}, which the key file no longer holds"
        )


def generate_key(algorithm: DpopAlgorithm) -> PrivateKey:
    """A new private key for `algorithm` (a broker on memory:// without a key file)."""
    if algorithm in _CURVES:
        return ec.generate_private_key(_CURVES[algorithm]())
    if algorithm is DpopAlgorithm.EDDSA:
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)


def check_key(private_key: object, algorithm: DpopAlgorithm) -> str | None:
    """Why `private_key` cannot sign `algorithm` proofs, or None when it can."""
    if algorithm in _CURVES:
        curve = _CURVES[algorithm]
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            return f"{algorithm.value} needs an EC key ({curve.name})"
        if not isinstance(private_key.curve, curve):
            return f"{algorithm.value} needs curve {curve.name}, not {private_key.curve.name}"
        return None
    if algorithm is DpopAlgorithm.EDDSA:
        if not isinstance(private_key, ed25519.Ed25519PrivateKey):
            return "EdDSA needs an Ed25519 key"
        return None
    if not isinstance(private_key, rsa.RSAPrivateKey):
        return f"{algorithm.value} needs an RSA key"
    if private_key.key_size < MIN_RSA_BITS:
        return f"RSA key of {private_key.key_size} bits; at least {MIN_RSA_BITS} needed"
    return None


def read_key_file(path: Path, algorithm: DpopAlgorithm, key: str) -> ProofKeys:
    """The PEM private keys in `path`, in order; ConfigError (at `key`) names the block, never
    the key material."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    blocks = [match.group(0) for match in _PEM_BLOCK.finditer(data)]
    if not blocks:
        raise ConfigError(key, f"{path} holds no PEM private key")
    keys: list[ProofKey] = []
    for number, block in enumerate(blocks, start=1):
        try:
            private_key = load_pem_private_key(block, password=None)
        except (ValueError, TypeError):
            raise ConfigError(
                key, f"{path}: key {number} is not an unencrypted PEM private key"
            ) from None
        why = check_key(private_key, algorithm)
        if why is not None:
            raise ConfigError(key, f"{path}: key {number}: {why}")
        assert isinstance(private_key, PrivateKey)
        proof_key = ProofKey(private_key, algorithm)
        if any(k.jkt == proof_key.jkt for k in keys):
            raise ConfigError(key, f"{path}: key {number} is there twice")
        keys.append(proof_key)
    return ProofKeys(tuple(keys))


def proof_keys(spec: AppSpec) -> ProofKeys:
    """The app's keys: from its key file, or (memory:// only; config.py checks) made now."""
    if spec.dpop_key_file is not None:
        return read_key_file(
            spec.dpop_key_file, spec.dpop_algorithm, f"apps.{spec.name}.dpop_key_file"
        )
    key = generate_key(spec.dpop_algorithm)
    return ProofKeys((ProofKey(key, spec.dpop_algorithm),), generated=True)


def is_token_endpoint_challenge(error: str | None, nonce: str | None) -> bool:
    """The authorization server asks for a nonce (RFC 9449 §8): `use_dpop_nonce` and a nonce."""
    return error == USE_NONCE and bool(nonce)


def is_resource_challenge(status: int, headers: Mapping[str, str]) -> bool:
    """A resource server asks for a nonce (RFC 9449 §9): 401, `WWW-Authenticate: DPoP
    error="use_dpop_nonce"` and a `DPoP-Nonce` header."""
    if status != 401 or not headers.get(NONCE_HEADER):
        return False
    getall = getattr(headers, "getall", None)
    challenges = getall("WWW-Authenticate", []) if getall else [headers.get("WWW-Authenticate")]
    return any(
        _DPOP_SCHEME.search(value) and _NONCE_ERROR.search(value) for value in challenges if value
    )


@dataclass
class Nonces:
    """The last nonce each server gave (from a challenge or any other answer), per origin."""

    by_origin: dict[str, str] = field(default_factory=dict)

    def get(self, url: str | URL) -> str | None:
        """The nonce to send to `url`'s server, if it gave one."""
        return self.by_origin.get(origin_of(url))

    def note(self, url: str | URL, headers: Mapping[str, str]) -> str | None:
        """Remember the `DPoP-Nonce` of an answer from `url`'s server; returns it (or None)."""
        nonce = headers.get(NONCE_HEADER)
        if not nonce:
            return None
        origin = origin_of(url)
        if origin not in self.by_origin and len(self.by_origin) >= MAX_NONCE_SERVERS:
            self.by_origin.clear()
        self.by_origin[origin] = nonce
        return nonce


# (app, use) -> None: counts a proof minted, `use` one of USES.
ProofCounter = Callable[[str, str], None]
USES = ("token_request", "proxy", "proof_api")


class AppDpop:
    """One app's DPoP: its keys, the nonces its servers gave, and proofs counted by use."""

    def __init__(
        self,
        app: str,
        keys: ProofKeys,
        now: Callable[[], float],
        counted: ProofCounter | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.nonces = Nonces()
        self._now = now
        self.counted = counted

    def proof(
        self,
        use: str,
        method: str,
        url: str | URL,
        *,
        jkt: str | None = None,
        access_token: str | None = None,
        nonce: str | None = None,
    ) -> str:
        """A proof with the key `jkt` names (None: the current key) and the server's nonce.

        Raises DpopKeyMissing when the key is gone. `nonce` overrides the remembered one.
        """
        key = self.keys.find(jkt)
        proof = key.proof(
            method,
            url,
            self._now(),
            access_token=access_token,
            nonce=nonce if nonce is not None else self.nonces.get(url),
        )
        if self.counted is not None:
            self.counted(self.app, use)
        return proof

    def token_headers(self, method: str, url: str | URL, token: TokenSet) -> dict[str, str]:
        """`Authorization: DPoP <token>` and its proof, for a request that presents `token`.

        A token the server did not bind (it answered Bearer) goes as a bearer token.
        """
        if token.dpop_jkt is None:
            return {}
        proof = self.proof(
            "proxy", method, url, jkt=token.dpop_jkt, access_token=token.access_token
        )
        return {"Authorization": f"DPoP {token.access_token}", "DPoP": proof}


def app_dpop(spec: AppSpec, metrics: Metrics, now: Callable[[], float]) -> AppDpop:
    """The DPoP of an app with `dpop: true`, its proofs counted on `metrics`.

    `now` is the pod's wall clock: a server checks `iat` against its own clock, not the fleet's.
    """
    children: dict[tuple[str, str], Any] = {}

    def counted(app: str, use: str) -> None:
        child = children.get((app, use))
        if child is None:
            child = children[(app, use)] = metrics.dpop_proofs.labels(app, use)
        child.inc()

    keys = proof_keys(spec)
    # The thumbprints are public (a server shows them in cnf.jkt); they name the keys for a
    # rotation (docs/operations.md). The keys themselves are never logged.
    log.info(
        "dpop.keys",
        app=spec.name,
        algorithm=spec.dpop_algorithm.value,
        binds=keys.current.jkt,
        proves=[key.jkt for key in keys.keys],
        generated=keys.generated,
    )
    return AppDpop(spec.name, keys, now, counted)
