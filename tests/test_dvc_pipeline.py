"""`dvc repro` end to end in a throw-away copy of the repository, on a tiny configuration.

Every stage runs for real (sample -> prepare -> encode -> base -> finetune flow -> decode -> evaluate);
a second `dvc repro` must do nothing; `dvc exp run -S finetune.lora_dim=8` must rerun only what
depends on that parameter. The copy is a fresh git repository, as a user's clone would be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ["sample", "prepare", "encode", "base", "finetune", "decode", "evaluate"]

TINY = {
    "sample": {"train_mrs": 40, "valid_mrs": 4, "test_mrs": 3},
    "finetune": {"max_step": 8, "warmup_step": 2, "log_interval": 4, "eval_interval": 4, "save_interval": 4, "train_batch_size": 4},
    "flow": {"retry_delay_seconds": 0},
    "decode": {"beam": 2, "eval_len": 8, "batch_size": 4},
}


def copy_working_tree(target: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a commit of this checkout would hold."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def dvc(project: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PREFECT_API_URL")}
    env.update({
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),  # stage commands call `python`
        "PREFECT_HOME": str(project / ".prefect"),
        "DVC_NO_ANALYTICS": "1",
    })
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=project, check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repro") / "project"
    root.mkdir()
    copy_working_tree(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "copy of the project")
    return root


@pytest.fixture(scope="module")
def first_repro(project) -> str:
    result = dvc(project, "repro")
    return result.stdout + result.stderr


@pytest.mark.slow
def test_every_stage_runs_and_writes_its_outputs(first_repro, project):
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first_repro, stage
    for path in ["data/raw/sample/train.txt", "data/formatted/test.jsonl", "data/encoded/train.jsonl", "models/base/model.safetensors",
                 "models/finetune/adapter.safetensors", "models/finetune/checkpoints/step_4/adapter.safetensors",
                 "outputs/predictions.jsonl", "outputs/refs.txt", "outputs/preds.txt", "plots/loss.png"]:
        assert (project / path).is_file(), path
    scores = json.loads((project / "metrics/eval.json").read_text())
    for metric in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"):
        assert isinstance(scores[metric], float), metric
    assert scores["n_instances"] == 3  # test_mrs
    assert json.loads((project / "metrics/train_summary.json").read_text())["steps"] == 8
    assert (project / "plots/train_loss.csv").read_text().splitlines()[0] == "step,loss,nll"
    assert [row.split(",")[0] for row in (project / "plots/valid_loss.csv").read_text().splitlines()[1:]] == ["4", "8"]


@pytest.mark.slow
def test_lock_file_records_every_stage(first_repro, project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert sorted(lock) == sorted(STAGES)
    finetune_outs = {out["path"]: out for out in lock["finetune"]["outs"]}
    assert finetune_outs["models/finetune"]["md5"].endswith(".dir")
    assert {"metrics/train_summary.json", "plots/train_loss.csv", "plots/valid_loss.csv", "plots/loss.png"} <= set(finetune_outs)
    assert lock["finetune"]["params"]["params.yaml"]["finetune"]["lora_dim"] == 4
    assert lock["decode"]["params"]["params.yaml"]["decode"]["beam"] == 2
    assert json.loads(dvc(project, "status", "--json").stdout) == {}


@pytest.mark.slow
def test_second_repro_does_nothing(first_repro, project):
    again = dvc(project, "repro")
    output = again.stdout + again.stderr
    assert "Running stage" not in output
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in output
    assert "Data and pipelines are up to date." in output


@pytest.mark.slow
def test_metrics_and_plots_show(first_repro, project):
    metrics = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    data = metrics[""]["data"] if "" in metrics else next(iter(metrics.values()))["data"]
    assert data["metrics/eval.json"]["data"]["BLEU"] >= 0
    assert data["metrics/train_summary.json"]["data"]["steps"] == 8
    plots = json.loads(dvc(project, "plots", "show", "--json").stdout)
    rendered = plots.get("data", plots)
    train_points = rendered["plots/train_loss.csv"][0]["content"]["data"]["values"]
    assert [int(point["step"]) for point in train_points] == [4, 8]
    assert "plots/valid_loss.csv" in rendered


@pytest.mark.slow
def test_evaluation_reached_the_finetune_mlflow_run(first_repro, project):
    from mlflow import MlflowClient

    record = json.loads((project / "models/mlflow_run.json").read_text())
    assert record["tracking_uri"] == f"sqlite:///{project / 'mlflow.db'}"
    run = MlflowClient(tracking_uri=record["tracking_uri"]).get_run(record["run_id"])
    scores = json.loads((project / "metrics/eval.json").read_text())
    assert {name: run.data.metrics[f"eval/{name}"] for name in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")} == pytest.approx(
        {name: scores[name] for name in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")})
    assert (project / "mlruns").is_dir() and not any((project / "models/finetune").rglob("MLmodel"))  # artifacts outside DVC outs


@pytest.mark.slow
def test_experiment_reruns_only_what_depends_on_the_parameter(first_repro, project):
    result = dvc(project, "exp", "run", "-S", "finetune.lora_dim=8", "--name", "rank8")
    output = result.stdout + result.stderr
    for stage in ("finetune", "decode", "evaluate"):
        assert f"Running stage '{stage}'" in output, stage
    for stage in ("sample", "prepare", "encode", "base"):
        assert f"Running stage '{stage}'" not in output, stage
    assert json.loads((project / "models/finetune/adapter_config.json").read_text())["r"] == 8
    experiments = json.loads(dvc(project, "exp", "show", "--json").stdout)
    names = {exp.get("name") for baseline in experiments for exp in (baseline.get("experiments") or [])}
    assert "rank8" in names, experiments
    record = json.loads((project / "models/mlflow_run.json").read_text())
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=record["tracking_uri"]).get_run(record["run_id"])
    assert run.data.params["finetune.lora_dim"] == "8" and "eval/BLEU" in run.data.metrics


# ----------------------------------------------------------------------------- fast: params files


def test_e2e_profile_is_a_drop_in_params_file_with_the_paper_recipe():
    """params/e2e-gpt2-md.yaml replaces params.yaml (same sections and keys) and holds REFERENCE.md 13.3."""
    from pipelines.finetune import trainer_argv
    from steps.train_config import parse_config

    default = yaml.safe_load((REPO / "params.yaml").read_text())
    profile = yaml.safe_load((REPO / "params/e2e-gpt2-md.yaml").read_text())
    assert {k: sorted(v) for k, v in profile.items()} == {k: sorted(v) for k, v in default.items()}
    args = parse_config(trainer_argv(profile["finetune"]))
    recipe = {"model_card": "gpt2.md", "train_batch_size": 8, "grad_acc": 1, "seq_len": 512, "lr": 2e-4, "scheduler": "linear",
              "warmup_step": 500, "max_epoch": 5, "max_step": None, "correct_bias": True, "adam_beta1": 0.9, "adam_beta2": 0.999,
              "adam_epislon": 1e-6, "weight_decay": 0.01, "clip": 0.0, "lora_dim": 4, "lora_alpha": 32, "lora_dropout": 0.1,
              "lora_targets": "q,v", "label_smooth": 0.1, "obj": "clm", "random_seed": 110}
    assert {key: getattr(args, key) for key in recipe} == recipe
    decode = {"beam": 10, "length_penalty": 0.8, "no_repeat_ngram_size": 4, "repetition_penalty": 1.0, "eos_token_id": 628, "eval_len": 64}
    assert {key: profile["decode"][key] for key in decode} == decode
    assert profile["prepare"]["dataset"] == "e2e" and profile["flow"]["torchrun"]["nproc_per_node"] == 1


def test_default_params_drive_every_stage_command():
    """Each ${section.key} in dvc.yaml exists in params.yaml, and every trainer flag is one steps.train accepts."""
    import re

    from pipelines.finetune import trainer_argv
    from steps.train_config import parse_config

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = json.dumps(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])  # without the comments
    for ref in re.findall(r"\$\{([^}]+)\}", stages):
        node = params
        for part in ref.split("."):
            assert isinstance(node, dict) and part in node, f"dvc.yaml uses ${{{ref}}} but params.yaml lacks it"
            node = node[part]
    parse_config(trainer_argv(params["finetune"]))  # raises SystemExit on an unknown flag


@pytest.mark.parametrize("dataset, ref_file, no_meteor", [("e2e", "outputs/refs.txt", False), ("webnlg", "outputs/refs", True)])
def test_dataset_and_meteor_settings_reach_the_stage_commands(tmp_path, monkeypatch, dataset, ref_file, no_meteor):
    """DVC itself renders the decode and evaluate commands from params.yaml (the README's switches)."""
    from dvc.repo import Repo

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["dataset"] = params["decode"]["ref_type"] = dataset
    params["decode"]["ref_file"], params["evaluate"]["no_meteor"] = ref_file, no_meteor
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    Repo.init(str(tmp_path), no_scm=True)
    monkeypatch.chdir(tmp_path)  # DVC resolves stage names against the working directory
    repo = Repo(str(tmp_path))
    decode, evaluate = (repo.stage.collect(name)[0] for name in ("decode", "evaluate"))
    assert f"--ref_type {dataset} --output_ref_file {ref_file} " in decode.cmd
    assert evaluate.cmd.startswith(f"python -m steps.evaluate {ref_file} outputs/preds.txt --ref_type {dataset} ")
    assert ("--no_meteor" in evaluate.cmd.split()) == no_meteor
    assert "models/mlflow_run.json" in {dep.def_path for dep in evaluate.deps}  # scores go to the run finetune wrote
