"""The event loop: uvloop when installed (the `fast` extra), asyncio's when asked or absent."""

from __future__ import annotations

import asyncio
import sys

import pytest

from broker.cli import loop_factory, run_loop
from broker.errors import ConfigError


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop cannot be imported for the test."""
    monkeypatch.setitem(sys.modules, "uvloop", None)


class TestLoopFactory:
    """TOKEN_BROKER_EVENT_LOOP picks the loop; a bad value names the variable."""

    def test_asyncio_asked(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """TOKEN_BROKER_EVENT_LOOP=asyncio gives asyncio's default loop (no factory)."""
        monkeypatch.setenv("TOKEN_BROKER_EVENT_LOOP", "asyncio")
        assert loop_factory() is None

    @pytest.mark.usefixtures("no_uvloop")
    def test_auto_without_uvloop(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without uvloop installed, the default (auto) falls back to asyncio's loop."""
        monkeypatch.delenv("TOKEN_BROKER_EVENT_LOOP", raising=False)
        assert loop_factory() is None

    @pytest.mark.usefixtures("no_uvloop")
    def test_uvloop_asked_but_missing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Asking for uvloop when it is not installed is a configuration error naming the extra."""
        monkeypatch.setenv("TOKEN_BROKER_EVENT_LOOP", "uvloop")
        with pytest.raises(ConfigError, match=r"token-broker\[fast\]") as caught:
            loop_factory()
        assert caught.value.key == "TOKEN_BROKER_EVENT_LOOP"

    def test_unknown_value(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An unknown value is refused with the allowed ones."""
        monkeypatch.setenv("TOKEN_BROKER_EVENT_LOOP", "trio")
        with pytest.raises(ConfigError, match="auto, uvloop, asyncio"):
            loop_factory()

    def test_run_loop_runs_on_the_chosen_loop(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """run_loop runs the coroutine to completion on the loop the variable names."""
        monkeypatch.setenv("TOKEN_BROKER_EVENT_LOOP", "asyncio")
        seen: list[str] = []

        async def main() -> None:
            seen.append(type(asyncio.get_running_loop()).__module__)

        run_loop(main)
        assert seen == ["asyncio.unix_events"]
