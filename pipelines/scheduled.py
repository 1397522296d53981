"""The flow that scheduled deployments run: `dvc repro` in the project, so only what changed reruns.

The deployment passes only `project_dir`; everything else (which targets, whether to wait for DVC's
lock) is read from that project's params.yaml `schedule:` section at run time, so editing params.yaml
takes effect on the next run (the cron itself is read when the deployment is created).
Deployments of this flow have a concurrency limit of one (pipelines/schedule.py, prefect.yaml), so two
scheduled runs never contend for DVC's repository lock.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipelines import settings

if __name__ == "__main__":  # run as a program: the offline defaults go in before Prefect reads its settings
    settings.apply_env_defaults()

from prefect import flow, get_run_logger

from pipelines import shell
from steps.core.common import InputError

STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def repro_command(schedule: dict[str, Any]) -> list[str]:
    command = [sys.executable, "-m", "dvc"]
    if schedule["wait_for_lock"]:
        command.append("--wait-for-lock")  # a person's manual `dvc repro` delays the scheduled one instead of failing it
    return [*command, "repro", *(schedule["targets"] or [])]


def read_metrics(project: Path) -> dict[str, Any]:
    """`dvc metrics show --json`, for the run's log; empty when DVC has none yet."""
    out = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=project, env=shell.python_env(),
                         capture_output=True, text=True)
    try:
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else {}
    except json.JSONDecodeError:
        return {}


@flow(name="pipeline", log_prints=True)
def pipeline(project_dir: str) -> dict[str, Any]:
    """Bring the DVC pipeline in `project_dir` up to date, streaming DVC's output into the run's logs."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    if not (project / "dvc.yaml").is_file():
        raise InputError("no dvc.yaml here; the deployment's project_dir must be the project root", project)
    params_file = project / "params.yaml"
    schedule = settings.section(settings.load_params(params_file), "schedule", params_file)
    settings.require(schedule, ["targets", "wait_for_lock"], "schedule", params_file)
    command = repro_command(schedule)
    logger.info(f"running {' '.join(command[1:])} in {project}")
    stages: list[str] = []

    def log_line(line: str) -> None:
        logger.info(line)
        if match := STAGE_LINE.search(line):
            stages.append(match.group(1))

    started = time.perf_counter()
    returncode = shell.stream(command, project, shell.python_env(), log_line)
    if returncode != 0:
        raise RuntimeError(f"dvc repro failed with status {returncode} after stages {stages or 'none'}; see the log above")
    metrics = read_metrics(project)
    seconds = round(time.perf_counter() - started, 1)
    logger.info(f"pipeline up to date in {seconds}s; stages run: {', '.join(stages) or 'none (nothing changed)'}")
    if metrics:
        logger.info(f"metrics: {json.dumps(metrics, sort_keys=True)}")
    return {"stages_run": stages, "seconds": seconds, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.scheduled",
                                     description="Run the scheduled pipeline flow once, now (what each scheduled run does): "
                                     "dvc repro in the project, as a Prefect flow run.")
    parser.add_argument("--project_dir", default=".", help="the project to reproduce (where dvc.yaml and params.yaml are)")
    args = parser.parse_args(argv)
    state = pipeline(project_dir=args.project_dir, return_state=True)
    if not state.is_completed():
        print(f"error: pipeline flow {state.name}: {state.result(raise_on_failure=False)}", file=sys.stderr)
        return 2 if isinstance(state.result(raise_on_failure=False), InputError) else 1
    result = state.result()
    print(f"pipeline: stages run: {', '.join(result['stages_run']) or 'none (up to date)'} in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
