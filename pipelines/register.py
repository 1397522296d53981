"""The register stage: `python -m pipelines.register --params params.yaml`, after the evaluate stage.

The adapter in the finetune work dir becomes a new version of `register.model` in the MLflow registry:

1. It is logged as a pyfunc model into the finetune run named in the run file (`tracking.run_file`), with the
   decoding settings in params.yaml now. This stage declares `decode` and `encode.add_bos` in dvc.yaml, so
   `dvc exp run -S decode.beam=4` reruns it and the new version says beam 4.
2. The version carries the scores of metrics/eval.json, the base checkpoint's sha256, the test data's sha256
   (of the references the evaluate stage scored against, `decode.ref_file`) and the run id as tags; the scores
   are also the logged model's metrics.
3. `@candidate` (register.candidate_alias) moves to it. `@champion` (register.champion_alias) moves only when it
   beats the champion on `register.metric`, both scored on the same test data; with no champion yet it becomes
   the champion. Otherwise the champion stays and the stage says why.

metrics/register.json (a DVC metric, committed with git) records the version, what moved and why.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines import settings
from pipelines.finetune_config import FinetuneConfig, load_config
from steps.core.common import InputError, run_stage, sha256_file, write_json
from steps.decoding.beam import REQUEST_OPTIONS
from steps.metrics import report

SCORES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "TER", "SER")  # what metrics/eval.json may hold at its top level
LOWER_IS_BETTER = frozenset({"SER", "TER"})  # error rates; the others are similarities
# What each score can be: these are shares (a BLEU of 7.5 is no score); NIST, CIDEr and the error rates are >= 0.
AT_MOST_ONE = frozenset({"BLEU", "METEOR", "ROUGE_L"})
REGISTER_KEYS = ["model", "candidate_alias", "champion_alias", "metric"]
TEST_DATA_TAG = "test_data_sha256"


@dataclass(frozen=True)
class RegisterSettings:
    """The params.yaml `register` section, checked."""

    model: str
    candidate_alias: str
    champion_alias: str
    metric: str

    @classmethod
    def from_params(cls, params: dict[str, Any], source: Path) -> RegisterSettings:
        block = settings.section(params, "register", source)
        settings.require(block, REGISTER_KEYS, "register", source)
        values = cls(**{key: str(block[key] or "").strip() for key in REGISTER_KEYS})
        problems = [f"register.{key} is empty" for key in REGISTER_KEYS if not getattr(values, key)]
        if values.metric and values.metric not in SCORES:
            problems.append(f"register.metric = {values.metric!r}: expected one of {', '.join(SCORES)}")
        if values.candidate_alias and values.candidate_alias == values.champion_alias:
            problems.append("register.candidate_alias and register.champion_alias are the same alias; give them different names")
        if problems:
            raise InputError("; ".join(problems), source)
        return values


def read_scores(path: Path, metric: str) -> tuple[dict[str, float], dict[str, Any]]:
    """The scores at the top level of the evaluate stage's JSON (the base model's `base` section is not this adapter's),
    and the whole record (logged to the run)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("no scores to register; run the evaluate stage first (dvc repro evaluate)", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not a JSON scores file ({exc}); expected the evaluate stage's --json output", path) from None
    if not isinstance(record, dict):
        raise InputError("expected a JSON object of scores (BLEU, NIST, ...), as the evaluate stage writes", path)
    problems = [score_problem(name, record[name]) for name in SCORES if name in record]
    problems = [p for p in problems if p]
    if problems:  # a false champion (a true BLEU, an impossible 7.5, a NaN) must never take @champion
        raise InputError("; ".join(problems) + "; the evaluate stage writes finite numbers: rerun it (dvc repro evaluate)", path)
    scores = {name: float(record[name]) for name in SCORES if name in record}
    if metric not in scores:
        raise InputError(f"register.metric is {metric} but the scores hold only {', '.join(scores) or 'nothing'}; "
                         "choose one of those in params.yaml (SER exists for E2E only, METEOR unless evaluate.no_meteor)", path)
    return scores, record


def score_problem(name: str, value: Any) -> str | None:
    """Why `value` is not a valid score `name` (None when it is one)."""
    high = 1.0 if name in AT_MOST_ONE else math.inf
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= high:
        return f"{name} = {value!r}: expected a finite number " + ("from 0 to 1" if high == 1 else ">= 0")
    return None


def sha256_of_test_data(path: Path) -> str:
    """sha256 of the references file, or of a folder's file names and contents (the WebNLG/DART reference folder)."""
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise InputError("the evaluated references are missing; run the decode stage first (dvc repro decode)", path)
    listing = "".join(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n" for p in sorted(path.rglob("*")) if p.is_file())
    return hashlib.sha256(listing.encode()).hexdigest()


# ----- the champion decision


@dataclass(frozen=True)
class Verdict:
    takes_champion: bool
    reason: str


def better(metric: str, new: float, old: float) -> bool:
    """Strictly better in the metric's direction: a tie keeps the champion."""
    return new < old if metric in LOWER_IS_BETTER else new > old


def judge(metric: str, version: int, scores: dict[str, float], test_data: str, champion: Any | None) -> Verdict:
    """Does the new version take the champion alias from `champion` (a ModelVersion, or None when there is none)?"""
    if champion is None:
        return Verdict(True, f"v{version} is the first champion ({metric} {scores[metric]:.4f})")
    old = f"v{champion.version}"
    if TEST_DATA_TAG not in champion.tags:
        return Verdict(False, f"champion stays {old}: not comparable, {old} has no {TEST_DATA_TAG} tag (registered by hand?)")
    if champion.tags[TEST_DATA_TAG] != test_data:
        return Verdict(False, f"champion stays {old}: not comparable, {old} was scored on other test data "
                              f"({TEST_DATA_TAG} {champion.tags[TEST_DATA_TAG][:12]}..., v{version}: {test_data[:12]}...)")
    if metric not in champion.tags:
        return Verdict(False, f"champion stays {old}: not comparable, {old} has no {metric} score")
    theirs, ours = float(champion.tags[metric]), scores[metric]
    if better(metric, ours, theirs):
        sign = "<" if metric in LOWER_IS_BETTER else ">"
        return Verdict(True, f"v{version} takes champion from {old}: {metric} {ours:.4f} {sign} {theirs:.4f}")
    sign = "<=" if metric in LOWER_IS_BETTER else ">="
    return Verdict(False, f"champion stays {old}: {metric} {theirs:.4f} {sign} {ours:.4f} of v{version}")


def current_champion(client: Any, model: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException:  # no such model yet, or no version with this alias
        return None


# ----- the stage


def run_record(cfg: FinetuneConfig) -> dict[str, Any]:
    """The finetune run this adapter came from, from the run file; refused when it names another project's store."""
    from steps.core.tracking import read_run_file

    path = cfg.path(cfg.tracking["run_file"])
    record = read_run_file(path)
    written_for = record.get("project_dir")
    if written_for and Path(written_for).resolve() != cfg.project_dir:
        raise InputError(f"the run file was written for the project at {written_for}, not this one ({cfg.project_dir}); run the "
                         "finetune stage here (dvc repro finetune) so the adapter is registered with its own run", path)
    return record


def training_run_of_adapter(client: Any, cfg: FinetuneConfig, named: str) -> str:
    """The run that trained the adapter now in the work dir: the run file names the last training, but after
    `dvc exp apply` (or a checkout) the work dir may hold another experiment's adapter, found by its sha256 tag."""
    from mlflow.exceptions import MlflowException

    from pipelines.mlflow_run import ADAPTER_SHA_TAG

    run_file = cfg.path(cfg.tracking["run_file"])
    try:
        run = client.get_run(named)
    except MlflowException as exc:
        raise InputError(f"MLflow run {named} named in the run file is not in {cfg.tracking_uri} ({exc.message}); rerun the "
                         "finetune stage (dvc repro -f finetune)", run_file) from None
    adapter = cfg.work.adapter
    if not adapter.is_file() or run.data.tags.get(ADAPTER_SHA_TAG) in (None, sha := sha256_file(adapter)):
        return named  # its adapter, or a run older than the tag: trust the run file
    found = client.search_runs([run.info.experiment_id], filter_string=f"tags.{ADAPTER_SHA_TAG} = '{sha}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise InputError(f"the adapter in {cfg.work_dir} (sha256 {sha[:12]}...) was not trained by run {named} named in the run file, "
                         "nor by any run of its experiment; retrain it here (dvc repro -f finetune)", run_file)
    print(f"register: the adapter in {cfg.trainer['work_dir']} was trained by run {found[0].info.run_id}, not the run file's {named} "
          "(an applied or checked-out experiment); registering it with its own run")
    return found[0].info.run_id


def version_tags(cfg: FinetuneConfig, run_id: str, scores: dict[str, float], test_data: str) -> dict[str, str]:
    """What the registry page shows for each version: scores, base and test data identity, the run."""
    adapter_config = json.loads(cfg.work.adapter_config.read_text(encoding="utf-8"))
    tags = {name: repr(value) for name, value in scores.items()}  # full precision: the next champion decision reads them
    tags.update(run_id=run_id, base_sha256=(adapter_config.get("base") or {}).get("sha256") or "", test_data=cfg.decode["ref_file"])
    tags[TEST_DATA_TAG] = test_data
    summary = cfg.work.summary
    if summary.is_file() and "best_valid_loss" in (loaded := json.loads(summary.read_text(encoding="utf-8"))):
        tags["best_valid_loss"] = repr(float(loaded["best_valid_loss"]))
    return tags


def register(cfg: FinetuneConfig, chosen: RegisterSettings, scores: dict[str, float], evaluated: dict[str, Any],
             run_id: str) -> dict[str, Any]:
    """Log, register, move the aliases; return the report that goes to metrics/register.json."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from pipelines import packaging

    test_data = sha256_of_test_data(cfg.path(cfg.decode["ref_file"]))
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    run_id = training_run_of_adapter(client, cfg, run_id)
    info = packaging.log_adapter_model(cfg, run_id)
    now_ms = int(time.time() * 1000)
    # The run's scores are logged here, the one stage that reruns for every new adapter (DVC skips evaluate when two
    # adapters happen to decode alike): the adapter's, the base alone's (base.*) and the slot error counts.
    values = report.mlflow_metrics(evaluated, SCORES)
    client.log_batch(run_id, metrics=[Metric(f"eval/{name}", value, now_ms, 0, model_id=info.model_id) for name, value in values.items()],
                     synchronous=True)
    with registry_lock(cfg.tracking_uri):  # two experiments of a queue may finish at once: one judges at a time
        try:
            client.get_registered_model(chosen.model)
        except MlflowException:  # the first version of this name
            client.create_registered_model(chosen.model)
        # The registry looks the logged model up through MLflow's process-wide tracking store, not this client's.
        with packaging.fluent_store(cfg.tracking_uri):
            version = client.create_model_version(chosen.model, info.model_uri, run_id=run_id, model_id=info.model_id,
                                                  tags=version_tags(cfg, run_id, scores, test_data))
        number = int(version.version)
        champion = current_champion(client, chosen.model, chosen.champion_alias)
        client.set_registered_model_alias(chosen.model, chosen.candidate_alias, number)
        verdict = judge(chosen.metric, number, scores, test_data, champion)
        moved = [chosen.candidate_alias]
        if verdict.takes_champion:
            client.set_registered_model_alias(chosen.model, chosen.champion_alias, number)
            moved.append(chosen.champion_alias)
    # Scalars only: `dvc metrics show` and `dvc exp show` drop lists.
    return {
        "model": chosen.model, "version": number, "aliases_moved": " ".join(f"@{alias}" for alias in moved),
        "champion_version": number if verdict.takes_champion else int(champion.version),
        "metric": chosen.metric, "score": scores[chosen.metric], "reason": verdict.reason, "run_id": run_id,
    }


@contextlib.contextmanager
def registry_lock(uri: str) -> Iterator[None]:
    """With the local SQLite store, an OS lock next to it around reading the champion and moving the aliases, so two
    registers finishing together (a DVC queue with two workers) judge one after the other: each against the champion
    the other left. (A tracking server has no such lock: register one at a time there.)"""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    import fcntl

    path = Path(uri[len(prefix):]).with_suffix(".registry.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
        yield
    finally:
        os.close(fd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.register",
        description="Register the evaluated adapter: log it as an MLflow pyfunc model into its finetune run (decoding settings "
        "from the params file), make it a new version of register.model with its scores and data hashes as tags, point "
        "@candidate at it, and @champion only when it beats the champion on register.metric over the same test data.",
    )
    settings.add_params_arguments(parser, "register, decode, encode, finetune, tracking", "register.metric=SER")
    parser.add_argument("--scores", type=Path, default=Path("metrics/eval.json"), help="the evaluate stage's scores (its --json file)")
    parser.add_argument("--output", type=Path, default=Path("metrics/register.json"),
                        help="where to write the version, the aliases moved and why (a DVC metric)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.params, args.project_dir, args.overrides, inputs=("valid_data",))  # no training data needed
    # The decoding settings the registered model will carry (the finetune stage does not read them).
    settings.require(cfg.decode, [*REQUEST_OPTIONS, "eos_token_id", "seq_len", "batch_size"], "decode", cfg.params_file)
    chosen = RegisterSettings.from_params(cfg.params, cfg.params_file)
    scores, evaluated = read_scores(cfg.path(str(args.scores)), chosen.metric)
    record = run_record(cfg)
    cfg = replace(cfg, tracking_uri=record["tracking_uri"])  # where the run is, whatever the environment says now
    settings.check_tracking_store(cfg.tracking_uri)
    settings.apply_env_defaults()  # before mlflow is imported
    outcome = register(cfg, chosen, scores, evaluated, record["run_id"])
    # The committed metrics file holds what a fresh clone reproduces: not the run id, which differs on every machine.
    write_json(cfg.path(str(args.output)), {k: v for k, v in outcome.items() if k != "run_id"})
    print(f"register: {outcome['model']} v{outcome['version']} -> {outcome['aliases_moved']}; {outcome['reason']}")
    return outcome


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_stage(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
