"""The finetune stage as a Prefect flow; each step's details live in its own module.

1. Start an MLflow run, or resume the previous one when it did not finish under the same fingerprint
   (pipelines/mlflow_run.py); log every param and the inputs' identity.
2. Train: torchrun steps.train with the `finetune` section as flags (pipelines/trainer_launch.py), retried
   after crashes (each retry resumes from the last checkpoint), never after bad input or a diverged loss.
   The trainer logs its losses and checkpoints to the run and writes the DVC metric and plot files.
3. Log the outcome (resolved params, the trainer's logs) and end the run. The adapter is logged as an MLflow model
   and registered later, by the register stage after the evaluation (pipelines/register.py).

Import this module only after pipelines.settings.apply_env_defaults(): Prefect reads its settings at import.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from pipelines import mlflow_run, trainer_launch
from pipelines.finetune_config import FinetuneConfig
from steps.core.process import work_dir_lock


def retry_unless_final(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry crashes and kills, not a bad argument or a diverged loss (same result again)."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return trainer_launch.is_retryable(exc)


@task(name="start-mlflow-run", cache_policy=NO_CACHE)
def start_run(cfg: FinetuneConfig) -> tuple[str, str, bool]:
    logger = get_run_logger()
    context = FlowRunContext.get()
    run_id, experiment_id, resumed = mlflow_run.start_or_resume(cfg, mlflow_run.describe_inputs(cfg), context and context.flow_run)
    verb = "resuming" if resumed else "started"
    logger.info(f"{verb} MLflow run {run_id} in experiment '{cfg.tracking['experiment']}' at {cfg.tracking_uri}")
    return run_id, experiment_id, resumed


@task(name="train", cache_policy=NO_CACHE, retry_condition_fn=retry_unless_final)
def train(cfg: FinetuneConfig, run_id: str | None) -> None:
    trainer_launch.run_trainer(cfg, run_id, get_run_logger().info)


@task(name="log-outcome", cache_policy=NO_CACHE)
def finish_run(cfg: FinetuneConfig, run_id: str, summary: dict[str, Any]) -> None:
    mlflow_run.log_outcome(cfg, run_id, summary)
    mlflow_run.mark_finished(cfg, run_id)


@flow(name="finetune", log_prints=True)
def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune with LoRA under torchrun, tracked in MLflow, from params checked whole by load_config() (the
    stage's CLI, pipelines/finetune.py, does that before Prefect starts). See the module docstring."""
    started = time.perf_counter()
    train_with_retries = train.with_options(retries=int(cfg.launch["retries"]),
                                            retry_delay_seconds=float(cfg.launch["retry_delay_seconds"]))
    if cfg.node_rank != 0:
        # Other nodes only contribute ranks and write nothing (no lock either: the work dir may be node 0's, shared);
        # node 0 owns the MLflow run and the outputs.
        train_with_retries(cfg, None)
        return {"node_rank": cfg.node_rank}
    with work_dir_lock(cfg.work_dir):  # one writer per work dir: held (and shared with the trainer) until the flow ends
        run_id, experiment_id, resumed = start_run(cfg)
        try:
            train_with_retries(cfg, run_id)
            summary = json.loads(cfg.work.summary.read_text(encoding="utf-8"))
            finish_run(cfg, run_id, summary)
        except BaseException as exc:
            mlflow_run.mark_failed(cfg, run_id, "KILLED" if trainer_launch.is_stop_signal(exc) else "FAILED")
            if not trainer_launch.is_retryable(exc) and cfg.work.restore_previous():
                # Refused or diverged: a rerun would fail the same way, so the last good outputs come back.
                get_run_logger().info(f"the previous run's outputs are back in {cfg.work_dir}")
            raise
        cfg.work.drop_previous()
    result = {
        "run_id": run_id, "experiment_id": experiment_id, "resumed": resumed, "summary": summary,
        "seconds": round(time.perf_counter() - started, 1),
    }
    get_run_logger().info(f"finetune done: {json.dumps(result)}")
    return result
