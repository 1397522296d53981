"""The finetune stage: `python -m pipelines.finetune [--params params.yaml] [--set finetune.lora_dim=8 ...]`.

It checks the whole configuration first (one line and exit 2 on a bad value, before Prefect, MLflow or
the work dir are touched), then runs the Prefect flow of pipelines/finetune_flow.py: an MLflow run,
torchrun steps.train with retries, the run ended. The register stage (pipelines/register.py) logs and registers the
adapter after the evaluation. Every setting comes from params.yaml.
"""

from __future__ import annotations

import argparse
import sys

from pipelines import settings
from pipelines.finetune_config import FinetuneConfig, load_config, torchrun_argv, trainer_argv, world_size
from steps.common import InputError, run_stage

__all__ = ["FinetuneConfig", "build_parser", "load_config", "main", "torchrun_argv", "trainer_argv", "world_size"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.finetune",
        description="Run the finetune stage as a Prefect flow: an MLflow run, torchrun steps.train with retries. "
        "(The register stage logs and registers the adapter after the evaluation.) Every setting comes from the params file.",
    )
    settings.add_params_arguments(parser, "finetune, flow, tracking, decode", "finetune.lora_dim=8")
    return parser


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.params, args.project_dir, args.overrides)  # before anything starts: bad params cost a second
    if cfg.node_rank == 0:
        settings.check_tracking_store(cfg.tracking_uri)  # a dead server or a locked store: seconds, not minutes
    settings.apply_env_defaults()
    from pipelines.finetune_flow import finetune  # Prefect reads its settings at import: after the defaults

    state = finetune(params_file=str(cfg.params_file), project_dir=str(cfg.project_dir), overrides=args.overrides, return_state=True)
    exc = None if state.is_completed() else state.result(raise_on_failure=False)
    if isinstance(exc, InputError):
        raise exc
    if exc is not None:
        raise FlowFailed(f"finetune flow {state.name}: {exc}")
    result = state.result()
    if "summary" not in result:  # a node other than 0
        print(f"finetune: node {result['node_rank']} done")
        return
    summary = result["summary"]
    print(f"finetune: {summary.get('steps')} updates, best valid loss {summary.get('best_valid_loss', float('nan')):.4f}, "
          f"MLflow run {result['run_id']}{' (resumed)' if result['resumed'] else ''}, {result['seconds']:.0f}s")


class FlowFailed(RuntimeError):
    pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_stage(lambda: run(args))
    except FlowFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
