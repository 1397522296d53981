"""Launching the trainer from the flow: its command line and environment, and what its exit means.

Whether a failed training is worth retrying is read from the trainer's own `status.json` in the work dir
(steps/train.py writes it), never from torchrun's text: `bad_input` and `diverged` would fail the same way
again; anything else (a crash, a kill, a lost node, status still `running`) is retried, and the retry
resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines import settings, shell
from pipelines.finetune_config import FinetuneConfig, torchrun_argv, trainer_argv
from steps.common import InputError

STATUS_FILE = "status.json"
FINAL_STATES = {"bad_input", "diverged"}


class TrainerFailed(RuntimeError):
    def __init__(self, message: str, retryable: bool, bad_input: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.bad_input = bad_input


def trainer_command(cfg: FinetuneConfig) -> list[str]:
    return torchrun_argv(cfg.launch["torchrun"]) + trainer_argv(cfg.trainer)


def trainer_env(cfg: FinetuneConfig, run_id: str | None) -> dict[str, str]:
    env = shell.python_env({
        "MLFLOW_TRACKING_URI": cfg.tracking_uri,  # absolute: every rank must write to the same store
        # `-m steps.train` must import this checkout's steps, whatever the project directory is.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(settings.CODE_ROOT), os.environ.get("PYTHONPATH")])),
    })
    env.pop("MLFLOW_RUN_ID", None)
    if run_id is not None:
        env["MLFLOW_RUN_ID"] = run_id
    return env


def read_status(work_dir: Path) -> dict:
    try:
        return json.loads((work_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def clear_status(work_dir: Path) -> None:
    """A status left by an earlier run must not decide about this one."""
    (work_dir / STATUS_FILE).unlink(missing_ok=True)


def run_trainer(cfg: FinetuneConfig, run_id: str | None, on_line) -> None:
    """Run the trainer to the end, streaming its output to `on_line`; raise TrainerFailed when it fails."""
    clear_status(cfg.work_dir)
    returncode = shell.stream(trainer_command(cfg), cfg.project_dir, trainer_env(cfg, run_id), on_line)
    if returncode == 0:
        return
    status = read_status(cfg.work_dir)
    state = status.get("state")
    if state in FINAL_STATES:
        if state == "bad_input":
            raise InputError(status.get("message") or "the trainer refused its input; see the log above")
        raise TrainerFailed(f"{status.get('message')} (not retried: it would diverge again)", retryable=False)
    raise TrainerFailed(f"trainer exited with status {returncode} (state {state or 'unknown'}); retried from its last "
                        "checkpoint while retries are left", retryable=True)


def is_retryable(exc: BaseException | None) -> bool:
    return not isinstance(exc, InputError) and not (isinstance(exc, TrainerFailed) and not exc.retryable)
