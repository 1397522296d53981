"""steps.core.tracking against a real sqlite MLflow store (no mocks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from steps.core.common import InputError
from steps.core.tracking import EVAL_TABLE_ARTIFACT, RunLogger, log_predictions_table, write_run_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, object, str]:
    """One sqlite store per module: creating it runs MLflow's migrations (several seconds)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("tracking-test", artifact_location=(root / "artifacts").as_uri())
    return uri, client, experiment_id


def new_run(store) -> str:
    _, client, experiment_id = store
    return client.create_run(experiment_id).info.run_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_disabled_logger_is_a_no_op_that_never_imports_mlflow():
    code = (
        "import sys\n"
        "from steps.core.tracking import RunLogger\n"
        "for rank in (0, 1):\n"
        "    logger = RunLogger.from_env(rank)\n"
        "    logger.log_metrics({'train/loss': 1.0}, 1)\n"
        "    logger.log_artifacts('steps', 'checkpoints/step_1')\n"
        "    logger.close()\n"
        "    print(rank, logger.enabled)\n"
        "print('mlflow imported:', 'mlflow' in sys.modules)\n"
    )
    # No run id: disabled on every rank.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    out = run_python(code, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["0 False", "1 False", "mlflow imported: False"]
    # A run id: only rank 0 would log (rank 1 stays disabled). Point at an unused store and check rank 1 only.
    env["MLFLOW_RUN_ID"] = "0123456789abcdef"
    out = run_python(code.replace("(0, 1)", "(1,)"), env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["1 False", "mlflow imported: False"]


def test_metrics_and_checkpoints_reach_the_run_and_leave_it_running(store, tmp_path):
    uri, client, _ = store
    run_id = new_run(store)
    checkpoint = tmp_path / "checkpoints" / "step_10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text('{"step": 10}')

    logger = RunLogger(run_id, tracking_uri=uri, flush_seconds=0.2)
    started = time.perf_counter()
    for step in range(1, 201):
        logger.log_metrics({"train/loss": 10.0 / step, "train/lr": step * 1e-4}, step)
        if step == 10:
            logger.log_artifacts(checkpoint, "checkpoints/step_10")
            # The trainer may rewrite or prune its checkpoint right away; the upload must not care.
            (checkpoint / "adapter_config.json").write_text('{"step": "overwritten"}')
    enqueue_seconds = time.perf_counter() - started
    logger.close()

    # 400 synchronous sqlite writes would take 6-8 s; enqueueing must be far cheaper than one write each.
    assert enqueue_seconds < 0.5, enqueue_seconds
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 201))
    assert {m.step: m.value for m in history}[4] == pytest.approx(2.5)
    assert len(client.get_metric_history(run_id, "train/lr")) == 200
    files = [f.path for f in client.list_artifacts(run_id, "checkpoints/step_10")]
    assert files == ["checkpoints/step_10/adapter_config.json"]
    local = client.download_artifacts(run_id, "checkpoints/step_10/adapter_config.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == {"step": 10}
    # A rank must never finish the flow's run.
    assert client.get_run(run_id).info.status == "RUNNING"


def test_from_env_attaches_to_the_run_in_the_environment(store, monkeypatch):
    uri, client, _ = store
    run_id = new_run(store)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with RunLogger.from_env(0) as logger:
        assert logger.enabled
        logger.log_metrics({"valid/loss": 3.5}, 50)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "valid/loss")] == [(50, 3.5)]
    assert not RunLogger.from_env(1).enabled


def test_unreachable_store_warns_once_and_never_raises(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = f"http://127.0.0.1:{free_port()}"
    logger = RunLogger("0123456789abcdef", tracking_uri=dead, flush_seconds=0.05, close_timeout=3.0, max_backoff=0.2)
    started = time.perf_counter()
    for step in range(100):
        logger.log_metrics({"train/loss": 1.0}, step)
        if step % 20 == 0:
            time.sleep(0.05)  # let several flush attempts fail while "training" goes on
    logger.close()
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert elapsed < 15, elapsed
    assert err.count("warning: MLflow logging failed") == 1, err
    assert "gave up sending 100 metric points" in err or "did not finish" in err, err


def test_the_predictions_table_is_replaced_when_evaluate_reruns_and_no_score_is_logged_there(store, tmp_path):
    uri, client, experiment_id = store
    run_id = new_run(store)
    client.set_terminated(run_id)  # evaluate runs after the flow has finished its run
    run_file = tmp_path / "run.json"
    write_run_file(run_file, run_id=run_id, tracking_uri=uri, experiment_id=experiment_id, fingerprint="x")
    table = pd.DataFrame({"context": ["name[A]", "name[B]"], "prediction": ["A is.", "B is."]})

    log_predictions_table(str(run_file), table)
    log_predictions_table(str(run_file), table)  # evaluate reran

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {}  # the scores are the register stage's to log, once
    local = client.download_artifacts(run_id, EVAL_TABLE_ARTIFACT, str(tmp_path / "dl"))
    logged = json.loads(Path(local).read_text())
    assert logged["columns"] == ["context", "prediction"]
    assert logged["data"] == [["name[A]", "A is."], ["name[B]", "B is."]]  # replaced, not appended
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": EVAL_TABLE_ARTIFACT, "type": "table"}]


def test_logging_the_table_without_a_run_file_only_warns(tmp_path, capsys):
    log_predictions_table(str(tmp_path / "absent.json"), pd.DataFrame({"a": [1]}))
    assert "no MLflow run file" in capsys.readouterr().err


def test_logging_the_table_rejects_a_file_that_is_not_a_run_file(tmp_path):
    bad = tmp_path / "run.json"
    bad.write_text('{"run_id": "abc"}')
    with pytest.raises(InputError, match="lacks tracking_uri, experiment_id"):
        log_predictions_table(str(bad), pd.DataFrame({"a": [1]}))
    bad.write_text("not json")
    with pytest.raises(InputError, match="not a JSON run file"):
        log_predictions_table(str(bad), pd.DataFrame({"a": [1]}))


def test_a_copied_project_never_writes_into_the_original_projects_run(store, tmp_path, capsys, monkeypatch):
    """`cp -r project copy && cd copy && dvc repro` used to add the copy's scores to the original's MLflow run:
    the run file names the project it was written for, and evaluate in another project only warns."""
    uri, client, experiment_id = store
    run_id = new_run(store)
    original, copy = tmp_path / "project", tmp_path / "copy"
    for project in (original, copy):
        (project / "models").mkdir(parents=True)
        write_run_file(project / "models/run.json", run_id=run_id, tracking_uri=uri, experiment_id=experiment_id,
                       fingerprint="x", project_dir=str(original))
    monkeypatch.chdir(copy)
    log_predictions_table("models/run.json", pd.DataFrame({"a": [1]}))
    assert f"was written for the project at {original}, not this one" in capsys.readouterr().err
    assert not client.list_artifacts(run_id, "eval")
    monkeypatch.chdir(original)
    log_predictions_table("models/run.json", pd.DataFrame({"a": [1]}))
    assert [f.path for f in client.list_artifacts(run_id, "eval")] == [EVAL_TABLE_ARTIFACT]
