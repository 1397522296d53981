"""The finetune stage: `python -m pipelines.finetune [--params params.yaml] [--set finetune.lora_dim=8 ...]`.

It checks the whole configuration first (one line and exit 2 on a bad value, before Prefect, MLflow or
the work dir are touched), then runs the Prefect flow of pipelines/finetune_flow.py: an MLflow run,
torchrun steps.train with retries, the run ended. The register stage (pipelines/register.py) logs and registers the
adapter after the evaluation. Every setting comes from params.yaml.

Signals (docs/reliability.md): the stage ends with the program that started it (dvc), even when that is killed;
SIGTERM and Ctrl-C stop the trainer, mark the MLflow run KILLED and exit 143 / 130 within seconds, with one
line; the rerun resumes. Prefect's temporary API server runs in its own session, so Ctrl-C at a terminal
does not take it away while the flow still reports its end to it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from pipelines import settings, shell
from pipelines.finetune_config import FinetuneConfig, load_config, torchrun_argv, trainer_argv, world_size
from steps.core.common import EXIT_INTERRUPTED, InputError, run_stage

__all__ = ["FinetuneConfig", "build_parser", "load_config", "main", "torchrun_argv", "trainer_argv", "world_size"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.finetune",
        description="Run the finetune stage as a Prefect flow: an MLflow run, torchrun steps.train with retries. "
        "(The register stage logs and registers the adapter after the evaluation.) Every setting comes from the params file.",
    )
    settings.add_params_arguments(parser, "finetune, flow, tracking, decode", "finetune.lora_dim=8")
    return parser


# DVC deletes a stage's outputs before it runs it; those with `cache: false` (the committed metrics and plots) it cannot
# bring back. When the stage then refuses its params, the message says how to.
RESTORE_HINT = ("; dvc removed this stage's committed metrics and plots before running it: `git checkout -- metrics plots` "
                "brings them back (the work dir is kept: it is a persistent output)")


def run(args: argparse.Namespace) -> None:
    try:
        cfg = load_config(args.params, args.project_dir, args.overrides)  # before anything starts: bad params cost a second
    except InputError as exc:
        if os.environ.get("DVC_STAGE"):  # run by dvc repro / dvc exp run
            raise InputError(str(exc) + RESTORE_HINT) from None
        raise
    if cfg.node_rank == 0:
        settings.check_tracking_store(cfg.tracking_uri)  # a dead server or a locked store: seconds, not minutes
    settings.apply_env_defaults()
    start_api_server()
    from pipelines.finetune_flow import finetune  # Prefect reads its settings at import: after the defaults

    state = finetune(cfg, return_state=True)  # the config checked above: params.yaml is read once
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


class _OwnSessionPopen(subprocess.Popen):
    """Prefect's temporary API server, started in a session of its own (a terminal's Ctrl-C reaches the flow and
    the trainer, not the server the flow reports to while it stops) and ended with this process, even by SIGKILL."""

    def __init__(self, args, *rest, **kwargs):
        kwargs["start_new_session"] = True
        super().__init__(shell.with_parent_death_signal(args), *rest, **kwargs)


def start_api_server() -> None:
    """Start Prefect's temporary API server now, from the main thread (its parent-death signal follows the thread
    that starts it), unless PREFECT_API_URL names a server. Prefect stops it when this process exits.

    Without this, Ctrl-C at a terminal also ended the server at once, and the flow then spent 150 s retrying to
    report its crash to it (client retries, then log flushing), printing connection errors, and exited 1."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api import server as api_server

    if not isinstance(getattr(api_server, "subprocess", None), type(subprocess)) or not hasattr(api_server, "SubprocessASGIServer"):
        return  # another Prefect layout: its own server start
    module = type(subprocess)("subprocess")  # that module's `subprocess`, but for Popen
    module.__dict__.update({**vars(subprocess), "Popen": _OwnSessionPopen})
    api_server.subprocess = module
    server = api_server.SubprocessASGIServer()
    server.start()
    if server.server_process is not None:
        API_SERVER_PID[:] = [server.server_process.pid]


API_SERVER_PID: list[int] = []  # the temporary API server this process started


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signalled = False
    try:
        with shell.ends_with_parent():
            code = run_stage(lambda: run(args))
            signalled = code == EXIT_INTERRUPTED
            return code
    except FlowFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except shell.Terminated as exc:
        signalled = True
        print(f"error: {exc}; the trainer is stopped and the MLflow run marked KILLED; what was written is complete, and a rerun "
              "resumes from its last checkpoint", file=sys.stderr)
        return 128 + exc.signum
    finally:
        if signalled:  # whatever the unwinding left; Prefect stops its server at exit, after sending its last logs
            shell.stop_children(keep=[API_SERVER_PID[0]] if API_SERVER_PID else [])


if __name__ == "__main__":
    sys.exit(main())
