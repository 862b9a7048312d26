"""What a log line costs as the number of registered secrets grows (redaction included).

Run: `python bench/log_bench.py [--secrets 10 2000]`. For each count, registers that many
random token-like secrets, then times (to /dev/null, JSON renderer, as `serve` logs):

- an audit line (`token.refreshed` with the fields the refresher writes);
- another library's record through the stdlib bridge (a message with free text);
- `SECRETS.add` of one new token plus `discard` of the one it replaces (what every refresh does).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.logs import SECRETS, audit, configure_logging, get_logger


def per_call_us(call: object, repeat: int) -> float:
    """Mean wall time of `call()` in microseconds over `repeat` calls."""
    assert callable(call)
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) / repeat * 1e6


def measure(count: int, repeat: int) -> dict[str, float]:
    """The three costs with `count` secrets registered."""
    values = [secrets.token_urlsafe(32) for _ in range(count)]
    SECRETS.add(*values)
    log = get_logger("broker.refresher")
    foreign = logging.getLogger("aiohttp.server")

    def audit_line() -> None:
        audit(
            log,
            "token.refreshed",
            app="app-0042",
            token_fingerprint="d7c9bcb91e73",
            expires_at=1795384769.0,
            lifetime=3599.094,
        )

    def foreign_line() -> None:
        foreign.warning("Error handling request from %s: %s", "127.0.0.1", "connection reset")

    rotation = iter([secrets.token_urlsafe(32) for _ in range(repeat + 1)])
    current = [next(rotation)]

    def add_and_discard() -> None:
        fresh = next(rotation)
        SECRETS.add(fresh)
        SECRETS.discard([current[0]])
        current[0] = fresh

    try:
        for call in (audit_line, foreign_line):
            per_call_us(call, 50)  # warm-up
        return {
            "secrets": count,
            "audit_line_us": round(per_call_us(audit_line, repeat), 1),
            "foreign_line_us": round(per_call_us(foreign_line, repeat), 1),
            "add_and_discard_us": round(per_call_us(add_and_discard, repeat), 1),
        }
    finally:
        SECRETS.discard([*values, current[0]])


def main() -> int:
    """Measure each secret count and print a table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--secrets", type=int, nargs="+", default=[10, 2000])
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with Path(os.devnull).open("w") as sink:
        configure_logging(json=True, level="INFO", stream=sink)
        rows = [measure(count, args.repeat) for count in args.secrets]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'secrets':>8} {'audit line µs':>14} {'foreign line µs':>16} {'add+discard µs':>15}")
    for row in rows:
        print(
            f"{row['secrets']:8.0f} {row['audit_line_us']:14.1f} {row['foreign_line_us']:16.1f} "
            f"{row['add_and_discard_us']:15.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
