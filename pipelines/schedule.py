"""Serve the scheduled pipeline deployment: `dvc repro` on the cron from params.yaml, one run at a time.

    python -m pipelines.schedule                      # create/update the deployment and run its schedule in this process
    python -m pipelines.schedule --print cron         # one value of the schedule section (prefect.yaml's build step uses it)

Needs a Prefect server (PREFECT_API_URL); with none, Prefect's ephemeral server lives only as long as
this process. Stop with Ctrl-C: Prefect then pauses the deployment's schedule. For a work pool +
worker instead of serving from this process, use prefect.yaml (`prefect deploy --all`), see docs/pipeline.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipelines import settings
from steps.core.common import run_stage

# One pipeline run at a time (DVC's repository lock must never be contended). A run that comes due
# while one is still going is cancelled, not queued: the running one brings the pipeline up to date.
CONCURRENCY_LIMIT = 1
COLLISION_STRATEGY = "CANCEL_NEW"
SCHEDULE_KEYS = ["deployment", "cron", "timezone", "targets", "wait_for_lock"]


def schedule_settings(params_file: str | Path) -> dict[str, Any]:
    schedule = settings.section(settings.load_params(params_file), "schedule", params_file)
    settings.require(schedule, SCHEDULE_KEYS, "schedule", params_file)
    return schedule


def build_deployment(params_file: str | Path, project_dir: str | Path) -> Any:
    """The deployment of pipelines.scheduled.pipeline with the cron from params and a concurrency limit of one."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from pipelines.scheduled import pipeline

    schedule = schedule_settings(params_file)
    return pipeline.to_deployment(
        name=schedule["deployment"],
        schedules=[Cron(schedule["cron"], timezone=schedule["timezone"])],
        concurrency_limit=ConcurrencyLimitConfig(limit=CONCURRENCY_LIMIT, collision_strategy=ConcurrencyLimitStrategy(COLLISION_STRATEGY)),
        parameters={"project_dir": str(Path(project_dir).resolve())},
        description="dvc repro in the project on a schedule (pipelines/scheduled.py); only changed stages rerun",
        tags=["lora-nlg", "dvc"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.schedule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file whose schedule: section gives deployment name, cron, timezone")
    parser.add_argument("--project_dir", default=".", help="the project the scheduled runs reproduce (where dvc.yaml is)")
    parser.add_argument("--print", dest="print_key", choices=SCHEDULE_KEYS, default=None,
                        help="print one schedule value and exit (used by prefect.yaml so the cron lives only in params.yaml)")
    args = parser.parse_args(argv)
    settings.apply_env_defaults()
    return run_stage(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    schedule = schedule_settings(args.params)
    if args.print_key:
        print(schedule[args.print_key])
        return
    deployment = build_deployment(args.params, args.project_dir)
    from prefect import serve

    print(f"serving deployment pipeline/{deployment.name}: cron '{schedule['cron']}' ({schedule['timezone']}), "
          f"at most {CONCURRENCY_LIMIT} run at a time; Ctrl-C to stop", flush=True)
    serve(deployment, limit=CONCURRENCY_LIMIT)


if __name__ == "__main__":
    sys.exit(main())
