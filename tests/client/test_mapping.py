"""The client library's pure parts: Twilio hosts to proxy routes, error answers to exceptions,
form encoding, and the broker address from the environment. No broker needed."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import ClassVar

import pytest
from twilio.rest import Client

from token_broker_client import (
    BadRequest,
    BrokerEndpoint,
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
from token_broker_client.errors import ERROR_CLASSES, error_for
from token_broker_client.transport import BrokerTransport
from token_broker_client.twilio import BrokerHttpClient, _form

SOCKET = "unix:/run/token-broker/api.sock"
CLIENT_SRC = Path(__file__).resolve().parents[2] / "clients" / "python" / "src"


class TestTwilioHosts:
    @pytest.mark.parametrize(
        ("url", "target"),
        [
            (
                "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json",
                "/v1/proxy/twilio/api/2010-04-01/Accounts/AC1/Messages.json",
            ),
            ("https://messaging.twilio.com/v1/Services", "/v1/proxy/twilio/messaging/v1/Services"),
            (
                "https://verify.twilio.com/v2/Services?PageSize=5",
                "/v1/proxy/twilio/verify/v2/Services?PageSize=5",
            ),
        ],
    )
    def test_each_product_host_is_the_upstream_of_its_name(self, url: str, target: str) -> None:
        """https://<product>.twilio.com/<path> goes to /v1/proxy/{app}/<product>/<path>."""
        assert BrokerHttpClient(url=SOCKET).proxy_target(url) == target

    @pytest.mark.parametrize(
        ("region", "edge"), [("ie1", None), ("ie1", "dublin"), (None, "sydney"), ("au1", "sydney")]
    )
    def test_twilio_region_and_edge_do_not_change_the_route(
        self, region: str | None, edge: str | None
    ) -> None:
        """The host the SDK rewrites for a region or an edge maps to the same route."""
        sdk = Client(account_sid="AC1", region=region, edge=edge, http_client=BrokerHttpClient())
        for upstream in (None, "api"):
            client = BrokerHttpClient(url=SOCKET, upstream=upstream)
            rewritten = sdk.get_hostname("https://api.twilio.com/2010-04-01/Accounts.json")
            assert rewritten != "https://api.twilio.com/2010-04-01/Accounts.json"
            assert client.proxy_target(rewritten) == client.proxy_target(
                "https://api.twilio.com/2010-04-01/Accounts.json"
            )

    def test_one_upstream_takes_its_product_and_refuses_the_others(self) -> None:
        """upstream="api": api.twilio.com paths go straight under the app; another host is a
        ValueError before anything is sent."""
        client = BrokerHttpClient("sms", url=SOCKET, upstream="api")
        assert client.proxy_target("https://api.twilio.com/2010-04-01/A.json") == (
            "/v1/proxy/sms/2010-04-01/A.json"
        )
        with pytest.raises(ValueError, match=r"https://messaging\.twilio\.com has no upstream"):
            client.proxy_target("https://messaging.twilio.com/v1/Services")

    def test_hosts_rename_upstreams_and_nothing_else_passes(self) -> None:
        """hosts= maps host names to the config's upstream names; an unlisted host, or one
        outside twilio.com without a mapping, is refused."""
        client = BrokerHttpClient(url=SOCKET, hosts={"api.twilio.com": "core"})
        assert client.proxy_target("https://api.ie1.twilio.com/x") == "/v1/proxy/twilio/core/x"
        with pytest.raises(ValueError, match="has no upstream"):
            client.proxy_target("https://verify.twilio.com/x")
        with pytest.raises(ValueError, match="has no upstream"):
            BrokerHttpClient(url=SOCKET).proxy_target("https://example.com/x")

    def test_upstream_and_hosts_are_exclusive(self) -> None:
        """One upstream or several: giving both is a mistake, said at once."""
        with pytest.raises(ValueError, match=r"upstream= .* or hosts="):
            BrokerHttpClient(url=SOCKET, upstream="api", hosts={"api.twilio.com": "api"})

    def test_a_path_character_a_url_may_not_hold_is_encoded_and_escapes_stay(self) -> None:
        """A space becomes %20 (the broker refuses it raw); an existing %2B is left alone."""
        client = BrokerHttpClient(url=SOCKET)
        assert client.proxy_target("https://api.twilio.com/v1/A B/%2B1") == (
            "/v1/proxy/twilio/api/v1/A%20B/%2B1"
        )

    def test_form_encoding_repeats_lists_and_drops_none(self) -> None:
        """As requests encodes the SDK's data: list values repeat the key, None is left out."""
        assert _form({"To": "+1 555", "MediaUrl": ["a", "b"], "Body": None}) == (
            "To=%2B1+555&MediaUrl=a&MediaUrl=b"
        )


class TestErrorMapping:
    @pytest.mark.parametrize(
        ("status", "code", "kind", "retryable"),
        [
            (400, "bad_request", BadRequest, False),
            (413, "payload_too_large", BadRequest, False),
            (401, "unauthorized", Unauthorized, False),
            (403, "forbidden", Forbidden, False),
            (403, "bad_host", Forbidden, False),
            (403, "path_not_allowed", Forbidden, False),
            (404, "unknown_app", NotFound, False),
            (404, "proxy_not_configured", NotFound, False),
            (404, "unknown_upstream", NotFound, False),
            (403, "egress_refused", Forbidden, False),
            (405, "method_not_allowed", BadRequest, False),
            (409, "needs_authorization", NeedsAuthorization, False),
            (409, "dpop_bound", DpopBound, False),
            (404, "dpop_not_configured", NotFound, False),
            (503, "dpop_key_missing", TokenUnavailable, True),
            (503, "store_unavailable", TokenUnavailable, True),
            (429, "rate_limited", RateLimited, True),
            (503, "token_unavailable", TokenUnavailable, True),
            (502, "upstream_error", UpstreamError, True),
            (504, "upstream_timeout", UpstreamError, True),
            (503, "proxy_busy", UpstreamError, True),
            (403, "a_code_from_a_newer_broker", Forbidden, False),
            (418, "teapot", BrokerError, False),
        ],
    )
    def test_every_contract_code_has_its_class(
        self, status: int, code: str, kind: type[BrokerError], retryable: bool
    ) -> None:
        """The code picks the class; an unknown code falls back on the status's family."""
        body = json.dumps({"error": code, "message": "why"}).encode()
        error = error_for(status, body, "7")
        assert type(error) is kind
        assert (error.status, error.code, error.message, error.retry_after) == (
            status,
            code,
            "why",
            7.0,
        )
        assert error.retryable is retryable
        assert str(error) == f"HTTP {status} {code}: why (retry after 7 s)"

    def test_the_contract_names_no_code_without_its_class(self) -> None:
        """Every `NNN `code`` the contract lists has its own entry in ERROR_CLASSES (a new
        broker code must not fall back on a status family by accident)."""
        contract = (Path(__file__).resolve().parents[2] / "docs" / "contract.md").read_text()
        codes = set(re.findall(r"\b[45]\d\d `([a-z_]+)`", contract))
        assert {"dpop_bound", "egress_refused", "unknown_upstream"} <= codes
        assert codes - set(ERROR_CLASSES) == set()

    def test_an_answer_without_the_json_body_is_unreachable(self) -> None:
        """A 502 from something that is not the broker (HTML, Twilio's shape) is BrokerUnreachable."""
        assert isinstance(error_for(502, b"<html>bad gateway</html>", None), BrokerUnreachable)
        twilio = json.dumps({"code": 20404, "message": "not found", "status": 404}).encode()
        assert isinstance(error_for(404, twilio, None), BrokerUnreachable)


class TestEndpoint:
    def test_arguments_win_over_the_environment(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """url and key given win; otherwise TOKEN_BROKER_URL, TOKEN_BROKER_KEY_FILE, then
        TOKEN_BROKER_KEY, as `token-broker token` reads them."""
        (tmp_path / "key").write_text("  from-the-file-0123456789-0123456789\n")
        monkeypatch.setenv("TOKEN_BROKER_URL", SOCKET)
        monkeypatch.setenv("TOKEN_BROKER_KEY", "from-the-variable-0123456789-012345")
        assert BrokerEndpoint.resolve().key == "from-the-variable-0123456789-012345"
        monkeypatch.setenv("TOKEN_BROKER_KEY_FILE", str(tmp_path / "key"))
        endpoint = BrokerEndpoint.resolve()
        assert (endpoint.url, endpoint.key) == (SOCKET, "from-the-file-0123456789-0123456789")
        assert "from-the-file" not in repr(endpoint)
        given = BrokerEndpoint.resolve("http://127.0.0.1:9", key="given-key-0123456789-0123456789")
        assert (given.url, given.key) == ("http://127.0.0.1:9", "given-key-0123456789-0123456789")

    def test_no_url_means_the_default_local_address(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without TOKEN_BROKER_URL the broker is http://127.0.0.1:8411, as for the CLI."""
        for name in ("TOKEN_BROKER_URL", "TOKEN_BROKER_KEY", "TOKEN_BROKER_KEY_FILE"):
            monkeypatch.delenv(name, raising=False)
        endpoint = BrokerEndpoint.resolve()
        assert (endpoint.url, endpoint.key) == ("http://127.0.0.1:8411", None)

    @pytest.mark.parametrize("url", ["ftp://host", "127.0.0.1:8411", "unix:"])
    def test_a_url_that_is_neither_http_nor_unix_is_refused(self, url: str) -> None:
        """A mistyped URL is a ValueError at construction, not a failure at the first request."""
        with pytest.raises(ValueError, match="unix"):
            BrokerEndpoint(url)


class TestFootprint:
    def test_the_core_imports_nothing_outside_the_standard_library(self) -> None:
        """`import token_broker_client` (the token source, errors, transport) loads no third-party
        package: not the broker's server stack, not the adapters' libraries."""
        # -S: no site-packages at all, so only the standard library and the source tree exist.
        probe = (
            f"import sys; sys.path.insert(0, {str(CLIENT_SRC)!r})\n"
            "import token_broker_client\n"
            "known = set(sys.stdlib_module_names) | {'__main__', 'token_broker_client'}\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} - known))"
        )
        out = subprocess.run(
            [sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]", out.stdout

    def test_the_distribution_requires_nothing_but_its_extras(self, tmp_path: Path) -> None:
        """The wheel's metadata lists httpx, requests and twilio only under their extras."""
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(tmp_path),
                str(CLIENT_SRC.parent),
            ],
            check=True,
            capture_output=True,
        )
        (wheel,) = tmp_path.glob("token_broker_client-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = archive.read(name).decode()
        requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
        assert requires, metadata
        assert all("extra ==" in line for line in requires), requires


class _ClosingHandler(http.server.BaseHTTPRequestHandler):
    """Answers like a keep-alive server, then closes the connection (an idle timeout)."""

    protocol_version = "HTTP/1.1"
    connections: ClassVar[list[int]] = []

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # Counted before the answer leaves: the client may send its next request, and the test
        # read the list, before this thread runs again.
        self.connections.append(self.client_address[1])
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


class TestTransport:
    def test_a_kept_alive_connection_the_server_closed_is_replaced(self) -> None:
        """The second request finds its kept-alive connection closed by the server: it is sent
        once more on a new connection, and answered."""
        server = http.server.HTTPServer(("127.0.0.1", 0), _ClosingHandler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            transport = BrokerTransport(BrokerEndpoint(f"http://127.0.0.1:{server.server_port}"))
            assert json.loads(transport.request("GET", "/one").body) == {"path": "/one"}
            assert json.loads(transport.request("GET", "/two").body) == {"path": "/two"}
            assert len(set(_ClosingHandler.connections)) == 2
            transport.close()
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
