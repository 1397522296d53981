"""Run commands and hand each output line to a callback (the flow's logger).

Prefect does not capture a child process's output: an unpiped subprocess prints to the terminal only,
never to the Prefect API/UI. So flows run their commands through `stream()` / `stream_all()`.

The trainer dies with the flow: it arms a parent-death signal itself when PARENT_PID_ENV names its
launcher (steps.common.die_with_parent), so killing the flow, even with SIGKILL, ends the trainer
instead of leaving it writing to the work dir behind a dead flow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path


def _start(command: list[str], cwd: str | os.PathLike, env: dict[str, str], pass_fds: Sequence[int]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace", pass_fds=tuple(pass_fds))


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """Terminate what still runs, then kill what ignores it."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stream(command: list[str], cwd: str | os.PathLike, env: dict[str, str], on_line: Callable[[str], None],
           pass_fds: Sequence[int] = ()) -> int:
    """Run `command`, call `on_line` for every non-blank output line (stdout and stderr merged); return its exit status."""
    return stream_all([(command, env)], cwd, on_line, pass_fds)


def stream_all(commands: Sequence[tuple[list[str], dict[str, str]]], cwd: str | os.PathLike,
               on_line: Callable[[str], None], pass_fds: Sequence[int] = ()) -> int:
    """Run the commands together (one per rank), lines of command i > 0 prefixed `[rank i]`; when one fails, the
    others are stopped. Returns 0, or the first non-zero exit status. Ctrl-C or an exception stops them all."""
    procs = [_start(command, cwd, env, pass_fds) for command, env in commands]
    lock = threading.Lock()

    def pump(index: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                with lock:
                    on_line(line if index == 0 else f"[rank {index}] {line}")

    readers = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for reader in readers:
        reader.start()
    try:
        return _wait_all(procs)
    finally:
        _stop(procs)
        for reader in readers:
            reader.join(timeout=5)


def _wait_all(procs: Sequence[subprocess.Popen]) -> int:
    """Wait until all exit 0, or until the first failure (then the caller stops the rest)."""
    pending = list(procs)
    while pending:
        for proc in list(pending):
            try:
                code = proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            if code != 0:
                return code
            pending.remove(proc)
    return 0


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with this interpreter's bin dir first on PATH: `python` and `dvc` in stage
    commands then mean the same virtual environment as the flow, however the flow was started."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the flow's log as they are printed
    env.update(extra or {})
    return env
