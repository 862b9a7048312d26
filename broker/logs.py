"""structlog setup: JSON lines (or a console view), redaction before rendering, audit events.

Every line, including the stdlib records of aiohttp, asyncio and redis-py, goes through the same
processor chain, so the redaction processor sees everything before anything is written.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[redacted]"

# Field names whose values are secrets whatever they hold.
_SECRET_KEYS = re.compile(
    r"(^|_)(access_token|refresh_token|id_token|token|secret|client_secret|password|"
    r"authorization|client_key|key|assertion|authorization_code|code_verifier|cookie)$",
    re.IGNORECASE,
)
# Field names that look secret but carry only safe derivatives.
_SAFE_KEYS = frozenset({"token_fingerprint", "key_id", "secret", "event"})
# A JWT anywhere in free text.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")


class SecretRegistry:
    """Exact secret values (client secrets, client keys, tokens) that must never be written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: frozenset[str] = frozenset()

    def add(self, *values: str | None) -> None:
        """Remember values to scrub; short values are ignored (they would mangle ordinary text)."""
        fresh = {v for v in values if v and len(v) >= 8}
        if fresh - self._values:
            with self._lock:
                self._values = self._values | fresh

    def discard(self, values: Iterable[str | None]) -> None:
        """Forget values that are no longer in use (a replaced token)."""
        gone = {v for v in values if v}
        if gone & self._values:
            with self._lock:
                self._values = self._values - gone

    def scrub(self, text: str) -> str:
        """`text` with every registered secret and every JWT replaced."""
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return _JWT.sub(REDACTED, text)


SECRETS = SecretRegistry()


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return SECRETS.scrub(value)
    if isinstance(value, dict):
        return {k: _redact_field(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _redact_field(key: str, value: Any) -> Any:
    if key not in _SAFE_KEYS and _SECRET_KEYS.search(key) and value not in (None, "", False):
        return REDACTED
    return _redact_value(value)


def redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Processor: mask secret-named fields and scrub secret values from every string."""
    return {key: _redact_field(key, value) for key, value in event_dict.items()}


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact,
    ]


class _FlushingHandler(logging.StreamHandler[TextIO]):
    """Writes each record and flushes at once, so a crash loses no line."""

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.flush()


def configure_logging(
    *, json: bool | None = None, level: str = "INFO", stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging through one redacting pipeline.

    `json=None` picks JSON off a terminal and the console renderer on one.
    """
    out = stream if stream is not None else sys.stdout
    if json is None:
        json = not out.isatty()
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared = _shared_processors()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redact, renderer],
    )
    handler = _FlushingHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is per request; the serving path logs nothing per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger for a module."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def audit(
    logger: structlog.stdlib.BoundLogger, event: str, *, level: str = "info", **fields: Any
) -> None:
    """Write an audit event: `audit: true` and one of the contract's event names."""
    getattr(logger, level)(event, audit=True, **fields)


class RateLimitedLog:
    """Lets a line through once per `interval` seconds per key (e.g. client.denied per client)."""

    def __init__(self, interval: float, max_keys: int = 10_000) -> None:
        self._interval = interval
        self._max_keys = max_keys
        self._last: MutableMapping[tuple[str, ...], float] = {}

    def allow(self, key: tuple[str, ...], now: float) -> bool:
        """True when a line for `key` may be written at monotonic time `now`."""
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return False
        if len(self._last) >= self._max_keys:
            self._last.clear()
        self._last[key] = now
        return True
