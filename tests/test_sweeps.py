"""A sweep as a user types it: experiments queued with `dvc exp run --queue -S ...`, run by `dvc queue start -j 2`.

DVC runs queued experiments in temporary copies of the project (`.dvc/tmp/exps/...`) and deletes them afterwards;
each experiment's MLflow run and registered version must land in the project's own store, and two registers
finishing at once must leave one champion, the best. Real DVC queue, real flows, a real SQLite store."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
import yaml
from test_dvc_pipeline import dvc, git, tiny_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
SWEEP = {"r2": ["-S", "finetune.lora_dim=2"], "r8": ["-S", "finetune.lora_dim=8"], "lr": ["-S", "finetune.lr=0.02"]}


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    project = tiny_project(tmp_path_factory.mktemp("sweep") / "project")
    dvc(project, "repro")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "baseline")
    for name, sets in SWEEP.items():
        dvc(project, "exp", "run", "--queue", *sets, "--name", name)
    dvc(project, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:  # `queue start` returns at once; the workers run in the background
        status = dvc(project, "queue", "status").stdout
        if all(f"{name} " in status for name in SWEEP) and not any(word in status for word in ("Running", "Queued")):
            break
        time.sleep(5)
    run_file = json.loads((project / "models/mlflow_run.json").read_text())
    return {"project": project, "status": status, "store": run_file["tracking_uri"], "rows": dvc(project, "exp", "show", "--json").stdout}


def test_every_queued_experiment_succeeds_and_shows_its_metrics(swept):
    status = swept["status"]
    for name in SWEEP:
        line = next(line for line in status.splitlines() if f" {name} " in f" {line} ")
        assert "Success" in line, status
    shown = json.loads(swept["rows"])
    experiments = {rev.get("name") or exp.get("name"): rev for base in shown for exp in base.get("experiments") or []
                   for rev in exp.get("revs") or []}
    assert set(SWEEP) <= set(experiments), sorted(experiments)
    for name in SWEEP:
        scores = experiments[name]["data"]["metrics"]["metrics/scores.json"]["data"]
        assert isinstance(scores["BLEU"], float) and isinstance(scores["SER"], float), (name, scores)


def test_every_queued_run_is_in_the_projects_store_finished(swept):
    project = swept["project"]
    assert swept["store"] == f"sqlite:///{project / 'mlflow.db'}"
    with sqlite3.connect(project / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid, status FROM runs").fetchall()
        params = dict(db.execute("SELECT run_uuid, value FROM params WHERE key = 'finetune.lora_dim'").fetchall())
        rates = dict(db.execute("SELECT run_uuid, value FROM params WHERE key = 'finetune.lr'").fetchall())
    assert len(runs) == 1 + len(SWEEP) and {status for _, status in runs} == {"FINISHED"}, runs
    assert sorted((params[run], rates[run]) for run, _ in runs) == [("2", "0.01"), ("4", "0.01"), ("4", "0.02"), ("8", "0.01")]
    assert not list((project / ".dvc/tmp").rglob("mlflow.db"))  # no store was left in (or lost with) a temporary copy


def test_the_sweep_registers_every_adapter_and_one_champion_the_best(swept):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=swept["store"], registry_uri=swept["store"])
    model = yaml.safe_load((swept["project"] / "params.yaml").read_text())["register"]["model"]
    versions = client.search_model_versions(f"name='{model}'")
    assert len(versions) == 1 + len(SWEEP)
    champion = client.get_model_version_by_alias(model, "champion")  # an alias names one version
    metric = yaml.safe_load((swept["project"] / "params.yaml").read_text())["register"]["metric"]
    assert metric == "BLEU"  # higher is better
    assert float(champion.tags[metric]) == max(float(v.tags[metric]) for v in versions), [(v.version, v.tags[metric]) for v in versions]
    newest = max(int(v.version) for v in versions)
    assert int(client.get_model_version_by_alias(model, "candidate").version) == newest
