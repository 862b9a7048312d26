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
    """libfaketime.so.1: Debian's `faketime` package, else the copy the `libfaketime` wheel ships
    (a fresh machine without root); fails loudly when neither is there."""
    for directory in LIBFAKETIME_DIRS:
        candidate = directory / "libfaketime.so.1"
        if candidate.exists():
            return candidate
    import libfaketime as wheel  # type: ignore[import-untyped]

    bundled = Path(wheel.__file__).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"
    if bundled.exists():
        return bundled
    raise RuntimeError(
        "libfaketime.so.1 not found: install Debian's `faketime` package or the test extra"
    )


def skewed_env(seconds: float) -> dict[str, str]:
    """Environment that shifts a process's wall clock by `seconds` (monotonic time untouched)."""
    return {
        "LD_PRELOAD": str(libfaketime()),
        "FAKETIME": f"{seconds:+g}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
