"""The egress guard: the address table, allowed networks, and the socket factory in a real
aiohttp connector (an address is checked where it is connected, whatever the name resolved to)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from broker import egress
from broker.egress import EgressRefused, classify, guarded_socket, parse_networks, refusal

CLASSIFIED = [
    # public
    ("93.184.216.34", None),
    ("8.8.8.8", None),
    ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None),
    ("64:ff9b::808:808", None),
    # loopback
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:7f00:1", "loopback"),
    ("::127.0.0.1", "loopback"),
    ("64:ff9b::7f00:1", "loopback"),
    ("2002:7f00:1::", "loopback"),
    # link-local: the metadata address in every form
    ("169.254.169.254", "link_local"),
    ("169.254.0.1", "link_local"),
    ("::ffff:169.254.169.254", "link_local"),
    ("::ffff:a9fe:a9fe", "link_local"),
    ("64:ff9b::a9fe:a9fe", "link_local"),
    ("fe80::1", "link_local"),
    ("febf::1", "link_local"),
    # private
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("100.100.100.200", "private"),
    ("::ffff:10.1.2.3", "private"),
    ("2002:c0a8:101::", "private"),
    ("fc00::1", "private"),
    ("fd00:ec2::254", "private"),
    ("fec0::1", "private"),
    # unspecified
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("::ffff:0.0.0.0", "unspecified"),
    # reserved, multicast, documentation
    ("224.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.1", "reserved"),
    ("ff02::1", "reserved"),
    ("2001:db8::1", "reserved"),
]

# Just outside the special ranges: public.
EDGES = ["172.15.255.255", "172.32.0.0", "169.253.255.255", "169.255.0.0", "11.0.0.0", "fbff::1"]


class TestClassify:
    @pytest.mark.parametrize(("address", "reason"), CLASSIFIED)
    def test_each_address_is_classified(self, address: str, reason: str | None) -> None:
        """Loopback, link-local, private, unspecified and reserved addresses, also as IPv4
        inside IPv6 (mapped, compatible, NAT64, 6to4); public ones are None."""
        assert classify(ipaddress.ip_address(address)) == reason
        assert refusal(address) == reason

    @pytest.mark.parametrize("address", EDGES)
    def test_the_edges_of_the_ranges_are_public(self, address: str) -> None:
        """The neighbours of 172.16/12, 169.254/16, 10/8 and fc00::/7 are not refused."""
        assert refusal(address) is None

    def test_every_reason_is_described(self) -> None:
        """Each metric reason has its text for the messages."""
        assert set(egress.DESCRIBED) == set(egress.REASONS)
        assert {reason for _, reason in CLASSIFIED} - {None} == set(egress.REASONS)

    def test_a_scoped_ipv6_address_is_read_without_its_zone(self) -> None:
        """fe80::1%eth0 (as a resolver may give it) is link-local."""
        assert refusal("fe80::1%eth0") == "link_local"


class TestAllowedNetworks:
    def test_an_allowed_network_opens_only_its_addresses(self) -> None:
        """10.1.0.0/16 allows 10.1.2.3, not 10.2.0.1 nor loopback."""
        allowed = parse_networks(["10.1.0.0/16"])
        assert refusal("10.1.2.3", allowed) is None
        assert refusal("10.2.0.1", allowed) == "private"
        assert refusal("127.0.0.1", allowed) == "loopback"

    def test_an_allowed_ipv4_network_opens_its_mapped_form(self) -> None:
        """::ffff:127.0.0.1 is 127.0.0.1 for the allow-list too."""
        allowed = parse_networks(["127.0.0.0/8"])
        assert refusal("::ffff:127.0.0.1", allowed) is None
        assert refusal("::1", allowed) == "loopback"

    def test_the_metadata_address_needs_its_own_entry(self) -> None:
        """Allowing the private ranges does not allow 169.254.169.254."""
        allowed = parse_networks(["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"])
        assert refusal("169.254.169.254", allowed) == "link_local"
        assert refusal("169.254.169.254", parse_networks(["169.254.169.254/32"])) is None


def addr_info(address: str, port: int = 443) -> tuple[Any, ...]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockaddr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)


class TestGuardedSocket:
    @pytest.mark.parametrize(
        ("address", "reason"),
        [("127.0.0.1", "loopback"), ("169.254.169.254", "link_local"), ("::1", "loopback")],
    )
    def test_a_special_address_gets_no_socket(self, address: str, reason: str) -> None:
        """The factory raises EgressRefused (an OSError) naming the address and the reason."""
        with pytest.raises(EgressRefused) as caught:
            guarded_socket(())(addr_info(address))
        assert caught.value.address == address
        assert caught.value.reason == reason
        assert isinstance(caught.value, OSError)

    def test_a_public_or_allowed_address_gets_a_socket(self) -> None:
        """A public address, and a special one inside allowed_networks, get a real socket."""
        for address, allowed in (("93.184.216.34", ()), ("127.0.0.1", ["127.0.0.0/8"])):
            sock = guarded_socket(parse_networks(allowed))(addr_info(address))
            try:
                assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
            finally:
                sock.close()


class ScriptedResolver(AbstractResolver):
    """A DNS stand-in: every name resolves to the given addresses, in order."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        """Nothing to close."""


@pytest.fixture
async def loopback_api() -> AsyncIterator[TestServer]:
    async def hello(_: web.Request) -> web.Response:
        return web.json_response({"hello": True})

    app = web.Application()
    app.router.add_get("/", hello)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


async def get_through(resolver: AbstractResolver, allowed: list[str], server: TestServer) -> int:
    """GET http://api.test:<the server's port>/ through a guarded aiohttp connector."""
    port = server.port
    assert port is not None
    connector = aiohttp.TCPConnector(
        resolver=resolver, socket_factory=guarded_socket(parse_networks(allowed))
    )
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"http://api.test:{port}/") as response:
            return response.status


class TestInAiohttp:
    async def test_a_name_resolving_to_loopback_is_refused_at_connect(
        self, loopback_api: TestServer
    ) -> None:
        """aiohttp's connection fails with the EgressRefused as its cause; nothing is sent."""
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await get_through(ScriptedResolver(["127.0.0.1"]), [], loopback_api)
        assert isinstance(caught.value.os_error, EgressRefused)
        assert caught.value.os_error.reason == "loopback"

    async def test_several_refused_addresses_still_report_the_refusal(
        self, loopback_api: TestServer
    ) -> None:
        """Every answer refused (metadata and loopback): the cause is still an EgressRefused."""
        resolver = ScriptedResolver(["169.254.169.254", "127.0.0.1"])
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await get_through(resolver, [], loopback_api)
        assert isinstance(caught.value.os_error, EgressRefused)

    async def test_a_refused_address_is_skipped_for_an_allowed_one(
        self, loopback_api: TestServer
    ) -> None:
        """A DNS answer with the metadata address first and an allowed one second reaches the
        allowed one: the refused address is never connected to."""
        resolver = ScriptedResolver(["169.254.169.254", "127.0.0.1"])
        assert await get_through(resolver, ["127.0.0.0/8"], loopback_api) == 200
