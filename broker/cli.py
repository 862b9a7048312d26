"""The command line: argument parsing, config loading, logging setup, then the command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from broker import __version__
from broker.config import load_config, summarize
from broker.errors import BrokerError, ConfigError
from broker.logs import configure_logging, get_logger

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
# TOKEN_BROKER_EVENT_LOOP: "auto" (uvloop when installed), "uvloop" or "asyncio".
EVENT_LOOPS = ("auto", "uvloop", "asyncio")

log = get_logger("broker.cli")


def build_parser() -> argparse.ArgumentParser:
    """The `token-broker` argument parser."""
    parser = argparse.ArgumentParser(prog="token-broker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the sidecar")
    _add_config(serve)
    serve.add_argument("--log-level", default=os.environ.get("TOKEN_BROKER_LOG_LEVEL", "INFO"))

    dev = sub.add_parser("dev", help="zero-setup demo: local OAuth server, in-memory store")
    dev.add_argument("--port", type=int, default=8411, help="API port (default 8411)")
    dev.add_argument("--lifetime", type=float, default=60.0, help="demo token lifetime, seconds")

    check = sub.add_parser("check-config", help="validate a config file offline")
    _add_config(check)

    token = sub.add_parser("token", help="ask a running broker for a token and print it")
    token.add_argument("app")
    token.add_argument(
        "--url",
        default=os.environ.get("TOKEN_BROKER_URL", "http://127.0.0.1:8411"),
        help="the broker's API (default http://127.0.0.1:8411, or TOKEN_BROKER_URL)",
    )
    token.add_argument(
        "--key-file",
        default=os.environ.get("TOKEN_BROKER_KEY_FILE"),
        help="file holding this client's key (or TOKEN_BROKER_KEY_FILE / TOKEN_BROKER_KEY)",
    )
    token.add_argument("--min-ttl", type=int, default=None)

    authorize = sub.add_parser("authorize", help="authorization-code onboarding for an app")
    authorize.add_argument("app")
    _add_config(authorize)
    authorize.add_argument("--code", help="exchange this code (no prompt, no state check)")
    authorize.add_argument("--code-verifier", help="the PKCE verifier that goes with --code")

    sub.add_parser("version", help="print the version")
    return parser


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("TOKEN_BROKER_CONFIG"),
        help="config file (or TOKEN_BROKER_CONFIG)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `token-broker` console script."""
    args = build_parser().parse_args(argv)
    try:
        match args.command:
            case "version":
                print(f"token-broker {__version__}")
                return EXIT_OK
            case "check-config":
                return _check_config(args)
            case "serve":
                return _serve(args)
            case "dev":
                return _dev(args)
            case "token":
                return _token(args)
            case "authorize":
                return _authorize(args)
    except ConfigError as exc:
        print(f"token-broker: configuration error: {exc}", file=sys.stderr)
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
        raise ConfigError("--config", "no config file given (use --config or TOKEN_BROKER_CONFIG)")
    return Path(args.config)


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(_require_config(args))
    print(summarize(config))
    print("config OK")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from broker.app import serve

    path = _require_config(args)
    config = load_config(path)
    configure_logging(json=True, level=args.log_level)
    try:
        run_loop(lambda: serve(config, config_path=path))
    except ConfigError:
        raise
    except BrokerError as exc:
        log.error("broker.failed", error=str(exc))
        return EXIT_RUNTIME
    except OSError as exc:  # e.g. the listen address is taken
        log.error("broker.failed", error=str(exc))
        return EXIT_RUNTIME
    return EXIT_OK


def _dev(args: argparse.Namespace) -> int:
    from broker.dev import run_dev

    configure_logging(json=False, level="INFO")
    with tempfile.TemporaryDirectory(prefix="token-broker-dev-") as workdir:
        try:
            run_loop(lambda: run_dev(Path(workdir), port=args.port, lifetime=args.lifetime))
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


def _token(args: argparse.Namespace) -> int:
    # Imported here: urllib.request pulls in http.client, email and ssl, which `serve` never uses.
    import urllib.error
    import urllib.request

    key = os.environ.get("TOKEN_BROKER_KEY")
    if args.key_file:
        try:
            key = Path(args.key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError("--key-file", f"cannot read: {exc.strerror}") from None
    if not key:
        raise ConfigError("--key-file", "no client key (use --key-file, TOKEN_BROKER_KEY_FILE)")
    url = f"{args.url.rstrip('/')}/v1/token/{args.app}"
    if args.min_ttl is not None:
        url += f"?min_ttl={args.min_ttl}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            error = json.load(exc)
            detail = f"{error.get('error')}: {error.get('message')}"
            print(f"token-broker: HTTP {exc.code} {detail}", file=sys.stderr)
        except ValueError:
            print(f"token-broker: HTTP {exc.code}", file=sys.stderr)
        return EXIT_RUNTIME
    except (urllib.error.URLError, OSError) as exc:
        print(f"token-broker: cannot reach the broker at {args.url}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(body["access_token"])
    return EXIT_OK


def new_client_key() -> str:
    """A random client key (43 URL-safe characters)."""
    return secrets.token_urlsafe(32)
