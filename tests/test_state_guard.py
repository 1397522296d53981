"""The process-state guard of conftest.py: it fails the test that leaks, names what changed, restores it for the tests
that follow, and does not blame a test for monkeypatch's undone changes or for module-scoped fixtures that clean up.

Each case runs this checkout's own conftest.py in a separate pytest process on small deliberately leaking tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

LEAKS = """
    import os
    import sys

    import torch

    THREADS = torch.get_num_threads()
    OTHER_THREADS = 1 if THREADS > 1 else 2
    START = os.getcwd()
    draws = []


    def test_threads_leak():
        torch.set_num_threads(OTHER_THREADS)


    def test_env_leak():
        os.environ["GUARD_TEST_LEAK"] = "1"


    def test_cwd_leak(tmp_path):
        os.chdir(tmp_path)


    def test_sys_path_leak():
        sys.path.append("/guard-test-nowhere")


    def test_dtype_leak():
        torch.set_default_dtype(torch.float64)


    def test_state_is_back_after_the_leaks():
        assert torch.get_num_threads() == THREADS
        assert "GUARD_TEST_LEAK" not in os.environ
        assert os.getcwd() == START
        assert "/guard-test-nowhere" not in sys.path
        assert torch.get_default_dtype() == torch.float32


    def test_monkeypatch_changes_are_no_leak(monkeypatch, tmp_path):
        monkeypatch.setenv("GUARD_TEST_PATCHED", "1")
        monkeypatch.chdir(tmp_path)
        monkeypatch.syspath_prepend(str(tmp_path))


    def test_restored_threads_are_no_leak():
        torch.set_num_threads(OTHER_THREADS)
        torch.set_num_threads(THREADS)


    def test_rng_draw_first():
        draws.append(torch.rand(3))


    def test_rng_draw_second():  # the generator was restored: the same draw as the test before
        draws.append(torch.rand(3))
        assert torch.equal(draws[0], draws[1])
"""

MODULE_FIXTURES = """
    import os

    import pytest


    @pytest.fixture(scope="module")
    def harness():  # like prefect_test_harness: changes the environment for the module, undoes it at the end
        os.environ["GUARD_TEST_HARNESS"] = "on"
        yield
        del os.environ["GUARD_TEST_HARNESS"]


    def test_first_user_of_the_harness(harness):
        assert os.environ["GUARD_TEST_HARNESS"] == "on"


    def test_second_user_of_the_harness(harness):
        assert os.environ["GUARD_TEST_HARNESS"] == "on"
"""

MODULE_LEAK = """
    import os

    import pytest


    @pytest.fixture(scope="module")
    def leaky():
        os.environ["GUARD_TEST_MODULE_LEAK"] = "1"
        yield


    def test_uses_the_leaky_fixture(leaky):
        pass
"""

AFTER_MODULE_LEAK = """
    import os


    def test_the_module_leak_was_restored():
        assert "GUARD_TEST_MODULE_LEAK" not in os.environ
"""


def run_inner(pytester, monkeypatch, **files: str):
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(**{name: textwrap.dedent(text) for name, text in files.items()})
    monkeypatch.setenv("PYTHONPATH", str(TESTS.parent))  # the copied conftest imports this checkout's pipelines
    monkeypatch.setenv("COLUMNS", "1000")  # summary lines untruncated
    return pytester.runpytest_subprocess("-p", "no:random_order", "-p", "no:cacheprovider", "-rA")


def test_guard_fails_each_leaking_test_and_restores_the_state(pytester, monkeypatch):
    result = run_inner(pytester, monkeypatch, test_leaks=LEAKS)
    result.assert_outcomes(passed=10, errors=5)
    out = result.stdout.str()
    for test, change in [
        ("test_threads_leak", r"torch threads \d+ -> \d+"),
        ("test_env_leak", r"environment: GUARD_TEST_LEAK set to '1'"),
        ("test_cwd_leak", r"working directory '.*' -> '.*test_cwd_leak.*'"),
        ("test_sys_path_leak", r"sys.path added \['/guard-test-nowhere'\]"),
        ("test_dtype_leak", r"torch default dtype torch.float32 -> torch.float64"),
    ]:
        result.stdout.re_match_lines([rf"ERROR test_leaks.py::{test} - Failed: process-wide state changed: {change}$"])
    for clean in ("test_state_is_back_after_the_leaks", "test_monkeypatch_changes_are_no_leak", "test_restored_threads_are_no_leak",
                  "test_rng_draw_second"):
        assert f"ERROR test_leaks.py::{clean}" not in out and f"FAILED test_leaks.py::{clean}" not in out


def test_module_fixtures_are_blamed_only_when_they_leak(pytester, monkeypatch):
    result = run_inner(pytester, monkeypatch, test_a_harness=MODULE_FIXTURES, test_b_leak=MODULE_LEAK, test_c_after=AFTER_MODULE_LEAK)
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["ERROR test_b_leak.py::test_uses_the_leaky_fixture - Failed: process-wide state changed: "
                                 "environment: GUARD_TEST_MODULE_LEAK set to '1'*"])
    result.stdout.fnmatch_lines(["*the module/class-scoped fixtures of test_b_leak.py left it changed*"])
    assert "ERROR test_a_harness.py" not in result.stdout.str()
