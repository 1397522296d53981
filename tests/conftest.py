"""Shared fixtures: where the real datasets live, offline-friendly environment defaults, and the process-state guard."""

from __future__ import annotations

import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.settings import apply_env_defaults

pytest_plugins = ["pytester"]  # test_state_guard.py runs the guard on deliberately leaking tests

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The offline defaults every entry point applies (no telemetry, no update checks, the checkout's PREFECT_HOME),
# set once for the whole session before any test imports prefect or mlflow.
apply_env_defaults()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real E2E/WebNLG/DART files from ../shared/data; the test is skipped when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (../shared/data is absent in this checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# ---------------------------------------------------------------------------------------------- process-state guard
#
# Tests share one process: a test that leaves torch on 1 thread, an environment variable set or the working directory
# moved changes what every later test computes (a bitwise comparison between an in-process and a subprocess run once
# failed only in the full suite, because a benchmark test had left torch on 1 thread). The guard snapshots the state
# below around every test and fails the test that changed it (an error at its teardown, naming what changed), then
# restores it so later tests are unaffected.
#
# When: `process_state_guard` is an autouse function-scoped fixture, so pytest sets it up after every fixture of broader
# scope (module/session fixtures such as a Prefect test harness are not blamed on the first test that uses them) and
# before the test's other function-scoped fixtures; it checks after they are torn down, so monkeypatch.setenv/chdir
# and the like, undone at teardown, are no leak. State changed by a fixture of broader scope and still changed after
# the last test of its module has been torn down is reported by `pytest_runtest_teardown` below, on that last test.
#
# Random number generators (torch CPU, numpy's and Python's global ones) are restored, not failed: building any model
# draws from torch's generator and the trainer seeds it by design, so every test "changes" it. Restoring it after each
# test gives every test the same starting state whatever ran before it, which is what order independence needs.

IGNORED_ENV = {
    "PYTEST_CURRENT_TEST",  # set by pytest itself, with a different value in each phase of each test
    # Set by torch itself when torch._dynamo/_inductor is first imported (lazily: torch.compile, use_deterministic_algorithms,
    # ...) to the default it would resolve anyway; whichever test imports it first would be blamed for torch's own setting.
    "TORCHINDUCTOR_CACHE_DIR",
}
GUARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def process_state() -> dict[str, Any]:
    """The process-wide settings a test could leave changed, besides the random generators."""
    return {
        "torch threads": torch.get_num_threads(),
        "torch interop threads": torch.get_num_interop_threads(),
        "torch default dtype": torch.get_default_dtype(),
        "torch grad mode": torch.is_grad_enabled(),
        "torch float32 matmul precision": torch.get_float32_matmul_precision(),
        "torch deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "working directory": os.getcwd(),
        "sys.path": list(sys.path),
        "umask": oct(_umask()),
        "signal handlers": {signal.Signals(s).name: signal.getsignal(s) for s in GUARDED_SIGNALS},
        "environment": {k: v for k, v in os.environ.items() if k not in IGNORED_ENV},
    }


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """One line per changed setting, e.g. 'torch threads 2 -> 1', 'environment: FOO set to '1''."""
    changes = []
    for key, old in before.items():
        new = after[key]
        if old == new:
            continue
        if key == "environment":
            for name in sorted(set(old) | set(new)):
                if name not in new:
                    changes.append(f"environment: {name} removed (was {_short(old[name])})")
                elif name not in old:
                    changes.append(f"environment: {name} set to {_short(new[name])}")
                elif old[name] != new[name]:
                    changes.append(f"environment: {name} {_short(old[name])} -> {_short(new[name])}")
        elif key == "sys.path":
            added = list((Counter(new) - Counter(old)).elements())  # a second copy of an entry counts as added
            removed = list((Counter(old) - Counter(new)).elements())
            detail = "; ".join(filter(None, [added and f"added {added}", removed and f"removed {removed}"])) or "reordered"
            changes.append(f"sys.path {detail}")
        elif key == "signal handlers":
            changes += [f"{name} handler {_short(old[name])} -> {_short(new[name])}" for name in old if old[name] != new[name]]
        else:
            changes.append(f"{key} {old!r} -> {new!r}")
    return changes


def restore_process_state(before: dict[str, Any]) -> None:
    """Undo whatever `describe_changes` would report (interop threads cannot be set again once used: left as is).

    Only what differs is set: a setter can have effects of its own (use_deterministic_algorithms imports torch._inductor)."""
    now = process_state()
    setters = {
        "torch threads": torch.set_num_threads,
        "torch default dtype": torch.set_default_dtype,
        "torch grad mode": torch.set_grad_enabled,
        "torch float32 matmul precision": torch.set_float32_matmul_precision,
        "torch deterministic algorithms": torch.use_deterministic_algorithms,
        "working directory": os.chdir,
        "umask": lambda mask: os.umask(int(mask, 8)),
    }
    for key, setter in setters.items():
        if now[key] != before[key]:
            setter(before[key])
    if now["sys.path"] != before["sys.path"]:
        sys.path[:] = before["sys.path"]
    for name, handler in before["signal handlers"].items():
        if handler is not None and signal.getsignal(signal.Signals[name]) != handler:
            signal.signal(signal.Signals[name], handler)
    env = before["environment"]
    for name in [k for k in os.environ if k not in IGNORED_ENV and k not in env]:
        del os.environ[name]
    for name, value in env.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def check_and_restore(before: dict[str, Any], rng_before: dict[str, Any], who: str) -> None:
    """Restore everything to `before`; fail naming `who` when anything but the random generators had changed."""
    changes = describe_changes(before, process_state())
    restore_process_state(before)
    restore_rng(rng_before)
    if changes:
        pytest.fail(f"process-wide state changed: {'; '.join(changes)}\n{who} left it changed (restored now for the tests "
                    "that follow); restore it where it is changed", pytrace=False)


@pytest.fixture(autouse=True)
def process_state_guard(request):
    """Fails the test that leaves torch threads, default dtype, environment, cwd, sys.path, ... changed (see above)."""
    before, rng_before = process_state(), rng_state()
    yield
    check_and_restore(before, rng_before, f"test {request.node.nodeid}")


_module_baseline: dict[str, Any] = {}  # the state before the first test of the current module was set up


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    module = getattr(item, "module", None)
    if _module_baseline.get("module") is not module:
        _module_baseline.update(module=module, state=process_state(), rng=rng_state())
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test of a module (its module-scoped fixtures torn down): what they changed and did not undo."""
    module = getattr(item, "module", None)
    try:
        return (yield)
    finally:
        if (nextitem is None or getattr(nextitem, "module", None) is not module) and _module_baseline.get("module") is module:
            baseline = _module_baseline.copy()
            _module_baseline.clear()
            check_and_restore(baseline["state"], baseline["rng"], f"the module/class-scoped fixtures of {item.path.name}")
