"""pipelines/mlflow_run.py: when the finetune stage resumes an MLflow run and when it starts a new one."""

from __future__ import annotations


def test_resume_only_an_unfinished_run_with_the_same_fingerprint(tmp_path):
    from mlflow import MlflowClient

    from pipelines.finetune_config import FinetuneConfig
    from pipelines.mlflow_run import resumable_run
    from steps.core.tracking import write_run_file

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("resume", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    cfg = FinetuneConfig(tmp_path, tmp_path / "params.yaml", {}, {}, {}, {"run_file": "run.json"}, {}, uri)
    write_run_file(tmp_path / "run.json", run_id=run_id, tracking_uri=uri, experiment_id=experiment_id, fingerprint="abc")

    client.set_terminated(run_id, status="FAILED")  # a crashed flow
    assert resumable_run(client, cfg, "abc") == run_id
    assert resumable_run(client, cfg, "other settings") is None
    client.set_terminated(run_id, status="FINISHED")  # a completed flow is never reopened
    assert resumable_run(client, cfg, "abc") is None
    (tmp_path / "run.json").write_text("not json")
    assert resumable_run(client, cfg, "abc") is None
