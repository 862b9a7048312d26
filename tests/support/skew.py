"""Skewed wall clocks for real processes: libfaketime from Debian's `faketime` package."""

from __future__ import annotations

from pathlib import Path

# Where Debian's faketime package puts the library (.ci/run installs it).
LIBFAKETIME_DIRS = (
    Path("/usr/lib/x86_64-linux-gnu/faketime"),
    Path("/usr/lib/aarch64-linux-gnu/faketime"),
    Path("/usr/lib/faketime"),
)


def libfaketime() -> Path:
    """The libfaketime.so.1 of Debian's `faketime` package; fails loudly when it is missing."""
    for directory in LIBFAKETIME_DIRS:
        candidate = directory / "libfaketime.so.1"
        if candidate.exists():
            return candidate
    raise RuntimeError("libfaketime.so.1 not found: install Debian's `faketime` package")


def skewed_env(seconds: float) -> dict[str, str]:
    """Environment that shifts a process's wall clock by `seconds` (monotonic time untouched)."""
    return {
        "LD_PRELOAD": str(libfaketime()),
        "FAKETIME": f"{seconds:+g}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
