"""Run a command and hand each output line to a callback (the flow's logger).

Prefect does not capture a child process's output: an unpiped subprocess prints to the terminal only,
never to the Prefect API/UI. So flows run their commands through `stream()`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def stream(command: list[str], cwd: str | os.PathLike, env: dict[str, str], on_line: Callable[[str], None]) -> int:
    """Run `command`, call `on_line` for every non-blank output line (stdout and stderr merged); return its exit status.

    If the caller is interrupted (Ctrl-C, flow cancelled), the child is terminated, then killed, so no
    trainer ranks or DVC stages are left running behind a dead flow.
    """
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                on_line(line)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with this interpreter's bin dir first on PATH: `python` and `dvc` in stage
    commands then mean the same virtual environment as the flow, however the flow was started."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the flow's log as they are printed
    env.update(extra or {})
    return env
