"""The finetune stage's configuration: params.yaml checked whole, before Prefect, MLflow or the work dir
are touched, and turned into the trainer's and torchrun's command lines.

Every check answers in one line that names the params.yaml key, the bad value and what is allowed. The
trainer's option ranges come from steps.training.config, the same table `python -m steps.train` uses.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import settings
from steps.core.common import InputError
from steps.formats.work_dir import WorkDir
from steps.training.config import OPTIONS, option_problems

FLOW_KEYS = ["torchrun", "retries", "retry_delay_seconds"]
TORCHRUN_KEYS = ["nproc_per_node", "nnodes", "node_rank", "max_restarts", "join_timeout"]
TRACKING_KEYS = ["tracking_uri", "experiment", "run_file"]
REQUIRED_TRAINER_KEYS = ["train_data", "valid_data", "work_dir", "init_checkpoint", "model_card"]


@dataclass
class FinetuneConfig:
    """params.yaml, validated, with paths resolved against the project root."""

    project_dir: Path
    params_file: Path
    params: dict[str, Any]
    trainer: dict[str, Any]  # the `finetune` section: steps.train options by their original names
    launch: dict[str, Any]  # the `flow` section: torchrun layout and retries
    tracking: dict[str, Any]
    decode: dict[str, Any]
    tracking_uri: str

    @property
    def work_dir(self) -> Path:
        return settings.resolve_path(self.project_dir, self.trainer["work_dir"])

    @property
    def work(self) -> WorkDir:
        """The work dir's files (steps/formats/work_dir.py)."""
        return WorkDir(self.work_dir)

    @property
    def node_rank(self) -> int:
        return int(self.launch["torchrun"]["node_rank"])

    def path(self, value: str) -> Path:
        return settings.resolve_path(self.project_dir, value)


TRAINING_INPUTS = ("train_data", "valid_data", "init_checkpoint")


def load_config(params_file: str | os.PathLike, project_dir: str | os.PathLike = ".", overrides: list[str] | None = None,
                inputs: tuple[str, ...] = TRAINING_INPUTS) -> FinetuneConfig:
    """Read params.yaml once and check it whole; `inputs` are the `finetune` files that must exist (training needs
    all three; the register stage only the validation data, for its input example)."""
    project = Path(project_dir).resolve()
    params_path = settings.resolve_path(project, params_file)
    params = settings.load_params(params_path, overrides)
    trainer = settings.section(params, "finetune", params_path)
    launch = settings.section(params, "flow", params_path)
    tracking = settings.section(params, "tracking", params_path)
    decode = settings.section(params, "decode", params_path)
    settings.require(trainer, REQUIRED_TRAINER_KEYS, "finetune", params_path)
    settings.require(launch, FLOW_KEYS, "flow", params_path)
    settings.require(launch["torchrun"], TORCHRUN_KEYS, "flow.torchrun", params_path)
    settings.require(tracking, TRACKING_KEYS, "tracking", params_path)
    check_trainer_section(trainer, params_path)
    check_flow_section(launch, params_path)
    check_torchrun_section(launch["torchrun"], params_path)
    for key in inputs:
        if not settings.resolve_path(project, trainer[key]).is_file():
            raise InputError(f"finetune.{key} = {trainer[key]} does not exist; run the earlier stages first (dvc repro)", params_path)
    return FinetuneConfig(project, params_path, params, trainer, launch, tracking, decode, settings.tracking_uri(tracking, project))


def check_trainer_section(trainer: dict[str, Any], source: Path) -> None:
    """Unknown keys (a typo such as `lora_dmi`), values of the wrong type, bad choices and out-of-range values, all
    named at once (the checks of steps.training.config, derived from the options' one declaration)."""
    problems = [f"finetune.{key} is not a trainer option (did you mean one of: {', '.join(close_matches(key, OPTIONS))}?)"
                for key in trainer if key not in OPTIONS]
    problems += option_problems(trainer, name=lambda key: f"finetune.{key}")
    if problems:
        raise InputError("; ".join(problems), source)


def check_flow_section(launch: dict[str, Any], source: Path) -> None:
    """How a crashed training is retried: a count and a delay (a retry of a bad value would only repeat it)."""
    problems = [] if is_count(launch["retries"], 0) else [f"flow.retries = {launch['retries']!r}: expected a whole number >= 0"]
    delay = launch["retry_delay_seconds"]
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay < float("inf"):
        problems.append(f"flow.retry_delay_seconds = {delay!r}: expected a number of seconds >= 0")
    if problems:
        raise InputError("; ".join(problems), source)


def check_torchrun_section(torchrun: dict[str, Any], source: Path) -> None:
    """The node layout and its failure handling, all problems named at once (torchrun itself would say less, later)."""
    counts = {"nnodes": 1, "node_rank": 0, "max_restarts": 0, "join_timeout": 1}  # each key's smallest value
    problems = [f"flow.torchrun.{key} = {torchrun[key]!r}: expected a whole number >= {low}"
                for key, low in counts.items() if not is_count(torchrun[key], low)]
    nproc = torchrun["nproc_per_node"]
    if not (is_count(nproc, 1) or nproc in ("gpu", "auto")):
        # torchrun's "cpu" (one process per core) would go through its --standalone store on every interface.
        problems.append(f"flow.torchrun.nproc_per_node = {nproc!r}: expected a whole number >= 1 (processes on this "
                        "machine), gpu (one per GPU) or auto (one per GPU, else 1)")
    if not problems and int(torchrun["node_rank"]) >= int(torchrun["nnodes"]):
        problems.append(f"flow.torchrun.node_rank = {torchrun['node_rank']}: expected 0 to nnodes - 1 = {int(torchrun['nnodes']) - 1}")
    if not problems and int(torchrun["nnodes"]) > 1 and not (torchrun.get("rdzv_endpoint") or torchrun.get("master_addr")):
        problems.append(f"flow.torchrun.nnodes = {torchrun['nnodes']} needs a rendezvous: set rdzv_endpoint (host:port of "
                        "node 0, with rdzv_backend c10d and an rdzv_id) or master_addr and master_port")
    if problems:
        raise InputError("; ".join(problems), source)


def is_count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def close_matches(key: str, options: dict[str, Any]) -> list[str]:
    import difflib

    return difflib.get_close_matches(key, list(options), n=3) or ["see python -m steps.train --help"]


def trainer_argv(trainer: dict[str, Any]) -> list[str]:
    """The `finetune` section as steps.train flags: `key: v` -> `--key v`, `flag: true` -> `--flag`, null -> omitted."""
    argv: list[str] = []
    for key, value in trainer.items():
        if value is None or value is False:
            continue
        if value is True:
            argv.append(f"--{key}")
        elif isinstance(value, list | tuple):
            argv += [f"--{key}", ",".join(str(v) for v in value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def torchrun_argv(torchrun: dict[str, Any]) -> list[str]:
    """`python -m torch.distributed.run` (torchrun) with the node layout from `flow.torchrun`.

    One node with no rendezvous endpoint: --standalone (a private rendezvous on a free local port, so
    two trainings on one machine never collide). Several nodes: every multi-node setting that is set
    (master_addr/port or rdzv_backend/endpoint/id) is passed through unchanged. When the rendezvous is on this
    machine's loopback (or --standalone), torchrun runs through pipelines.loopback_torchrun, whose stores listen
    on 127.0.0.1 only.
    """
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun['nproc_per_node']}"]
    if rendezvous_on_loopback(torchrun):
        host = rendezvous_host(torchrun)
        argv[2] = "pipelines.loopback_torchrun"
        argv.append(f"--local_addr={host if host not in (None, 'localhost') else '127.0.0.1'}")  # the workers' store too
    if int(torchrun["nnodes"]) == 1 and not any(torchrun.get(k) for k in MULTI_NODE_KEYS):
        argv.append("--standalone")
    else:
        argv += [f"--nnodes={torchrun['nnodes']}", f"--node_rank={torchrun['node_rank']}"]
        argv += [f"--{key}={torchrun[key]}" for key in MULTI_NODE_KEYS if torchrun.get(key)]
    if torchrun.get("max_restarts"):  # elastic: a failed worker restarts the whole group, which resumes from its checkpoint
        argv.append(f"--max_restarts={torchrun['max_restarts']}")
    if torchrun.get("rdzv_backend") and torchrun.get("join_timeout"):  # how long the nodes wait for each other
        argv.append(f"--rdzv_conf=join_timeout={torchrun['join_timeout']}")
    return [*argv, "-m", "steps.train"]


MULTI_NODE_KEYS = ["master_addr", "master_port", "rdzv_backend", "rdzv_endpoint", "rdzv_id"]


def rendezvous_host(torchrun: dict[str, Any]) -> str | None:
    """The host the nodes meet at (rdzv_endpoint's, else master_addr); None for --standalone."""
    endpoint = str(torchrun.get("rdzv_endpoint") or "")
    if endpoint.startswith("["):  # [IPv6]:port
        return endpoint[1:endpoint.find("]")]
    if endpoint:
        return endpoint.split(":")[0] if endpoint.count(":") == 1 else endpoint  # host:port, host, or a bare IPv6
    return str(torchrun["master_addr"]) if torchrun.get("master_addr") else None


def rendezvous_on_loopback(torchrun: dict[str, Any]) -> bool:
    """Whether every node meets on this machine's loopback interface (or torchrun runs --standalone)."""
    import ipaddress

    host = rendezvous_host(torchrun)
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: another machine, or this one by a name other machines can reach


def world_size(torchrun: dict[str, Any]) -> int | str:
    nproc = torchrun["nproc_per_node"]
    return int(nproc) * int(torchrun["nnodes"]) if str(nproc).isdigit() else f"{nproc} x {torchrun['nnodes']} nodes"
