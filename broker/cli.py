"""The command line: argument parsing, config loading, logging setup, then the command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from broker import __version__
from broker.config import load_config, summarize
from broker.errors import BrokerError, ConfigError
from broker.logs import configure_logging, get_logger

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2

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
        help="the broker's API: http://host:port or unix:/path/to/api.sock "
        "(default http://127.0.0.1:8411, or TOKEN_BROKER_URL)",
    )
    token.add_argument(
        "--key-file",
        default=os.environ.get("TOKEN_BROKER_KEY_FILE"),
        help="file holding this client's key (or TOKEN_BROKER_KEY_FILE / TOKEN_BROKER_KEY); "
        "not needed over a unix socket when this uid or gid is mapped to a client",
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
        asyncio.run(serve(config, config_path=path))
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
            asyncio.run(run_dev(Path(workdir), port=args.port, lifetime=args.lifetime))
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
    from broker.local_client import get_token, is_unix_url

    key = os.environ.get("TOKEN_BROKER_KEY")
    if args.key_file:
        try:
            key = Path(args.key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError("--key-file", f"cannot read: {exc.strerror}") from None
    if not key and not is_unix_url(args.url):
        raise ConfigError(
            "--key-file",
            "no client key (use --key-file, TOKEN_BROKER_KEY_FILE; or --url unix:/path "
            "when this uid is mapped to a client)",
        )
    try:
        status, raw = get_token(args.url, args.app, key=key, min_ttl=args.min_ttl)
    except ValueError as exc:
        raise ConfigError("--url", str(exc)) from None
    except OSError as exc:
        print(f"token-broker: cannot reach the broker at {args.url}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    if status != 200:
        detail = f" {body.get('error')}: {body.get('message')}" if body.get("error") else ""
        print(f"token-broker: HTTP {status}{detail}", file=sys.stderr)
        return EXIT_RUNTIME
    if "access_token" not in body:
        print("token-broker: the broker's answer holds no token", file=sys.stderr)
        return EXIT_RUNTIME
    print(body["access_token"])
    return EXIT_OK


def new_client_key() -> str:
    """A random client key (43 URL-safe characters)."""
    return secrets.token_urlsafe(32)
