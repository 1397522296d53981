"""Launching the trainer from the flow: its processes, their environment, and what their exit means.

How it is launched, by `flow.torchrun`:
- one process (the default): `python -m steps.train` alone. No torchrun, so nothing listens on the network.
- one node, N processes: N `python -m steps.train` processes with RANK/WORLD_SIZE set, meeting through a
  rendezvous file and talking over loopback (gloo/NCCL bound to `lo`). torchrun is not used here because its
  rendezvous stores listen on every interface, unauthenticated, and unpickle what they are sent.
- several nodes: torchrun with the endpoint the user configured (docs/pipeline.md: keep that port reachable
  by the training nodes alone; the flow says so at launch). When that endpoint is a loopback address (the
  nodes are on this machine), torchrun runs through pipelines.loopback_torchrun: nothing listens beyond
  loopback. Node 0's flow marks its processes as the output node (NLG_OUTPUT_NODE), so the trainer's rank 0,
  which writes the work dir and logs to MLflow, is on the node that owns the run, whatever order torchrun's
  rendezvous gives the nodes. torchrun passes no descriptors on, so the work dir's lock is
  shared by naming the flow's PID instead (steps.core.process.holds_inherited_lock).

Whether a failed training is worth retrying is read from the trainer's own `status.json` in the work dir,
never from its text: `bad_input` and `diverged` would fail the same way again; anything else (a crash, a kill,
a lost node, status still `running`) is retried, and the retry resumes from the last checkpoint. One torchrun
failure is read from torchrun's own error file: a rendezvous that timed out (a node never came) is not retried,
since a retry would wait just as long for a node nobody started.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from pipelines import settings, shell
from pipelines.finetune_config import FinetuneConfig, rendezvous_host, rendezvous_on_loopback, torchrun_argv, trainer_argv
from steps.core.common import InputError
from steps.core.process import PARENT_PID_ENV, WORK_DIR_LOCK_FD, WORK_DIR_LOCK_HOLDER, held_lock
from steps.training.distributed import OUTPUT_NODE, RENDEZVOUS_FILE
from steps.training.status import read_status


class TrainerFailed(RuntimeError):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def processes_per_node(torchrun: dict) -> int | None:
    """flow.torchrun.nproc_per_node as a number (`gpu`/`auto` count the GPUs); None for what torchrun must resolve."""
    value = str(torchrun["nproc_per_node"])
    if value.isdigit():
        return int(value)
    if value in ("gpu", "auto"):
        import torch

        return torch.cuda.device_count() or (1 if value == "auto" else None)
    return None


def launches_torchrun(cfg: FinetuneConfig) -> bool:
    torchrun = cfg.launch["torchrun"]
    return int(torchrun["nnodes"]) > 1 or processes_per_node(torchrun) is None


def trainer_commands(cfg: FinetuneConfig, run_id: str | None, error_file: Path | None = None) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, env) of every process this node starts; torchrun writes why it failed to `error_file`. When this process
    holds the work dir's lock (`with work_dir_lock(...)`), the trainers share it."""
    lock_fd = held_lock(cfg.work_dir)
    env = trainer_env(cfg, run_id, lock_fd)
    if launches_torchrun(cfg):
        env = {**env, **torchrun_env(cfg, lock_fd, error_file)}
        env.pop(WORK_DIR_LOCK_FD, None)  # torchrun closes every descriptor its workers would inherit
        return [(torchrun_argv(cfg.launch["torchrun"]) + trainer_argv(cfg.trainer), env)]
    command = [sys.executable, "-m", "steps.train", *trainer_argv(cfg.trainer)]
    world = processes_per_node(cfg.launch["torchrun"]) or 1
    env[PARENT_PID_ENV] = str(os.getpid())  # the trainer ends when this flow does (steps.core.process.die_with_parent)
    if world == 1:
        return [(command, env)]
    rendezvous = cfg.work_dir.parent / f".{cfg.work_dir.name}.rendezvous-{uuid.uuid4().hex}"
    shared = {RENDEZVOUS_FILE: str(rendezvous), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
              "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
    return [(command, {**env, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(world)]


def exposure_warning(torchrun: dict) -> str:
    return (f"warning: torchrun's rendezvous store at {rendezvous_host(torchrun)} and the ports the training processes open "
            "among themselves accept anyone who reaches them, unauthenticated, and what torchrun reads from them is "
            "unpickled (code can run in the training): keep them reachable by the training nodes alone (a private "
            "network or a firewall; docs/reliability.md#network-exposure)")


def torchrun_env(cfg: FinetuneConfig, lock_fd: int | None, error_file: Path | None) -> dict[str, str]:
    env = {# torch 2.13 keeps one store for every rendezvous round, and the restarted workers' gloo then reads the
           # dead workers' addresses from it and fails (measured: max_restarts never recovered). A store per round works.
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if error_file is not None:
        env["TORCHELASTIC_ERROR_FILE"] = str(error_file)
    if cfg.node_rank == 0:
        env[OUTPUT_NODE] = "1"  # rank 0 on this node: it writes this node's work dir and the MLflow run
    if rendezvous_on_loopback(cfg.launch["torchrun"]):  # all nodes on this machine: gloo/NCCL over loopback too
        env.update(GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
    if lock_fd is not None:
        env[WORK_DIR_LOCK_HOLDER] = str(os.getpid())
    return env


def trainer_env(cfg: FinetuneConfig, run_id: str | None, lock_fd: int | None = None) -> dict[str, str]:
    env = shell.python_env({
        "MLFLOW_TRACKING_URI": cfg.tracking_uri,  # absolute: every rank must write to the same store
        # `-m steps.train` must import this checkout's steps, whatever the project directory is.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(settings.CODE_ROOT), os.environ.get("PYTHONPATH")])),
    })
    for key in ("MLFLOW_RUN_ID", WORK_DIR_LOCK_FD, WORK_DIR_LOCK_HOLDER, PARENT_PID_ENV, RENDEZVOUS_FILE, OUTPUT_NODE,
                "TORCHELASTIC_ERROR_FILE"):
        env.pop(key, None)
    if run_id is not None:
        env["MLFLOW_RUN_ID"] = run_id
    if lock_fd is not None:
        env[WORK_DIR_LOCK_FD] = str(lock_fd)  # the flow holds the work dir's lock; the trainer shares it
    return env


def run_trainer(cfg: FinetuneConfig, run_id: str | None, on_line: Callable[[str], None]) -> None:
    """Run the trainer to the end, streaming its output to `on_line`; raise TrainerFailed when it fails."""
    if cfg.node_rank == 0:  # other nodes write nothing, and may share node 0's work dir
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        cfg.work.status.unlink(missing_ok=True)  # a status left by an earlier run must not decide about this one
    # torchrun writes why it failed here; nothing is created for a launch without torchrun (the usual one)
    torchrun = launches_torchrun(cfg)
    error_dir = Path(tempfile.mkdtemp(prefix="nlg-torchrun-")) if torchrun else None
    error_file = error_dir / "error.json" if error_dir else None
    commands = trainer_commands(cfg, run_id, error_file)
    lock_fd = held_lock(cfg.work_dir)
    if torchrun and not rendezvous_on_loopback(cfg.launch["torchrun"]):
        on_line(exposure_warning(cfg.launch["torchrun"]))
    on_line(f"launching: {' '.join(commands[0][0])}" + (f" (x{len(commands)} processes)" if len(commands) > 1 else ""))
    if torchrun:  # torchrun arms no parent-death signal itself: it gets SIGTERM when this flow ends
        commands = [(shell.with_parent_death_signal(argv), env) for argv, env in commands]
    try:
        returncode = shell.stream_all(commands, cfg.project_dir, on_line, pass_fds=() if lock_fd is None else (lock_fd,))
        timed_out = returncode != 0 and error_file is not None and rendezvous_timed_out(error_file)
    finally:
        if error_dir is not None:
            shutil.rmtree(error_dir, ignore_errors=True)
        for _, env in commands:
            if RENDEZVOUS_FILE in env:
                Path(env[RENDEZVOUS_FILE]).unlink(missing_ok=True)
    if returncode == 0:
        return
    if timed_out:
        raise rendezvous_timeout(cfg)
    status = read_status(cfg.work_dir)
    state = status.get("state")
    if state == "bad_input":
        raise InputError(status.get("message") or "the trainer refused its input; see the log above")
    if state == "diverged":
        raise TrainerFailed(f"{status.get('message')} (not retried: it would diverge again)", retryable=False)
    raise TrainerFailed(f"trainer exited with status {returncode} (state {state or 'unknown'}); retried from its last "
                        "checkpoint while retries are left", retryable=True)


def rendezvous_timed_out(error_file: Path) -> bool:
    """Whether torchrun gave up waiting for the other nodes (its own error file says so, in JSON)."""
    try:
        error = json.loads(error_file.read_text(encoding="utf-8"))["message"]["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return str(error).startswith("RendezvousTimeoutError")


def rendezvous_timeout(cfg: FinetuneConfig) -> TrainerFailed:
    torchrun = cfg.launch["torchrun"]
    return TrainerFailed(
        f"the {torchrun['nnodes']} nodes did not all join the rendezvous at {torchrun.get('rdzv_endpoint') or torchrun.get('master_addr')} "
        f"within flow.torchrun.join_timeout = {torchrun.get('join_timeout')} s; start `python -m pipelines.finetune --set "
        "flow.torchrun.node_rank=<i>` on every node with the same endpoint and rdzv_id, and check that this port is reachable "
        "from them (not retried: a retry would wait as long again)", retryable=False)


def is_stop_signal(exc: BaseException | None) -> bool:
    """Ctrl-C or SIGTERM (Prefect's TerminationSignal inside a flow, shell.Terminated outside): stopped, not failed."""
    from prefect.exceptions import TerminationSignal

    return isinstance(exc, KeyboardInterrupt | TerminationSignal | shell.Terminated)


def is_retryable(exc: BaseException | None) -> bool:
    return not isinstance(exc, InputError) and not (isinstance(exc, TrainerFailed) and not exc.retryable)
