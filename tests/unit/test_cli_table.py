"""The command line's answers to mistakes, as a table: exit code, stream, message; and its help."""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

import pytest

from broker import __version__
from broker.cli import build_parser, main
from tests.support import config
from tests.support.config import AUTHORIZATION_CODE, MEMORY_STORE, REDIS_STORE

CLIENT_SECRET = "table-client-secret-" + secrets.token_hex(8)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr); argparse's exits included."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    out, err = capsys.readouterr()
    return code, out, err


def write_config(
    directory: Path, *, store: str = "redis", client_key: str | None = None, grant: str = "cc"
) -> Path:
    """A config in `directory`: redis or memory store, a client_credentials or an auth-code app."""
    files = {"app.secret": CLIENT_SECRET}
    if client_key is not None:
        files["client.key"] = client_key
    return config.write_config(
        directory,
        app=AUTHORIZATION_CODE if grant == "ac" else None,
        store=REDIS_STORE if store == "redis" else MEMORY_STORE,
        files=files,
    )


# (case id, argv with {config} / {memory_ac} / {placeholder} filled in, exit code, stream, text)
CASES = [
    ("bare", [], 0, "out", "usage: token-broker"),
    ("help", ["--help"], 0, "out", "token-broker keeps a fresh OAuth 2.0 access token"),
    ("version-flag", ["--version"], 0, "out", f"token-broker {__version__}"),
    ("version-command", ["version"], 0, "out", f"token-broker {__version__}"),
    ("unknown-command", ["frobnicate"], 2, "err", "invalid choice: 'frobnicate'"),
    (
        "log-level",
        ["serve", "--config", "{config}", "--log-level", "verbose"],
        2,
        "err",
        "argument --log-level: 'verbose' is not a log level "
        "(choose from debug, info, warning, error)",
    ),
    ("log-format", ["serve", "--log-format", "xml"], 2, "err", "invalid choice: 'xml'"),
    ("port-range", ["dev", "--port", "70000"], 2, "err", "70000 is out of range (0 to 65535"),
    ("port-word", ["dev", "--port", "http"], 2, "err", "'http' is not a port number"),
    ("oauth-port", ["dev", "--oauth-port", "-1"], 2, "err", "-1 is out of range (0 to 65535"),
    ("lifetime", ["dev", "--lifetime", "0"], 2, "err", "0 is out of range (2 to 86400 seconds)"),
    ("lifetime-nan", ["dev", "--lifetime", "nan"], 2, "err", "nan is out of range"),
    (
        "oauth-only-port",
        ["dev", "--oauth-only", "--port", "9000"],
        2,
        "err",
        "give the OAuth server's port as --oauth-port",
    ),
    (
        "key-file",
        ["token", "twilio", "--key-file", "nope.key"],
        2,
        "err",
        "--key-file: cannot read nope.key: No such file or directory",
    ),
    ("no-key", ["token", "twilio"], 2, "err", "no client key: give --key-file FILE"),
    (
        "url",
        ["token", "twilio", "--url", "localhost:8411"],
        2,
        "err",
        "'localhost:8411' is not an http(s) URL with a host",
    ),
    (
        "url-unix-no-path",
        ["token", "twilio", "--url", "unix:"],
        2,
        "err",
        "argument --url: 'unix:' names no socket file",
    ),
    ("min-ttl", ["token", "twilio", "--min-ttl", "-5"], 2, "err", "'-5' is not a whole number"),
    ("no-config", ["check-config"], 2, "err", "use --config FILE or set TOKEN_BROKER_CONFIG"),
    ("config-ok", ["check-config", "--config", "{config}"], 0, "out", "config OK"),
    (
        "missing-config",
        ["check-config", "--config", "absent.yaml"],
        2,
        "err",
        "configuration error: absent.yaml: cannot read the config file",
    ),
    (
        "placeholder-key",
        ["check-config", "--config", "{placeholder}"],
        0,
        "err",
        "warning: clients.billing.key_file: ",
    ),
    (
        "memory-store-auth-code",
        ["check-config", "--config", "{memory_ac}"],
        2,
        "err",
        "configuration error: store.url: memory:// cannot hold app twilio's token set",
    ),
    (
        "authorize-memory-store",
        ["authorize", "twilio", "--config", "{memory_ac}"],
        2,
        "err",
        "store.url: memory:// cannot hold",
    ),
    (
        "authorize-unknown-app",
        ["authorize", "nope", "--config", "{config}"],
        2,
        "err",
        "no app named 'nope' in the config (apps: twilio)",
    ),
    (
        "status-unknown-app",
        ["status", "--config", "{config}", "--app", "nope"],
        2,
        "err",
        "configuration error: --app: no app 'nope' in the config",
    ),
    (
        "status-watch-too-fast",
        ["status", "--config", "{config}", "--watch", "0.1"],
        2,
        "err",
        "argument --watch: at least 0.5 seconds",
    ),
]


class TestCliTable:
    @pytest.mark.parametrize(
        ("argv", "code", "stream", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
    )
    def test_answer(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        argv: list[str],
        code: int,
        stream: str,
        text: str,
    ) -> None:
        """Each command line gets its documented exit code and a message saying what is wrong."""
        for name in ("TOKEN_BROKER_CONFIG", "TOKEN_BROKER_KEY", "TOKEN_BROKER_KEY_FILE"):
            monkeypatch.delenv(name, raising=False)
        # The process-wide logging setup of `authorize` would outlive this test.
        monkeypatch.setattr("broker.cli.configure_logging", lambda **_: None)
        monkeypatch.chdir(tmp_path)
        paths = {}
        for name, kwargs in {
            "config": {},
            "memory_ac": {"store": "memory", "grant": "ac"},
            "placeholder": {"client_key": "PLACEHOLDER-client-key-for-billing-make-it-random"},
        }.items():
            directory = tmp_path / name
            directory.mkdir()
            paths[name] = str(write_config(directory, **kwargs))
        got, out, err = run_cli([arg.format(**paths) for arg in argv], capsys)
        assert got == code, out + err
        assert text in (out if stream == "out" else err)
        assert "Traceback" not in out + err
        assert CLIENT_SECRET not in out + err

    def test_log_level_from_the_environment_is_checked_too(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A bad TOKEN_BROKER_LOG_LEVEL is the same usage error as a bad --log-level."""
        monkeypatch.setenv("TOKEN_BROKER_LOG_LEVEL", "loud")
        code, _, err = run_cli(["serve", "--config", "x.yaml"], capsys)
        assert code == 2
        assert "'loud' is not a log level" in err


class TestHelp:
    def subcommands(self) -> dict[str, argparse.ArgumentParser]:
        parser = build_parser()
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return dict(action.choices)

    def test_every_command_has_a_description_and_examples(self) -> None:
        """Each subcommand's help has a description and an `example` section."""
        commands = self.subcommands()
        assert set(commands) == {
            "serve",
            "dev",
            "check-config",
            "config-schema",
            "token",
            "authorize",
            "status",
            "version",
        }
        for name, parser in commands.items():
            assert parser.description, name
            assert parser.epilog is not None and "example" in parser.epilog, name
            assert f"token-broker {name}" in parser.epilog, name

    def test_every_option_has_a_help_line(self) -> None:
        """No option or argument of any command is left without a help text."""
        parsers = [build_parser(), *self.subcommands().values()]
        missing = [
            f"{parser.prog} {action.dest}"
            for parser in parsers
            for action in parser._actions
            if not action.help and not isinstance(action, argparse._SubParsersAction)
        ]
        assert missing == []

    def test_top_level_description_is_for_users(self) -> None:
        """The top-level help opens with what the tool does, not with a module docstring."""
        help_text = build_parser().format_help()
        assert "keeps a fresh OAuth 2.0 access token for every configured app" in help_text
        assert "argument parsing" not in help_text
