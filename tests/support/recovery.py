"""Recovery times measured by the fault tests, printed at the end of the run."""

from __future__ import annotations

RECOVERY_SECONDS: dict[str, float] = {}


def record(fault: str, seconds: float) -> None:
    """Remember how long the broker took to serve tokens again after `fault` ended."""
    RECOVERY_SECONDS[fault] = round(seconds, 3)
