"""DPoP proofs (broker/dpop.py) checked by an independent verifier (tests/support/dpop.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDict

from broker.config import parse_config
from broker.dpop import (
    AppDpop,
    DpopKeyMissing,
    Nonces,
    ProofKey,
    ProofKeys,
    generate_key,
    is_resource_challenge,
    read_key_file,
    target_uri,
)
from broker.errors import ConfigError
from broker.model import DpopAlgorithm, TokenSet
from tests.support.dpop import DpopVerifier, InvalidProof, thumbprint

NOW = 1_800_000_000.0


def key(algorithm: DpopAlgorithm = DpopAlgorithm.ES256) -> ProofKey:
    return ProofKey(generate_key(algorithm), algorithm)


def pem(curve: ec.EllipticCurve | None = None) -> bytes:
    private = ec.generate_private_key(curve or ec.SECP256R1())
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TestProofContents:
    """Each claim and header member a server checks (RFC 9449 §4.2)."""

    @pytest.mark.parametrize("algorithm", list(DpopAlgorithm))
    def test_signature_verifies_with_the_embedded_jwk(self, algorithm: DpopAlgorithm) -> None:
        """The proof is signed by the key whose public JWK its header carries, in every alg."""
        proof_key = key(algorithm)
        proof = proof_key.proof("POST", "https://as.example/token", NOW)
        verifier = DpopVerifier(clock=lambda: NOW)
        jkt = verifier.verify(proof, "POST", "https://as.example/token")
        assert jkt == proof_key.jkt == thumbprint(jwt.get_unverified_header(proof)["jwk"])
        header = jwt.get_unverified_header(proof)
        assert header["typ"] == "dpop+jwt"
        assert header["alg"] == algorithm.value
        assert "d" not in header["jwk"]

    def test_a_tampered_proof_is_refused(self) -> None:
        """The verifier can fail: a claim changed after signing breaks the signature."""
        proof = key().proof("GET", "https://rs.example/a", NOW)
        head, payload, signature = proof.split(".")
        claims = json.loads(jwt.utils.base64url_decode(payload))
        claims["htm"] = "POST"
        forged = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
        with pytest.raises(InvalidProof, match="signature"):
            DpopVerifier(clock=lambda: NOW).verify(
                f"{head}.{forged}.{signature}", "POST", "https://rs.example/a"
            )

    def test_htu_drops_query_and_fragment_and_normalises(self) -> None:
        """htu: lower-case scheme and host, no default port, no query, no fragment."""
        proof = key().proof("get", "HTTPS://RS.Example:443/v1/a%2Fb?x=1&y=2#frag", NOW)
        claims = jwt.decode(proof, options={"verify_signature": False})
        assert claims["htu"] == "https://rs.example/v1/a%2Fb"
        assert claims["htm"] == "GET"
        assert target_uri("http://127.0.0.1:8080/p?q") == "http://127.0.0.1:8080/p"
        DpopVerifier(clock=lambda: NOW).verify(proof, "GET", "https://rs.example/v1/a%2Fb?z")

    def test_ath_is_the_hash_of_the_access_token(self) -> None:
        """ath = base64url(sha256(token)); a proof for another token is refused."""
        proof_key = key()
        proof = proof_key.proof("GET", "https://rs.example/a", NOW, access_token="tok-1")
        verifier = DpopVerifier(clock=lambda: NOW)
        verifier.verify(proof, "GET", "https://rs.example/a", access_token="tok-1")
        other = proof_key.proof("GET", "https://rs.example/a", NOW, access_token="tok-2")
        with pytest.raises(InvalidProof, match="ath"):
            verifier.verify(other, "GET", "https://rs.example/a", access_token="tok-1")

    def test_iat_is_now_and_every_jti_is_new(self) -> None:
        """iat is the given time; 1,000 proofs have 1,000 jti; a replay is refused."""
        proof_key = key()
        proofs = [proof_key.proof("GET", "https://rs.example/a", NOW) for _ in range(1000)]
        claims = [jwt.decode(p, options={"verify_signature": False}) for p in proofs]
        assert {c["iat"] for c in claims} == {int(NOW)}
        assert len({c["jti"] for c in claims}) == 1000
        verifier = DpopVerifier(clock=lambda: NOW)
        verifier.verify(proofs[0], "GET", "https://rs.example/a")
        with pytest.raises(InvalidProof, match="replayed"):
            verifier.verify(proofs[0], "GET", "https://rs.example/a")
        with pytest.raises(InvalidProof, match="iat"):
            DpopVerifier(clock=lambda: NOW + 300).verify(proofs[1], "GET", "https://rs.example/a")

    def test_the_repr_names_the_thumbprint_never_the_key(self) -> None:
        """repr(ProofKey) shows the public thumbprint only."""
        proof_key = key()
        assert repr(proof_key) == f"ProofKey(ES256, jkt={proof_key.jkt})"


class TestNonces:
    """A server's nonce is remembered per origin and sent in the next proof."""

    def test_the_nonce_of_an_answer_goes_into_the_next_proof(self) -> None:
        """A DPoP-Nonce header from any answer is used for that server, not for another."""
        dpop = AppDpop("app", ProofKeys((key(),)), lambda: NOW)
        assert dpop.nonces.note("https://rs.example/x", {"DPoP-Nonce": "n-1"}) == "n-1"
        proof = dpop.proof("proxy", "GET", "https://rs.example:443/other")
        assert jwt.decode(proof, options={"verify_signature": False})["nonce"] == "n-1"
        elsewhere = dpop.proof("proxy", "GET", "https://as.example/token")
        assert "nonce" not in jwt.decode(elsewhere, options={"verify_signature": False})
        verifier = DpopVerifier(require_nonce=True, nonce="n-1", clock=lambda: NOW)
        verifier.verify(proof, "GET", "https://rs.example/other")

    def test_nonces_are_bounded(self) -> None:
        """More servers than the bound start the table over instead of growing it."""
        nonces = Nonces()
        for i in range(200):
            nonces.note(f"https://h{i}.example/", {"DPoP-Nonce": str(i)})
        assert len(nonces.by_origin) <= 64
        assert nonces.get("https://h199.example/a") == "199"

    def test_a_resource_server_challenge_is_recognised(self) -> None:
        """401 with WWW-Authenticate DPoP error=use_dpop_nonce and a DPoP-Nonce header."""
        headers = CIMultiDict(
            {"WWW-Authenticate": 'DPoP error="use_dpop_nonce", algs="ES256"', "DPoP-Nonce": "n"}
        )
        assert is_resource_challenge(401, headers)
        assert not is_resource_challenge(403, headers)
        without_nonce = CIMultiDict({"WWW-Authenticate": 'DPoP error="use_dpop_nonce"'})
        assert not is_resource_challenge(401, without_nonce)
        other_error = CIMultiDict(
            {"WWW-Authenticate": 'DPoP error="invalid_token"', "DPoP-Nonce": "n"}
        )
        assert not is_resource_challenge(401, other_error)
        bearer = CIMultiDict(
            {"WWW-Authenticate": 'Bearer error="use_dpop_nonce"', "DPoP-Nonce": "n"}
        )
        assert not is_resource_challenge(401, bearer)


class TestTokenHeaders:
    """What the proxy adds for a token."""

    def test_a_bound_token_goes_as_dpop_with_a_proof_of_the_request(self) -> None:
        """Authorization: DPoP <token>, and a proof with ath signed by the token's key."""
        old, new = key(), key()
        counted: list[tuple[str, str]] = []
        dpop = AppDpop(
            "app", ProofKeys((new, old)), lambda: NOW, lambda a, u: counted.append((a, u))
        )
        token = TokenSet("tok", "DPoP", NOW, NOW + 60, dpop_jkt=old.jkt)
        headers = dpop.token_headers("PUT", "https://rs.example/a?b", token)
        assert headers["Authorization"] == "DPoP tok"
        verifier = DpopVerifier(clock=lambda: NOW)
        jkt = verifier.verify(
            headers["DPoP"], "PUT", "https://rs.example/a", access_token="tok", jkt=old.jkt
        )
        assert jkt == old.jkt
        assert counted == [("app", "proxy")]

    def test_a_bearer_token_gets_no_proof(self) -> None:
        """A token the server did not bind goes as a bearer token (no headers added)."""
        dpop = AppDpop("app", ProofKeys((key(),)), lambda: NOW)
        assert dpop.token_headers("GET", "https://rs.example/", TokenSet("t", "Bearer", 0, 1)) == {}

    def test_a_token_bound_to_a_removed_key_is_refused(self) -> None:
        """DpopKeyMissing names the thumbprint: nothing is signed with another key."""
        dpop = AppDpop("app", ProofKeys((key(),)), lambda: NOW)
        token = TokenSet("tok", "DPoP", NOW, NOW + 60, dpop_jkt="gone-jkt")
        with pytest.raises(DpopKeyMissing, match="gone-jkt"):
            dpop.token_headers("GET", "https://rs.example/", token)


class TestKeyFile:
    """dpop_key_file: PEM keys in order, checked against the algorithm, never shown."""

    def test_several_keys_the_first_binds(self, tmp_path: Path) -> None:
        """The first key is current; each key is found by its thumbprint."""
        path = tmp_path / "dpop.pem"
        path.write_bytes(pem() + b"\n" + pem())
        keys = read_key_file(path, DpopAlgorithm.ES256, "k")
        assert len(keys.keys) == 2
        assert keys.find(None) is keys.current is keys.keys[0]
        assert keys.find(keys.keys[1].jkt) is keys.keys[1]

    def test_a_key_of_another_curve_is_named_by_its_place(self, tmp_path: Path) -> None:
        """A P-384 key for ES256: the error names the block, never the key material."""
        path = tmp_path / "dpop.pem"
        material = pem() + pem(ec.SECP384R1())
        path.write_bytes(material)
        with pytest.raises(ConfigError) as caught:
            read_key_file(path, DpopAlgorithm.ES256, "apps.a.dpop_key_file")
        assert "key 2" in caught.value.reason and "secp256r1" in caught.value.reason
        body = material.decode().splitlines()[1]
        assert body not in str(caught.value)

    def test_no_pem_is_an_error(self, tmp_path: Path) -> None:
        """A file without a PEM block is refused."""
        path = tmp_path / "dpop.pem"
        path.write_text("not a key\n")
        with pytest.raises(ConfigError, match="no PEM private key"):
            read_key_file(path, DpopAlgorithm.ES256, "k")


class TestConfig:
    """The dpop keys of an app."""

    def base(self, tmp_path: Path, store: str = "memory://", **app: object) -> dict[str, object]:
        (tmp_path / "store.key").write_text(
            "k1 " + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n"
        )
        (tmp_path / "secret").write_text("s3cret-value\n")
        store_section: dict[str, object] = {"url": store}
        if store != "memory://":
            store_section["encryption_key_file"] = "store.key"
        return {
            "store": store_section,
            "apps": {
                "a": {
                    "token_url": "https://as.example/token",
                    "client_id": "c",
                    "client_secret_file": "secret",
                    **app,
                }
            },
        }

    def test_memory_store_needs_no_key_file(self, tmp_path: Path) -> None:
        """dpop: true alone is valid with memory:// (the key is made at start)."""
        config = parse_config(self.base(tmp_path, dpop=True), base_dir=tmp_path)
        assert config.apps["a"].dpop
        assert config.apps["a"].dpop_algorithm is DpopAlgorithm.ES256

    def test_a_shared_store_needs_the_key_file(self, tmp_path: Path) -> None:
        """With Redis every replica must prove with one key: the file is required."""
        data = self.base(tmp_path, "redis://127.0.0.1:6379/0", dpop=True)
        with pytest.raises(ConfigError) as caught:
            parse_config(data, base_dir=tmp_path)
        assert caught.value.key == "apps.a.dpop_key_file"

    def test_settings_without_dpop_are_refused(self, tmp_path: Path) -> None:
        """dpop_algorithm without dpop: true is a mistake at its key."""
        with pytest.raises(ConfigError) as caught:
            parse_config(self.base(tmp_path, dpop_algorithm="ES384"), base_dir=tmp_path)
        assert caught.value.key == "apps.a.dpop_algorithm"

    def test_no_token_files_for_a_dpop_app(self, tmp_path: Path) -> None:
        """A sink would hand the bound token out alone: refused at the app's sinks."""
        data = self.base(tmp_path, dpop=True, sinks=[{"path": str(tmp_path / "t")}])
        with pytest.raises(ConfigError) as caught:
            parse_config(data, base_dir=tmp_path)
        assert caught.value.key == "apps.a.sinks"

    def test_the_key_file_must_fit_the_algorithm(self, tmp_path: Path) -> None:
        """An ES256 key file with dpop_algorithm ES384 is refused at dpop_key_file."""
        (tmp_path / "dpop.pem").write_bytes(pem())
        data = self.base(tmp_path, dpop=True, dpop_algorithm="ES384", dpop_key_file="dpop.pem")
        with pytest.raises(ConfigError) as caught:
            parse_config(data, base_dir=tmp_path)
        assert caught.value.key == "apps.a.dpop_key_file"
        assert "ES384" in caught.value.reason
