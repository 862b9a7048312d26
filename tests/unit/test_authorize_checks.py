"""`authorize` refuses what cannot work before it prints the URL (the code is single-use)."""

from __future__ import annotations

import pytest

from broker.authorize import authorize
from broker.errors import ConfigError
from broker.model import AppSpec, ClientSpec, Config, GrantType, ServerSpec, StoreSpec


def config(store_url: str) -> Config:
    app = AppSpec(
        name="scim",
        token_url="https://login.example.com/token",
        grant_type=GrantType.AUTHORIZATION_CODE,
        client_id="OQ123",
        authorize_url="https://login.example.com/authorize",
        redirect_uri="https://example.com/callback",
    )
    return Config(
        server=ServerSpec(),
        store=StoreSpec(url=store_url),
        apps={"scim": app},
        clients={"svc": ClientSpec("svc", ("scim",), key_sha256=("ab" * 32,))},
    )


class TestAuthorizeChecks:
    async def test_memory_store_is_refused_before_the_url(self) -> None:
        """A memory:// store: ConfigError naming store.url, and nothing printed or read."""
        said: list[str] = []

        def read_line() -> str:
            raise AssertionError("authorize read the redirect before refusing")

        with pytest.raises(ConfigError) as caught:
            await authorize(
                config("memory://"),
                "scim",
                code=None,
                code_verifier=None,
                read_line=read_line,
                say=said.append,
            )
        assert caught.value.key == "store.url"
        assert said == []

    async def test_unknown_app_lists_the_configured_ones(self) -> None:
        """An app that is not configured: the error lists the apps there are."""
        with pytest.raises(ConfigError) as caught:
            await authorize(
                config("redis://r:6379/0"),
                "scimm",
                code=None,
                code_verifier=None,
                read_line=lambda: "",
                say=lambda _: None,
            )
        assert "no app named 'scimm' in the config (apps: scim)" in str(caught.value)
