"""The finetune stage's MLflow run: what it records about its inputs, and when a rerun continues it.

A run is resumed (instead of a new one started) when the previous one did not finish and the trainer's
fingerprint (steps.training.config.fingerprint: settings, world size, data, base and code) is the same; the
trainer then continues from its own resume state under the same fingerprint. Otherwise the trainer's
outputs in the work dir are removed and a fresh run starts.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Param

from pipelines import settings
from pipelines.finetune_config import FinetuneConfig, trainer_argv, world_size
from steps.core.common import InputError, file_digest, sha256_file
from steps.core.tracking import read_run_file, write_run_file
from steps.training.config import fingerprint, fingerprint_digest, parse_config

RESUMABLE_STATUSES = {"RUNNING", "FAILED", "KILLED"}
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
# Opens the experiment on its training runs in UIs that read it (MLflow's experiment-kind tag).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}



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


def run_fingerprint(cfg: FinetuneConfig) -> str:
    """The trainer's own fingerprint of this configuration, computed from the project dir as torchrun will run it."""
    trainer_cfg = parse_config(trainer_argv(cfg.trainer))
    # The trainer's paths are relative to the project dir (its working directory); the fingerprint holds their hashes only.
    trainer_cfg = replace(trainer_cfg, **{key: str(cfg.path(getattr(trainer_cfg, key)))
                                          for key in ("train_data", "valid_data", "init_checkpoint") if getattr(trainer_cfg, key)})
    return fingerprint_digest(fingerprint(trainer_cfg, world_size(cfg.launch["torchrun"])))


def describe_inputs(cfg: FinetuneConfig) -> dict[str, Any]:
    """Resolved values logged as MLflow params, among them the fingerprint that decides resume vs fresh start."""
    commit, dirty = git_state(cfg.project_dir)
    keys = ("train_data", "valid_data", "init_checkpoint")
    data = {f"data.md5.{key}": file_digest(cfg.path(cfg.trainer[key]), "md5") for key in keys}
    dvc = {f"data.dvc.{path}": md5 for path, md5 in dvc_lock_hashes(cfg.project_dir, [cfg.trainer[k] for k in keys]).items()}
    return {
        **data, **dvc,
        "resolved.git_commit": commit, "resolved.git_dirty": dirty,
        "resolved.world_size": world_size(cfg.launch["torchrun"]),
        "resolved.fingerprint": run_fingerprint(cfg),
    }


def experiment_id_for(client: MlflowClient, cfg: FinetuneConfig) -> str:
    """Get or create the experiment; with a local sqlite store its artifacts go to <project>/mlruns (never a DVC out)."""
    found = client.get_experiment_by_name(cfg.tracking["experiment"])
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise InputError(f"MLflow experiment '{found.name}' is deleted; restore it (mlflow experiments restore) or rename "
                             "tracking.experiment", cfg.params_file)
        return found.experiment_id
    location = (settings.store_root(cfg.project_dir) / "mlruns").as_uri() if cfg.tracking_uri.startswith("sqlite:") else None
    return client.create_experiment(cfg.tracking["experiment"], artifact_location=location, tags=EXPERIMENT_TAGS)


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


def log_params_once(client: MlflowClient, run_id: str, values: dict[str, Any]) -> None:
    """Log params in batches; on a resumed run, skip those already there (MLflow refuses to change a param)."""
    present = client.get_run(run_id).data.params
    fresh = [Param(k, str(v)) for k, v in values.items() if k not in present]
    for start in range(0, len(fresh), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=fresh[start : start + MAX_PARAMS_PER_BATCH], synchronous=True)


def start_or_resume(cfg: FinetuneConfig, inputs: dict[str, Any], flow_run: Any = None) -> tuple[str, str, bool]:
    """Start (or resume) the run, log all params, write the run file. Returns (run_id, experiment_id, resumed)."""
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    experiment_id = experiment_id_for(client, cfg)
    run_id = resumable_run(client, cfg, inputs["resolved.fingerprint"])
    resumed = run_id is not None
    if resumed:
        client.update_run(run_id, status="RUNNING")
    else:
        cfg.work.set_aside()  # kept until this run succeeds (steps/formats/work_dir.py)
        name = f"{cfg.trainer['model_card']}-r{cfg.trainer.get('lora_dim', 0)}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = client.create_run(experiment_id, run_name=name).info.run_id
    log_params_once(client, run_id, {**settings.flatten(cfg.params), **inputs})
    if flow_run is not None:
        client.set_tag(run_id, "prefect.flow_run_id", str(flow_run.id))
        client.set_tag(run_id, "prefect.flow_run_name", flow_run.name)
    write_run_file(cfg.path(cfg.tracking["run_file"]), run_id=run_id, tracking_uri=cfg.tracking_uri,
                   experiment_id=experiment_id, fingerprint=inputs["resolved.fingerprint"], project_dir=str(cfg.project_dir))
    return run_id, experiment_id, resumed


ADAPTER_SHA_TAG = "adapter_sha256"  # which run trained the adapter in the work dir (the register stage looks it up)


def log_outcome(cfg: FinetuneConfig, run_id: str, summary: dict[str, Any]) -> None:
    """After training: what the trainer resolved, the final adapter's sha256, and the trainer's logs as artifacts."""
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    adapter = cfg.work.adapter
    if adapter.is_file():
        client.set_tag(run_id, ADAPTER_SHA_TAG, sha256_file(adapter))
    log_params_once(client, run_id, {"resolved.max_step": summary.get("steps"), "resolved.trainable_params": summary.get("trainable_params")})
    machine = summary.get("machine") or {}
    cpu = machine.get("cpu") or {}
    tags = {"machine.cpu": cpu.get("model"), "machine.isa": " ".join(cpu.get("isa") or []), "machine.gpu": machine.get("gpu"),
            "machine.torch": machine.get("torch"), "machine.threads": machine.get("threads"), "machine.precision": summary.get("precision")}
    for key, value in tags.items():
        if value not in (None, ""):
            client.set_tag(run_id, key, str(value))
    for log in (cfg.work.train_log, cfg.work.valid_log, cfg.work.summary):
        if log.is_file():
            client.log_artifact(run_id, str(log), artifact_path="logs")


def mark_finished(cfg: FinetuneConfig, run_id: str) -> None:
    """The training is done: the register stage logs the model into this run later, after the evaluation."""
    MlflowClient(tracking_uri=cfg.tracking_uri).set_terminated(run_id, status="FINISHED")


def mark_failed(cfg: FinetuneConfig, run_id: str, status: str = "FAILED") -> None:
    """End a run that is still RUNNING as FAILED, or KILLED (stopped by a signal); both are resumed by a rerun."""
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status=status)
