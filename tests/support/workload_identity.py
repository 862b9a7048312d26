"""Workload identity for tests: a "cluster issuer" that mints projected service-account tokens
(or JWT-SVIDs), the token endpoint's federation policy that verifies them, and a test CA for
mTLS (RFC 8705) with server and client certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
SERVICE_ACCOUNT = "system:serviceaccount:payments:token-broker"


class ClusterIssuer:
    """A Kubernetes cluster's OIDC issuer: its own EC key, published as a JWKS."""

    def __init__(self, issuer: str = "https://oidc.cluster.test/id/7F3A") -> None:
        self.issuer = issuer
        self.key_id = uuid.uuid4().hex[:16]
        self._key = ec.generate_private_key(ec.SECP256R1())

    def mint(
        self,
        *,
        audience: str,
        subject: str = SERVICE_ACCOUNT,
        lifetime: float = 3600.0,
        issued_at: float | None = None,
        issuer: str | None = None,
    ) -> str:
        """A signed token like the kubelet's projected one (or spiffe-helper's JWT-SVID)."""
        now = time.time() if issued_at is None else issued_at
        claims = {
            "iss": issuer or self.issuer,
            "sub": subject,
            "aud": [audience],
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.key_id})

    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set a federation trust fetches from the issuer."""
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": self.key_id, "alg": "ES256", "use": "sig"}]}


@dataclass
class FederationPolicy:
    """What the token endpoint trusts: the issuer's JWKS and the claims it must carry.

    `assertion_type` is the client_assertion_type expected, or TOKEN_EXCHANGE: the JWT is then
    the subject_token of an RFC 8693 exchange (Google STS).

    `verified` keeps the claims of every accepted assertion; `refusals` the reason of each one
    refused.
    """

    issuer: str
    jwks: dict[str, Any]
    audience: str
    subject: str
    assertion_type: str = JWT_BEARER
    verified: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    def check(self, form: dict[str, str]) -> str | None:
        """None when the form's client assertion is accepted, else why it is refused."""
        reason = self._reason(form)
        if reason is not None:
            self.refusals.append(reason)
        return reason

    def _reason(self, form: dict[str, str]) -> str | None:
        if self.assertion_type == TOKEN_EXCHANGE:  # RFC 8693, as Google STS takes it
            if form.get("grant_type") != TOKEN_EXCHANGE:
                return "not a token exchange"
            if form.get("subject_token_type") != JWT_TOKEN_TYPE:
                return "wrong subject_token_type"
            assertion = form.get("subject_token", "")
        elif form.get("client_assertion_type") != self.assertion_type:
            return "wrong client_assertion_type"
        else:
            assertion = form.get("client_assertion", "")
        try:
            kid = jwt.get_unverified_header(assertion).get("kid")
            keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(self.jwks).keys}
            if kid not in keys:
                return "unknown kid"
            claims: dict[str, Any] = jwt.decode(
                assertion,
                keys[kid].key,
                algorithms=["ES256"],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["iss", "sub", "aud", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            return "expired"
        except jwt.PyJWTError as exc:
            return type(exc).__name__
        if claims["sub"] != self.subject:
            return "wrong sub"
        self.verified.append(claims)
        return None


# ---- a test CA and its certificates (RFC 8705 mTLS) ----------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TestCA:
    """A self-signed CA that issues server and client certificates, written as PEM files."""

    __test__ = False  # not a pytest class

    def __init__(self, name: str = "token-broker test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        """The CA certificate."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool = False) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a client, or for a server on 127.0.0.1/localhost."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(self._key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def write(
        self, directory: Path, stem: str, common_name: str, *, server: bool = False
    ) -> tuple[Path, Path]:
        """Issue a certificate and write `<stem>.crt` and `<stem>.key`; returns their paths."""
        cert, key = self.issue(common_name, server=server)
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(cert)
        key_path.write_bytes(key)
        return cert_path, key_path
