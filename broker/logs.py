"""structlog setup: JSON lines (or a console view), redaction before rendering, audit events.

Every line, including the stdlib records of aiohttp, asyncio and redis-py, goes through the same
processor chain, so the redaction processor sees everything before anything is written.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from broker import tracing

REDACTED = "[redacted]"

# Field names whose values are secrets whatever they hold.
_SECRET_KEYS = re.compile(
    r"(^|_)(access_token|refresh_token|id_token|token|secret|client_secret|password|"
    r"authorization|client_key|key|assertion|authorization_code|code_verifier|cookie)$",
    re.IGNORECASE,
)
# Field names that look secret but carry only safe derivatives.
_SAFE_KEYS = frozenset({"token_fingerprint", "key_id", "secret", "event"})
# Fields of our own lines whose values the broker writes itself and never from a secret (names,
# fingerprints, numbers, the event name): not scanned. Other libraries' records are scanned whole.
_PLAIN_FIELDS = frozenset(
    {
        "event",
        "level",
        "logger",
        "timestamp",
        "audit",
        "app",
        "client",
        "token_fingerprint",
        "trace_id",
        "span_id",
    }
)
# A JWT anywhere in free text.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
# The characters of tokens and keys (base64, base64url, hex, JWTs): a secret appears in a line as
# one whole run of them, whatever surrounds it (spaces, quotes, `=`, `&`, `:`, brackets, ...).
_TOKEN_CHARS = "A-Za-z0-9._~+/-"
_MIN_SECRET = 8
# One pass over a text: every run of 8 or more token characters (the only places a secret can be).
_WORD = re.compile(f"[{_TOKEN_CHARS}]{{{_MIN_SECRET},}}")
_SPLIT = re.compile(f"[^{_TOKEN_CHARS}]+")


class SecretRegistry:
    """Exact secret values (client secrets, client keys, tokens) that must never be written.

    Scrubbing a text is one regex pass over its words plus a set lookup per word, so it costs
    the same with ten secrets or ten thousand; adding or forgetting a secret changes the set in
    place. A secret with other characters (a base64 secret's `=` padding, say) is split at them
    and each piece of 8 or more characters is matched as a word; the rare secret that splits
    into a shorter piece is matched as a substring instead, as all of them once were.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        # The words to replace, each with the number of registered secrets it comes from.
        self._words: dict[str, int] = {}
        self._substrings: set[str] = set()

    def add(self, *values: str | None) -> None:
        """Remember values to scrub; short values are ignored (they would mangle ordinary text)."""
        for value in values:
            if not value or len(value) < _MIN_SECRET:
                continue
            with self._lock:
                if value in self._secrets or value in self._substrings:
                    continue
                pieces = _pieces(value)
                if any(len(piece) < _MIN_SECRET for piece in pieces):
                    self._substrings.add(value)
                    continue
                self._secrets.add(value)
                for piece in pieces:
                    self._words[piece] = self._words.get(piece, 0) + 1

    def discard(self, values: Iterable[str | None]) -> None:
        """Forget values that are no longer in use (a replaced token)."""
        for value in values:
            if not value:
                continue
            with self._lock:
                self._substrings.discard(value)
                if value not in self._secrets:
                    continue
                self._secrets.remove(value)
                for piece in _pieces(value):
                    left = self._words[piece] - 1
                    if left:
                        self._words[piece] = left
                    else:
                        del self._words[piece]

    def scrub(self, text: str) -> str:
        """`text` with every registered secret and every JWT replaced."""
        text = _WORD.sub(self._replace_word, text)
        for value in self._substrings:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def _replace_word(self, match: re.Match[str]) -> str:
        word = match.group()
        if word in self._words:
            return REDACTED
        if "eyJ" in word:
            return _JWT.sub(REDACTED, word)
        return word


def _pieces(value: str) -> set[str]:
    """The words a secret shows as in a text (itself, unless it holds delimiters)."""
    return {piece for piece in _SPLIT.split(value) if piece}


SECRETS = SecretRegistry()


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return SECRETS.scrub(value) if len(value) >= _MIN_SECRET else value
    if isinstance(value, dict):
        return {k: _redact_field(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _is_secret_key(key: str) -> bool:
    secret = _SECRET_KEY_CACHE.get(key)
    if secret is None:
        secret = key not in _SAFE_KEYS and _SECRET_KEYS.search(key) is not None
        if len(_SECRET_KEY_CACHE) < 4096:  # field names are code, but bound it all the same
            _SECRET_KEY_CACHE[key] = secret
    return secret


_SECRET_KEY_CACHE: dict[str, bool] = {}


def _redact_field(key: str, value: Any) -> Any:
    if _is_secret_key(key) and value not in (None, "", False):
        return REDACTED
    return _redact_value(value)


def redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Processor: mask secret-named fields and scrub secret values from every free-text string.

    Our own lines skip the fields the broker fills with names and numbers; another library's
    record (its `event` is the library's own message) is scanned whole.
    """
    ours = "_record" not in event_dict
    for key, value in event_dict.items():
        if ours and key in _PLAIN_FIELDS and not _is_secret_key(key):
            continue
        if isinstance(value, bool | int | float) or value is None:
            continue
        event_dict[key] = _redact_field(key, value)
    return event_dict


def add_trace_ids(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Processor: `trace_id` and `span_id` of the current span, when traces are on and one is."""
    ids = tracing.current_ids()
    if ids is not None:
        event_dict.setdefault("trace_id", ids[0])
        event_dict.setdefault("span_id", ids[1])
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
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


def wants_color(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colors only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not environ.get("NO_COLOR")


def configure_logging(
    *,
    json: bool | None = None,
    level: str = "INFO",
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Route structlog and stdlib logging through one redacting pipeline.

    `json=None` picks JSON off a terminal and the console renderer on one. The console renderer
    is told about colors explicitly (NO_COLOR is honoured) and renders tracebacks as plain text,
    so a terminal never pulls in a rich traceback with local variables in it.
    """
    out = stream if stream is not None else sys.stdout
    if json is None:
        json = not out.isatty()
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(
            colors=wants_color(out, os.environ if environ is None else environ),
            exception_formatter=structlog.dev.plain_traceback,
        )
    )
    shared = _shared_processors()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        # `redact` ran already, in `shared` (foreign_pre_chain for other libraries' records).
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _FlushingHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is per request; the serving path logs nothing per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    for old in [f for f in server_log.filters if isinstance(f, MalformedRequestFilter)]:
        server_log.removeFilter(old)
    server_log.addFilter(MalformedRequestFilter(MALFORMED_REQUEST_LOG_INTERVAL))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


# One `http.malformed_request` line per this many seconds at most.
MALFORMED_REQUEST_LOG_INTERVAL = 60.0


class MalformedRequestFilter(logging.Filter):
    """aiohttp's "Error handling request" for a request it could not parse, made harmless.

    aiohttp logs such a request at `error` with a full traceback, so any local process could
    flood the logs with garbage bytes. The client's mistake is not the broker's error: it becomes
    one `http.malformed_request` line at `info` per interval, without a traceback and without the
    request's bytes (they may hold a key), counting the ones left out since the last line.
    Other aiohttp.server records pass unchanged.
    """

    def __init__(self, interval: float) -> None:
        super().__init__()
        self._interval = interval
        self._last: float | None = None
        self._left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a malformed-request record (after writing the summary line, when due)."""
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _is_malformed_request(exc):
            return True
        # The record's own timestamp paces the lines: no clock is read here.
        if self._last is not None and record.created - self._last < self._interval:
            self._left_out += 1
            return False
        self._last = record.created
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        _log.info(
            "http.malformed_request",
            remote=str(remote) if remote is not None else None,
            reason=type(exc).__name__,
            status=getattr(exc, "code", None),
            left_out=self._left_out,
        )
        self._left_out = 0
        return False


def _is_malformed_request(exc: BaseException) -> bool:
    # Imported here: aiohttp is loaded already whenever its server logs, and the short commands
    # (`version`, `token`) that configure logging must not pay for importing it.
    from aiohttp.http_exceptions import HttpProcessingError

    return isinstance(exc, HttpProcessingError)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger for a module."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


_log = get_logger("broker.http")


AuditLevel = Literal["info", "warning", "error"]
_AUDIT_LEVELS: dict[str, int] = {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def audit(
    logger: structlog.stdlib.BoundLogger, event: str, *, level: AuditLevel = "info", **fields: Any
) -> None:
    """Write an audit event: `audit: true` and one of the contract's event names.

    `level` says how much it needs a person: a success is `info`, a failure that heals by
    itself `warning`, one that needs an operator (a rejected credential, a dead grant) `error`.
    """
    logger.log(_AUDIT_LEVELS[level], event, audit=True, **fields)


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
