"""The command line: argument parsing, config loading, logging setup, then the command."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker import __version__, tracing
from broker.config import config_warnings, load_config, summarize
from broker.errors import BrokerError, ConfigError, ConfigErrors, ListenError
from broker.local_client import BrokerAnswer, get_token, is_unix_url
from broker.logs import configure_logging, get_logger
from broker.schema import config_schema

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
# TOKEN_BROKER_EVENT_LOOP: "auto" (uvloop when installed), "uvloop" or "asyncio".
EVENT_LOOPS = ("auto", "uvloop", "asyncio")

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
DEFAULT_URL = "http://127.0.0.1:8411"
UNIX_EXAMPLE = "unix:/run/token-broker/api.sock"
DEFAULT_DEV_PORT = 8411
HELP_WIDTH = 92

log = get_logger("broker.cli")

DESCRIPTION = """\
token-broker keeps a fresh OAuth 2.0 access token for every configured app and hands it to
the services in its pod over an authenticated localhost HTTP API. Replicas share the tokens
through Redis, so the fleet asks the authorization server about once per token lifetime.
"""

EPILOG = """\
start here:
  token-broker dev                                   a local demo, no Redis and no credentials
  token-broker check-config --config config.yaml     validate a config offline
  token-broker serve --config config.yaml            run the sidecar
  token-broker status --config config.yaml           every app's record in the shared store
  token-broker COMMAND --help                        each command's options and examples

`token-broker` alone prints this help and exits 0.
exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad configuration.
docs: README.md, docs/contract.md, docs/configuration.md, docs/operations.md
"""

SERVE_EPILOG = """\
examples:
  token-broker serve --config /etc/token-broker/config.yaml
  TOKEN_BROKER_CONFIG=config.yaml token-broker serve --log-level debug
  token-broker serve --config examples/local.yaml --log-format console

Logs are JSON lines on stdout, or human-readable on a terminal (colors unless NO_COLOR is set).
SIGTERM drains and stops; SIGHUP reloads apps and clients from the config file.
"""

DEV_EPILOG = """\
examples:
  token-broker dev                      API on 127.0.0.1:8411, tokens living 60 s
  token-broker dev --port 0             any free port; the banner prints the bound address
  token-broker dev --lifetime 10        watch tokens refresh every few seconds
  token-broker dev --redis redis://127.0.0.1:6379/0
                                        tokens in Redis: `token-broker authorize demo-scim
                                        --config DIR/dev.yaml` onboards the code-grant app
  token-broker dev --socket /tmp/tb.sock
                                        the API on a unix socket, your user needs no key
  token-broker dev --oauth-only --dir examples/local-secrets
                                        only the local OAuth server (on 127.0.0.1:8412), for
                                        `serve --config examples/local.yaml` against local Redis

Dev mode keeps tokens in memory (or in Redis with --redis) and is not for production.
"""

CHECK_EPILOG = """\
examples:
  token-broker check-config --config /etc/token-broker/config.yaml
  TOKEN_BROKER_CONFIG=config.yaml token-broker check-config

Prints a summary without secrets and `warning:` lines for what works but should not ship
(placeholder or guessable keys); when the config is invalid, exits 2 with one line per
mistake, each naming the offending key and why.
"""

SCHEMA_EPILOG = """\
examples:
  token-broker config-schema > token-broker.schema.json
  # then, as the first line of config.yaml, for editors with the YAML language server:
  # yaml-language-server: $schema=./token-broker.schema.json

The JSON Schema (draft 7) of the config file: its keys, types and ranges. check-config checks
the rest (several keys together, files, the host).
"""

TOKEN_EPILOG = """\
examples:
  token-broker token twilio --key-file /etc/token-broker/clients/billing.key
  TOKEN_BROKER_URL=http://127.0.0.1:8411 TOKEN_BROKER_KEY_FILE=billing.key token-broker token twilio
  token-broker token twilio --min-ttl 600      a token with at least 10 minutes left
  token-broker token twilio --url unix:/run/token-broker/api.sock
                                               no key: this uid or gid is mapped to a client

Prints the access token alone on stdout. When the broker cannot answer with a token, stderr
says why (the app's last error) and where to look; the exit code is 1.
"""

AUTHORIZE_EPILOG = """\
examples:
  token-broker authorize twilio-scim --config /etc/token-broker/config.yaml
  token-broker authorize twilio-scim --config config.yaml --code CODE --code-verifier VERIFIER

Prints the authorize URL, reads the redirected URL from stdin, checks its state, exchanges the
code at once (it lives five minutes) and stores the token set in the shared store, where running
brokers pick it up. Needs a Redis store: memory:// is refused before the URL is printed.
"""

STATUS_EPILOG = """\
examples:
  token-broker status --config /etc/token-broker/config.yaml
  token-broker status --config config.yaml --app twilio-scim     one app in full
  token-broker status --config config.yaml --json                the same for scripts
  token-broker status --config config.yaml --watch               again every 2 s until Ctrl-C
  token-broker status --config config.yaml --store-url redis://redis-replica:6379
                                               read a replica of Redis instead of the primary

Reads each app's set, lease, spend record, shared failure and budget from the store with read
commands only (a read-only replica will do), using the config's encryption key for expiry and
failures. Never prints a token, a secret or a token's fingerprint. With server.status_endpoint
on, also shows this host's broker's own view. The JSON's schema is in docs/contract.md.
"""

VERSION_EPILOG = """\
example:
  token-broker version        (the same as token-broker --version)
"""


def build_parser() -> argparse.ArgumentParser:
    """The `token-broker` argument parser."""
    parser = argparse.ArgumentParser(
        prog="token-broker",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"token-broker {__version__}",
        help="print the version",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    serve = _command(
        sub,
        "serve",
        "run the sidecar",
        "Run the broker: refresh every app's token, serve the local API and the metrics.",
        SERVE_EPILOG,
    )
    _add_config(serve)
    serve.add_argument(
        "--log-level",
        type=_log_level,
        default=os.environ.get("TOKEN_BROKER_LOG_LEVEL", "info"),
        metavar="LEVEL",
        help=f"one of {', '.join(LOG_LEVELS)} (default info, or TOKEN_BROKER_LOG_LEVEL)",
    )
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="auto",
        help="json, console (human-readable), or auto: console on a terminal, else json",
    )

    dev = _command(
        sub,
        "dev",
        "zero-setup demo: local OAuth server, in-memory store",
        "Start a local OAuth server and a broker in front of it (app `demo`, client "
        "`demo-client`, in-memory store) and print how to get a token.",
        DEV_EPILOG,
    )
    dev.add_argument(
        "--port",
        type=_port,
        default=None,
        help=f"the API's port on 127.0.0.1 (default {DEFAULT_DEV_PORT}; 0: any free port)",
    )
    dev.add_argument(
        "--lifetime",
        type=_lifetime,
        default=60.0,
        metavar="SECONDS",
        help="how long the demo tokens live (default 60, at least 2)",
    )
    dev.add_argument(
        "--oauth-only",
        action="store_true",
        help="run only the local OAuth server, for `serve --config examples/local.yaml`",
    )
    dev.add_argument(
        "--oauth-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="the OAuth server's port (default: any free port; 8412 with --oauth-only)",
    )
    dev.add_argument(
        "--redis",
        metavar="URL",
        help="keep tokens in this Redis (e.g. redis://127.0.0.1:6379/0, keys under "
        "token-broker-dev:) instead of memory, so `token-broker authorize` can onboard the "
        "authorization-code app demo-scim",
    )
    dev.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="serve the API on this unix socket instead of TCP, with the current user mapped "
        "to the demo client (no key needed)",
    )
    dev.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to write the client id, secret and keys (default: a temporary directory, "
        "removed on exit)",
    )

    check = _command(
        sub,
        "check-config",
        "validate a config file offline",
        "Validate everything that can be checked offline (schema, files readable, key sizes, "
        "scope limit, URLs) and print a summary without secrets.",
        CHECK_EPILOG,
    )
    _add_config(check)

    token = _command(
        sub,
        "token",
        "ask a running broker for a token and print it",
        "Ask a running broker for APP's access token and print it: for shell scripts and exec "
        "probes.",
        TOKEN_EPILOG,
    )
    token.add_argument("app", metavar="APP", help="the app's name in the broker's config")
    token.add_argument(
        "--url",
        type=_broker_url,
        default=os.environ.get("TOKEN_BROKER_URL", DEFAULT_URL),
        help="the broker's API: http://host:port or unix:/path/to/api.sock "
        f"(default {DEFAULT_URL}, or TOKEN_BROKER_URL)",
    )
    token.add_argument(
        "--key-file",
        default=os.environ.get("TOKEN_BROKER_KEY_FILE"),
        metavar="FILE",
        help="file holding this client's key (or TOKEN_BROKER_KEY_FILE, or the key itself in "
        "TOKEN_BROKER_KEY); not needed over a unix socket when this uid or gid is mapped to a "
        "client",
    )
    token.add_argument(
        "--min-ttl",
        type=_seconds_count,
        default=None,
        metavar="SECONDS",
        help="ask for a token with at least this many seconds left",
    )

    authorize = _command(
        sub,
        "authorize",
        "authorization-code onboarding for an app",
        "Onboard an authorization_code app once: approve in a browser, paste the redirect; the "
        "broker keeps the refresh token from then on.",
        AUTHORIZE_EPILOG,
    )
    authorize.add_argument("app", metavar="APP", help="an authorization_code app in the config")
    _add_config(authorize)
    authorize.add_argument("--code", help="exchange this code at once (no prompt, no state check)")
    authorize.add_argument(
        "--code-verifier", metavar="VERIFIER", help="the PKCE verifier that goes with --code"
    )

    status = _command(
        sub,
        "status",
        "every app's record in the shared store, at a glance",
        "Show every app's state from the shared store: stored rank and expiry, next refresh, "
        "lease holder and fence, spend record, shared backoff and budget left.",
        STATUS_EPILOG,
    )
    _add_config(status)
    status.add_argument("--app", metavar="NAME", help="show this app in full")
    status.add_argument("--json", action="store_true", help="print JSON (schema: docs/contract.md)")
    status.add_argument(
        "--watch",
        type=_watch_interval,
        nargs="?",
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="print again every SECONDS (default 2) until interrupted",
    )
    status.add_argument(
        "--store-url",
        metavar="URL",
        help="read this Redis instead of store.url, e.g. a replica (store.password_file "
        "applies; without one, a user and password in the URL)",
    )

    _command(
        sub,
        "config-schema",
        "print the config file's JSON Schema",
        "Print the JSON Schema of the config file, for editors and the Helm chart.",
        SCHEMA_EPILOG,
    )
    _command(sub, "version", "print the version", "Print the version.", VERSION_EPILOG)
    return parser


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    epilog: str,
) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=summary,
        # The raw formatter keeps the examples' layout, so the description is wrapped here.
        description=textwrap.fill(description, HELP_WIDTH),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(command_parser=parser)
    return parser


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("TOKEN_BROKER_CONFIG"),
        metavar="FILE",
        help="the YAML config file (or TOKEN_BROKER_CONFIG)",
    )


# ---- option types: a bad value is an argparse error (exit 2) that says what is allowed -------


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log level (choose from {', '.join(LOG_LEVELS)})"
        )
    return level


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range (0 to 65535; 0: any free port)")
    return port


def _lifetime(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or not 2 <= seconds <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is out of range (2 to 86400 seconds)")
    return seconds


def _watch_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0.5:
        raise argparse.ArgumentTypeError("at least 0.5 seconds")
    return value


def _seconds_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds (0 or more)")
    return int(text)


def _broker_url(text: str) -> str:
    if is_unix_url(text):
        if not text.removeprefix("unix:"):
            raise argparse.ArgumentTypeError(f"{text!r} names no socket file, like {UNIX_EXAMPLE}")
        return text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http(s) URL with a host, like {DEFAULT_URL}, "
            f"nor a unix socket, like {UNIX_EXAMPLE}"
        )
    return text


class UsageError(BrokerError):
    """A bad option value found after parsing (e.g. an unreadable --key-file): exit 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `token-broker` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        match args.command:
            case None:
                # A bare `token-broker` is someone asking what it does, not a mistake.
                parser.print_help()
                return EXIT_OK
            case "version":
                print(f"token-broker {__version__}")
                return EXIT_OK
            case "check-config":
                return _check_config(args)
            case "config-schema":
                print(json.dumps(config_schema(), indent=2))
                return EXIT_OK
            case "serve":
                return _serve(args)
            case "dev":
                return _dev(args)
            case "token":
                return _token(args)
            case "authorize":
                return _authorize(args)
            case "status":
                return _status(args)
    except ConfigError as exc:
        for error in exc.errors if isinstance(exc, ConfigErrors) else (exc,):
            print(f"token-broker: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        # Said the way argparse says its own errors: usage, then what is wrong.
        command_parser: argparse.ArgumentParser = args.command_parser
        command_parser.print_usage(sys.stderr)
        print(f"{command_parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    print(f"token-broker: unknown command {args.command}", file=sys.stderr)
    return EXIT_USAGE


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (the `fast` extra) unless TOKEN_BROKER_EVENT_LOOP says
    otherwise; None for asyncio's default loop."""
    choice = os.environ.get("TOKEN_BROKER_EVENT_LOOP", "auto").strip().lower() or "auto"
    if choice not in EVENT_LOOPS:
        raise ConfigError("TOKEN_BROKER_EVENT_LOOP", f"must be one of {', '.join(EVENT_LOOPS)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "TOKEN_BROKER_EVENT_LOOP",
                "uvloop is not installed (pip install 'token-broker[fast]')",
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run the coroutine `main()` makes to completion on the chosen loop (see `loop_factory`)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())


def _require_config(args: argparse.Namespace) -> Path:
    if not args.config:
        raise UsageError("no config file given: use --config FILE or set TOKEN_BROKER_CONFIG")
    return Path(args.config)


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(_require_config(args))
    print(summarize(config))
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print("config OK")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from broker.app import serve

    path = _require_config(args)
    config = load_config(path)
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(json=json_logs, level=args.log_level)
    for warning in config_warnings(config):
        log.warning("config.warning", setting=warning.key, reason=warning.reason)
    stop_traces = tracing.start_from_env(os.environ)
    try:
        run_loop(lambda: serve(config, config_path=path))
    except ConfigError:
        raise
    except ListenError as exc:
        log.error("broker.failed", setting=exc.setting, address=exc.address, error=exc.reason)
        return EXIT_RUNTIME
    except BrokerError as exc:
        log.error("broker.failed", error=str(exc))
        return EXIT_RUNTIME
    except OSError as exc:
        log.error("broker.failed", error=str(exc))
        return EXIT_RUNTIME
    finally:
        if stop_traces is not None:
            stop_traces()  # exports the spans still buffered
    return EXIT_OK


def _dev(args: argparse.Namespace) -> int:
    from broker.dev import OAUTH_ONLY_PORT, run_dev, run_oauth_only

    if args.oauth_only and args.port is not None:
        raise UsageError(
            "--port is the broker API's port, and --oauth-only runs no broker: "
            "give the OAuth server's port as --oauth-port"
        )
    if args.oauth_only and (args.redis or args.socket):
        raise UsageError("--redis and --socket are for the dev broker, which --oauth-only omits")
    if args.socket is not None and args.port is not None:
        raise UsageError("--socket replaces the API's TCP port: give one of --port and --socket")
    configure_logging(json=False, level="INFO")
    with tempfile.TemporaryDirectory(prefix="token-broker-dev-") as scratch:
        workdir = args.dir if args.dir is not None else Path(scratch)
        try:
            if args.oauth_only:
                port = OAUTH_ONLY_PORT if args.oauth_port is None else args.oauth_port
                run_loop(lambda: run_oauth_only(workdir, port=port, lifetime=args.lifetime))
            else:
                run_loop(
                    lambda: run_dev(
                        workdir,
                        port=DEFAULT_DEV_PORT if args.port is None else args.port,
                        lifetime=args.lifetime,
                        oauth_port=args.oauth_port or 0,
                        redis_url=args.redis,
                        socket_path=(
                            Path(os.path.abspath(args.socket)) if args.socket is not None else None
                        ),
                    )
                )
        except ListenError as exc:
            option = "--port" if exc.setting == "server.listen" else exc.setting
            print(
                f"token-broker dev: {option}: cannot listen on {exc.address}: {exc.reason}; "
                f"{option} 0 picks any free port",
                file=sys.stderr,
            )
            return EXIT_RUNTIME
        except OSError as exc:
            print(f"token-broker dev: {exc}", file=sys.stderr)
            return EXIT_RUNTIME
    return EXIT_OK


def _authorize(args: argparse.Namespace) -> int:
    from broker.authorize import AuthorizationFailed, authorize

    config = load_config(_require_config(args))
    configure_logging(json=not sys.stderr.isatty(), level="INFO", stream=sys.stderr)

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        asyncio.run(
            authorize(
                config,
                args.app,
                code=args.code,
                code_verifier=args.code_verifier,
                read_line=sys.stdin.readline,
                say=say,
            )
        )
    except AuthorizationFailed as exc:
        print(f"token-broker authorize: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from broker.clock import SystemClock
    from broker.errors import StoreUnavailable
    from broker.status_command import print_status, read_status

    config = load_config(_require_config(args))
    clock = SystemClock()
    clear = args.watch is not None and not args.json and sys.stdout.isatty()

    async def show() -> None:
        while True:
            document = await read_status(
                config, store_url=args.store_url, app=args.app, clock=clock
            )
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            print_status(document, as_json=args.json, app=args.app)
            sys.stdout.flush()
            if args.watch is None:
                return
            await clock.sleep(args.watch)

    try:
        run_loop(show)
    except StoreUnavailable as exc:
        print(f"token-broker status: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def _client_key(args: argparse.Namespace) -> str | None:
    """The client key from --key-file or the environment; None over a unix socket without one."""
    if args.key_file:
        try:
            key = Path(args.key_file).read_text().strip()
        except OSError as exc:
            raise UsageError(
                f"--key-file: cannot read {args.key_file}: {exc.strerror or exc}"
            ) from None
        if not key:
            raise UsageError(f"--key-file: {args.key_file} is empty")
        return key
    key = os.environ.get("TOKEN_BROKER_KEY", "").strip()
    if key:
        return key
    if is_unix_url(args.url):
        # Over the unix socket the kernel names the caller: a mapped uid or gid needs no key.
        return None
    raise UsageError(
        "no client key: give --key-file FILE (or set TOKEN_BROKER_KEY_FILE or TOKEN_BROKER_KEY), "
        "or use --url unix:/path/to/api.sock when this uid or gid is mapped to a client"
    )


def _token(args: argparse.Namespace) -> int:
    key = _client_key(args)
    try:
        answer = get_token(args.url, args.app, key=key, min_ttl=args.min_ttl)
    except OSError as exc:
        print(
            f"token-broker token: cannot reach the broker at {args.url}: {exc} "
            "(is `token-broker serve` running there? --url or TOKEN_BROKER_URL names it)",
            file=sys.stderr,
        )
        return EXIT_RUNTIME
    try:
        body = json.loads(answer.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    if answer.status != 200:
        print(f"token-broker token: {_http_error_text(answer, body)}", file=sys.stderr)
        return EXIT_RUNTIME
    if "access_token" not in body:
        print("token-broker token: the broker's answer holds no token", file=sys.stderr)
        return EXIT_RUNTIME
    print(body["access_token"])
    return EXIT_OK


def _http_error_text(answer: BrokerAnswer, error: dict[str, object]) -> str:
    """The broker's JSON error as one line: status, code, message, and when to retry."""
    text = f"HTTP {answer.status}"
    if error.get("error"):
        text += f" {error.get('error')}: {error.get('message')}"
    if answer.retry_after:
        text += f" (retry after {answer.retry_after} s)"
    return text
