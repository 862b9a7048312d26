"""What the logs look like: JSON off a terminal, readable on one (NO_COLOR honoured), and a
malformed request from a local caller as one quiet line instead of a traceback per request."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from structlog.testing import capture_logs

from broker.logs import MalformedRequestFilter, configure_logging, get_logger

ANSI = "\x1b["


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    server = logging.getLogger("aiohttp.server")
    filters = server.filters[:]
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    server.filters[:] = filters
    structlog.configure(**config)


def log_one_line(stream: io.StringIO, environ: dict[str, str]) -> str:
    configure_logging(stream=stream, environ=environ)
    get_logger("broker.test").warning("store.unavailable", error="redis ping failed")
    return stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
class TestRendering:
    def test_json_off_a_terminal(self) -> None:
        """A pipe or a file gets one JSON object per line."""
        line = json.loads(log_one_line(io.StringIO(), {}))
        assert (line["event"], line["level"]) == ("store.unavailable", "warning")

    def test_readable_with_colors_on_a_terminal(self) -> None:
        """A terminal gets the console view, in colors."""
        text = log_one_line(Terminal(), {})
        assert "store.unavailable" in text
        assert not text.lstrip().startswith("{")
        assert ANSI in text

    @pytest.mark.parametrize("value", ["1", "yes"])
    def test_no_color_is_honoured(self, value: str) -> None:
        """NO_COLOR set to anything: the console view without escape codes."""
        text = log_one_line(Terminal(), {"NO_COLOR": value})
        assert "store.unavailable" in text
        assert "warning" in text
        assert ANSI not in text

    def test_rich_tracebacks_are_not_used(self) -> None:
        """An exception on a terminal is a plain traceback, without local variables."""
        stream = Terminal()
        configure_logging(stream=stream, environ={"NO_COLOR": "1"})
        secret_local = "local-variable-value-" + "s" * 12

        def explode(value: str) -> None:
            raise ValueError("boom")

        try:
            explode(secret_local)
        except ValueError:
            get_logger("broker.test").exception("api.internal_error")
        text = stream.getvalue()
        assert "Traceback (most recent call last)" in text
        assert "╭" not in text
        assert secret_local not in text


def record(exc: BaseException, created: float, remote: str = "127.0.0.1") -> logging.LogRecord:
    """The record aiohttp's server writes for a request it could not handle."""
    item = logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        (remote,),
        (type(exc), exc, None),
    )
    item.created = created
    return item


class TestMalformedRequests:
    def test_one_info_line_per_interval_without_a_traceback(self) -> None:
        """Garbage requests: the first is one info line; the rest of the minute are counted."""
        quiet = MalformedRequestFilter(interval=60.0)
        with capture_logs() as logs:
            passed = [quiet.filter(record(BadHttpMessage("bad"), 1000.0 + i)) for i in range(5)] + [
                quiet.filter(record(LineTooLong("x", "8190"), 1061.0))
            ]
        assert passed == [False] * 6
        assert logs == [
            {
                "event": "http.malformed_request",
                "remote": "127.0.0.1",
                "reason": "BadHttpMessage",
                "status": 400,
                "left_out": 0,
                "log_level": "info",
            },
            {
                "event": "http.malformed_request",
                "remote": "127.0.0.1",
                "reason": "LineTooLong",
                "status": 400,
                "left_out": 4,
                "log_level": "info",
            },
        ]

    def test_other_server_errors_pass_unchanged(self) -> None:
        """A real server error (not a malformed request) keeps its level and traceback."""
        quiet = MalformedRequestFilter(interval=60.0)
        item = record(RuntimeError("handler crashed"), 1000.0)
        assert quiet.filter(item) is True
        assert item.levelno == logging.ERROR
        assert item.exc_info is not None

    def test_the_request_bytes_are_not_logged(self) -> None:
        """The parser's message may quote the request (a key, say): only its type is logged."""
        quiet = MalformedRequestFilter(interval=60.0)
        with capture_logs() as logs:
            quiet.filter(record(BadHttpMessage("Bearer leaked-client-key-0123456789"), 1.0))
        assert "leaked-client-key" not in repr(logs)


def test_configure_logging_installs_one_filter(restore_logging: None) -> None:
    """Configuring twice (dev, then serve in one process) leaves one malformed-request filter."""
    configure_logging(stream=io.StringIO(), environ={})
    configure_logging(stream=sys.stdout, environ={})
    server = logging.getLogger("aiohttp.server")
    assert sum(isinstance(f, MalformedRequestFilter) for f in server.filters) == 1
