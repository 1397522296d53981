"""`status.json` in the trainer's work dir: how the last run there ended, so a launcher can tell a failure that
a retry would repeat (bad input, a diverged loss) from one it can fix (a crash, a kill: the state stays
"running"). Written by rank 0; it holds no time and no path, so the work dir stays reproducible.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from steps.core.common import EXIT_BAD_INPUT, EXIT_DIVERGED, write_json
from steps.formats.work_dir import WorkDir
from steps.training.distributed import is_main_process

STATES = ("running", "completed", "bad_input", "diverged")
FINAL_STATES = {EXIT_BAD_INPUT: "bad_input", EXIT_DIVERGED: "diverged"}  # failures a retry would repeat


def write_status(work_dir: str | Path, state: str, exit_code: int | None = None, message: str = "") -> None:
    write_json(WorkDir(work_dir).status, {"state": state, "exit_code": exit_code, "message": message})


def read_status(work_dir: str | Path) -> dict:
    """The last status, or {} when there is none (never started) or it is unreadable (killed mid-write)."""
    try:
        return json.loads(WorkDir(work_dir).status.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def record_failure(work_dir: str | None, exc: Exception, status: int) -> None:
    """A failure that a rerun would repeat goes to status.json (rank 0), so the finetune flow does not retry it."""
    if work_dir and Path(work_dir).is_dir() and is_main_process() and status in FINAL_STATES:
        with contextlib.suppress(OSError):  # the disk may be what failed: the exit status still tells the flow
            write_status(work_dir, FINAL_STATES[status], status, str(exc))
