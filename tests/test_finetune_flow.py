"""The finetune flow as a real Prefect flow run: torchrun, MLflow store, retries; then the stages after it on its
adapter (decode, evaluate, register) and the registered pyfunc model, loaded and served.

The fast tests at the end check the pieces the flow is built from (command lines, resume decision).

One tiny training (gpt2.tiny, 12 updates) is shared by most assertions; the fault-injection test runs
the same configuration again, kills the trainer from outside after its first checkpoint, and compares
the final adapter with the uninterrupted one. An `mlflow server` then answers REST calls about the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "finetune": {"max_step": 12, "warmup_step": 2, "log_interval": 4, "eval_interval": 6, "save_interval": 4, "train_batch_size": 4,
                 "valid_batch_size": 8},
    "flow": {"retries": 2, "retry_delay_seconds": 0},
    "decode": {"beam": 2, "eval_len": 8, "batch_size": 4},
    "tracking": {"experiment": "flow-test"},
    "register": {"model": "flow-test-adapter"},
}


def make_project(root: Path) -> None:
    """Tiny real inputs through the real stages: sample -> prepare -> encode, and a random gpt2.tiny base."""
    from steps import encode, make_base, prepare, sample_data

    assert sample_data.main(["--out_dir", str(root / "data/raw/sample"), "--train_mrs", "40", "--valid_mrs", "4", "--test_mrs", "3"]) == 0
    assert prepare.main(["--dataset", "e2e", "--raw_dir", str(root / "data/raw/sample"), "--out_dir", str(root / "data/formatted")]) == 0
    assert encode.main(["--input_dir", str(root / "data/formatted"), "--output_dir", str(root / "data/encoded"),
                        "--add_bos", "--add_eos"]) == 0
    assert make_base.main(["--model_card", "gpt2.tiny", "--seed", "0", "--output", str(root / "data/base/standin.safetensors")]) == 0


def write_params(root: Path, name: str, work_dir: str, run_file: str) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["finetune"]["work_dir"] = work_dir
    params["tracking"]["run_file"] = run_file
    params["tracking"]["tracking_uri"] = "sqlite:///mlflow.db"  # relative on purpose: the flow must make it absolute
    params["finetune"].update({"plots_dir": name, "summary_file": f"{name}/train_summary.json", "machine_file": f"{name}/machine.json"})
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prefect_api():
    """A throw-away Prefect API (temporary sqlite DB) for the in-process flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_api) -> Path:
    root = tmp_path_factory.mktemp("flow-project")
    make_project(root)
    return root


@pytest.fixture(scope="module")
def first_run(project, monkeypatch_module):
    """One complete, uninterrupted flow run, and what the store holds right after it."""
    from mlflow import MlflowClient

    from pipelines.finetune_config import load_config
    from pipelines.finetune_flow import finetune

    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    # One thread per trainer, for this module's flows: with more, the math library sizes its thread pool by the
    # machine's load, and the kill test's bitwise comparison with this run failed on a busy machine (1e-4 in bf16).
    monkeypatch_module.setenv("OMP_NUM_THREADS", "1")
    params_file = write_params(project, "first", "models/first", "models/first_run.json")
    state = finetune(load_config(params_file, project), return_state=True)
    result = state.result() if state.is_completed() else None
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    registered = [m.name for m in client.search_registered_models()]
    run = client.get_run(result["run_id"]) if result else None
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id]) if run else []
    return {"state": state, "params_file": params_file, "result": result, "registered_after_flow": registered,
            "logged_models_after_flow": logged}


@pytest.fixture(scope="module")
def registered(first_run, project) -> dict:
    """The stages after the flow on its adapter, through their real code: decode the test set, evaluate it, register.
    Returns metrics/register.json."""
    from pipelines import register
    from steps import decode, evaluate

    assert first_run["result"], first_run["state"]
    out = project / "outputs"
    assert decode.main(["--data", str(project / "data/encoded/test.jsonl"), "--input_file", str(project / "data/formatted/test.jsonl"),
                        "--adapter", str(project / "models/first"), "--init_checkpoint", str(project / "data/base/standin.safetensors"),
                        "--beam", "2", "--eval_len", "8", "--batch_size", "4", "--output_ref_file", str(out / "refs.txt"),
                        "--work_dir", str(out)]) == 0
    scores = project / "first/eval.json"
    assert evaluate.main(["--examples", str(out / "examples.jsonl"), "--no_meteor", "--json", str(scores)]) == 0
    report = project / "first/register.json"
    assert register.main(["--params", str(first_run["params_file"]), "--project_dir", str(project), "--scores", str(scores),
                          "--output", str(report)]) == 0
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def client(project):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


@pytest.mark.slow
def test_flow_run_completes_and_writes_its_outputs(first_run, project):
    assert first_run["state"].is_completed(), first_run["state"]
    result = first_run["result"]
    assert result["summary"]["steps"] == 12
    assert (project / "models/first/adapter.safetensors").is_file()
    record = json.loads((project / "models/first_run.json").read_text())
    assert record["run_id"] == result["run_id"]
    assert record["tracking_uri"] == f"sqlite:///{project / 'mlflow.db'}"  # made absolute for the ranks
    train_rows = (project / "first/train_loss.csv").read_text().splitlines()
    assert train_rows[0] == "step,loss,nll" and [r.split(",")[0] for r in train_rows[1:]] == ["4", "8", "12"]
    assert [r.split(",")[0] for r in (project / "first/valid_loss.csv").read_text().splitlines()[1:]] == ["6", "12"]
    assert json.loads((project / "models/first/summary.json").read_text())["steps"] == 12
    assert set(json.loads((project / "first/train_summary.json").read_text())) == {"best_valid_loss", "final_train_loss"}
    assert (project / "first/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_mlflow_run_holds_params_metrics_and_checkpoints(first_run, client):
    from pipelines.settings import flatten, load_params

    run = client.get_run(first_run["result"]["run_id"])
    assert run.info.status == "FINISHED"
    expected = {key: str(value) for key, value in flatten(load_params(first_run["params_file"])).items()}
    assert {k: run.data.params[k] for k in expected} == expected
    for key in ("resolved.git_commit", "resolved.world_size", "resolved.max_step", "data.md5.train_data", "data.md5.valid_data",
                "data.md5.init_checkpoint"):
        assert key in run.data.params
    assert run.data.params["resolved.max_step"] == "12" and run.data.params["resolved.world_size"] == "1"
    train_loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in train_loss) == [4, 8, 12]  # one point per log interval
    logged = (first_run["params_file"].parent / "first/train_loss.csv").read_text().splitlines()[1:]
    assert [round(m.value, 6) for m in sorted(train_loss, key=lambda m: m.step)] == [round(float(r.split(",")[1]), 6) for r in logged]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "valid/loss")) == [6, 12]
    for name in ("train/lr", "train/nll", "train/ppl", "train/tokens_per_s", "train/ms_per_update", "valid/ppl"):
        assert name in run.data.metrics
    checkpoints = [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert {"checkpoints/step_4", "checkpoints/step_8"} <= set(checkpoints)
    assert sorted(f.path for f in client.list_artifacts(run.info.run_id, "checkpoints/step_4")) == [
        "checkpoints/step_4/adapter.safetensors", "checkpoints/step_4/adapter_config.json"]
    assert run.data.tags["prefect.flow_run_id"] == str(first_run["state"].state_details.flow_run_id)


@pytest.mark.slow
def test_the_flow_ends_its_run_without_logging_or_registering_a_model(first_run, client):
    """Registration is the register stage's, after the evaluation: the flow leaves no model behind."""
    assert first_run["registered_after_flow"] == [] and first_run["logged_models_after_flow"] == []
    assert client.get_run(first_run["result"]["run_id"]).info.status == "FINISHED"
    assert not {"model", "version", "alias"} & set(first_run["result"])


@pytest.mark.slow
def test_register_stage_makes_the_first_version_candidate_and_champion(first_run, registered, client):
    for alias in ("candidate", "champion"):
        version = client.get_model_version_by_alias("flow-test-adapter", alias)
        assert version.run_id == first_run["result"]["run_id"] and int(version.version) == registered["version"] == 1
    assert registered["aliases_moved"] == "@candidate @champion"
    scores = json.loads((first_run["params_file"].parent / "first/eval.json").read_text())
    assert float(version.tags["BLEU"]) == pytest.approx(scores["BLEU"], rel=1e-5)


def use_store(monkeypatch, uri: str) -> None:
    """MLflow's fluent API on `uri` for one test: through its environment variables (undone after the test), and a
    copy of sys.path (loading a model adds its code directory)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.mark.slow
def test_pyfunc_model_loads_by_alias_and_generates(registered, project, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    import steps.decode as decode
    from steps.decoding.beam import BeamConfig

    use_store(monkeypatch, f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/flow-test-adapter@candidate")
    mrs = ["name[The Eagle], eatType[coffee shop], area[riverside]", "name[Zizzi], food[Italian]",
           "name[The Eagle], eatType[coffee shop], area[riverside]"]
    texts = model.predict(pd.DataFrame({"meaning_representation": mrs}))
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert texts[0] == texts[2]
    # A frame without the column: the answer names the expected column and the ones sent (MLflow drops columns a
    # signature does not name, so the column is required in the signature).
    with pytest.raises(Exception, match=r"missing inputs \['meaning_representation'\].*extra inputs: \['mr'\]"):
        model.predict(pd.DataFrame({"mr": mrs[:2]}))
    with pytest.raises(Exception, match="empty value in row 1"):
        model.predict(pd.DataFrame({"meaning_representation": [mrs[0], " "]}))
    # Independent reference: the same adapter and base decoded directly with the settings stored in the model.
    config = model.metadata.flavors["python_function"]["config"]
    assert config["beam"] == 2 and config["eval_len"] == 8 and config["eos_token_ids"] == [628, 50256]
    direct = decode.load_for_inference(adapter=str(project / "models/first"), init_checkpoint=str(project / "data/base/standin.safetensors"))
    search = BeamConfig.from_mapping(config)
    query = {key: config[key] for key in ("seq_len", "batch_size", "add_bos")}
    assert texts[:2] == decode.generate_texts(direct, mrs[:2], search, **query)
    # The logged model carries the adapter and the code, not the base weights.
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/flow-test-adapter@candidate", dst_path=str(tmp_path)))
    names = {p.name for p in local.rglob("*")}
    assert {"adapter.safetensors", "adapter_config.json", "pyfunc_model.py", "decode.py"} <= names
    assert "model.safetensors" not in names
    assert sum(p.stat().st_size for p in local.rglob("*") if p.is_file()) < 2_000_000


@pytest.mark.slow
def test_pyfunc_model_needs_the_right_base(registered, project, tmp_path, monkeypatch):
    import mlflow

    from steps.core.common import InputError

    use_store(monkeypatch, f"sqlite:///{project / 'mlflow.db'}")
    other_base = tmp_path / "other.safetensors"
    from steps import make_base

    assert make_base.main(["--model_card", "gpt2.tiny", "--seed", "1", "--output", str(other_base)]) == 0
    with pytest.raises(InputError, match="sha256"):
        mlflow.pyfunc.load_model("models:/flow-test-adapter@candidate", model_config={"init_checkpoint": str(other_base)})
    monkeypatch.setenv("LORA_NLG_BASE_CHECKPOINT", str(tmp_path / "missing.safetensors"))
    with pytest.raises(InputError, match="LORA_NLG_BASE_CHECKPOINT"):
        mlflow.pyfunc.load_model("models:/flow-test-adapter@candidate")


# ----------------------------------------------------------------------------- fault injection


def processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, command line, working directory), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            table[int(entry.name)] = (ppid, cmdline, os.readlink(entry / "cwd"))
    return table


def kill_trainer_after_first_checkpoint(project: Path, work_dir: str, killed: list[int], timeout: float = 300) -> None:
    """From outside the flow: once a checkpoint and its resume state exist, SIGKILL the trainer processes (the flow
    starts them directly on one node, or through torchrun on several)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (project / work_dir / "checkpoints/step_4/adapter.safetensors").is_file() and (project / work_dir / "resume/state.pt").is_file():
            ranks = [pid for pid, (_, cmd, cwd) in processes().items()
                     if "-m steps.train" in cmd and f"--work_dir {work_dir}" in cmd and cwd == str(project)]
            for pid in ranks:
                os.kill(pid, signal.SIGKILL)
            killed.extend(ranks)
            if ranks:
                return
        time.sleep(0.05)


@pytest.mark.slow
def test_a_run_the_trainer_refuses_exits_2_at_once_and_keeps_the_previous_adapter(first_run, project, capsys):
    """A LoRA rank above the model width passes the params check (the card's width is the trainer's to know): the
    trainer refuses it (status.json says bad_input), the flow does not retry, exits 2, and the last good outputs
    are back in the work dir."""
    from pipelines.finetune import main

    adapter = project / "models/first/adapter.safetensors"
    before = adapter.read_bytes()
    started = time.monotonic()
    code = main(["--params", str(first_run["params_file"]), "--project_dir", str(project), "--set", "finetune.lora_dim=100000",
                 "--set", "flow.retry_delay_seconds=30"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--lora_dim 100000 exceeds the model width" in err
    assert time.monotonic() - started < 30 + 60  # no retry (its delay alone would be 30 s per retry)
    assert adapter.read_bytes() == before
    assert (project / "models/first/summary.json").is_file() and not (project / "models/.first.previous").exists()


@pytest.mark.slow
def test_killed_trainer_is_retried_resumes_and_matches_the_uninterrupted_run(first_run, project):
    import torch
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from safetensors.torch import load_file

    from pipelines.finetune_config import load_config
    from pipelines.finetune_flow import finetune

    params_file = write_params(project, "killed", "models/killed", "models/killed_run.json")
    killed: list[int] = []
    watcher = threading.Thread(target=kill_trainer_after_first_checkpoint, args=(project, "models/killed", killed), daemon=True)
    watcher.start()
    state = finetune(load_config(params_file, project), return_state=True)
    watcher.join(5)
    assert killed, "the trainer was never killed (no checkpoint seen)"
    assert state.is_completed(), state

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        train_runs = [t for t in task_runs if t.name.startswith("train-")]
        assert len(train_runs) == 1 and train_runs[0].run_count == 2  # failed once, retried once
        deadline, messages = time.monotonic() + 30, []
        while time.monotonic() < deadline and not any("resumed from" in m for m in messages):
            messages = [log.message for log in prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
            time.sleep(1)
    assert any("resumed from" in m for m in messages), "the retry did not resume from the checkpoint"
    assert any("trainer exited with status -9" in m for m in messages)  # the kill, as the retried failure, in the flow's logs

    final = load_file(str(project / "models/killed/adapter.safetensors"))
    reference = load_file(str(project / "models/first/adapter.safetensors"))
    assert final.keys() == reference.keys()
    for name in reference:
        assert torch.equal(final[name], reference[name]), name


# ----------------------------------------------------------------------------- MLflow server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def mlflow_server(project, first_run, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=project, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.read().strip() == b"OK":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_mlflow_server_answers_rest_calls_about_the_run(mlflow_server, first_run, registered, client):
    run_id = first_run["result"]["run_id"]
    history = get_json(f"{mlflow_server}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=train/loss")
    assert sorted(int(m["step"]) for m in history["metrics"]) == [4, 8, 12]
    listing = get_json(f"{mlflow_server}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=checkpoints")
    assert {"checkpoints/step_4", "checkpoints/step_8"} <= {f["path"] for f in listing["files"]}
    version = get_json(f"{mlflow_server}/api/2.0/mlflow/model-versions/get?name=flow-test-adapter&version={registered['version']}")
    assert version["model_version"]["run_id"] == run_id
    tags = {tag["key"]: tag["value"] for tag in version["model_version"]["tags"]}  # what the registry page lists per version
    assert {"BLEU", "NIST", "ROUGE_L", "CIDEr", "SER", "test_data_sha256", "base_sha256", "run_id"} <= set(tags)
    champion = get_json(f"{mlflow_server}/api/2.0/mlflow/registered-models/alias?name=flow-test-adapter&alias=champion")
    assert champion["model_version"]["version"] == str(registered["version"])
    alias = get_json(f"{mlflow_server}/api/2.0/mlflow/registered-models/alias?name=flow-test-adapter&alias=candidate")
    assert alias["model_version"]["run_id"] == client.get_model_version_by_alias("flow-test-adapter", "candidate").run_id
    assert "candidate" in [a["alias"] for a in get_json(f"{mlflow_server}/api/2.0/mlflow/registered-models/get?name=flow-test-adapter")
                           ["registered_model"].get("aliases", [])]
    run = get_json(f"{mlflow_server}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    assert run["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in run["data"]["params"]}["finetune.lora_dim"] == "4"


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.mark.slow
def test_the_registered_model_serves_over_http_and_answers_bad_requests_with_400(registered, project, tmp_path):
    """The real `mlflow models serve` on loopback: texts equal the same model loaded in process, decoding options
    pass as params, a bad request gets HTTP 400 with what was expected, and the server keeps serving."""
    import mlflow
    import pandas as pd

    from pipelines.packaging import fluent_store
    from pipelines.shell import python_env  # the venv's bin first on PATH: MLflow starts `uvicorn` from it

    uri = f"sqlite:///{project / 'mlflow.db'}"
    mrs = ["name : The Eagle | Type : coffee shop | area : riverside", "name : Zizzi | food : Italian"]
    with fluent_store(uri):
        expected = mlflow.pyfunc.load_model("models:/flow-test-adapter@champion").predict(pd.DataFrame({"meaning_representation": mrs}))
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115  (open for the server's whole life)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/flow-test-adapter@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=python_env({"MLFLOW_TRACKING_URI": uri}), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{base}/ping", timeout=5).status == 200:
                    break
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        split = {"dataframe_split": {"columns": ["meaning_representation"], "data": [[m] for m in mrs]}}
        assert post_json(f"{base}/invocations", split) == (200, {"predictions": expected})
        records = {"dataframe_records": [{"meaning_representation": mrs[1]}], "params": {"beam": 1, "eval_len": 4}}
        status, body = post_json(f"{base}/invocations", records)
        assert status == 200 and len(body["predictions"]) == 1 and len(body["predictions"][0].split()) <= 4
        status, body = post_json(f"{base}/invocations", {"dataframe_split": {"columns": ["mr"], "data": [[mrs[0]]]}})
        assert status == 400 and "meaning_representation" in body["message"] and "mr" in body["message"]
        status, body = post_json(f"{base}/invocations", {"dataframe_records": [{"meaning_representation": " "}]})
        assert status == 400 and "empty value in row 0" in body["message"]
        status, body = post_json(f"{base}/invocations", {"dataframe_records": [{"meaning_representation": "name : X | " * 400}]})
        assert status == 400 and "this model takes at most" in body["message"]
        assert post_json(f"{base}/invocations", split) == (200, {"predictions": expected})  # still serving
    finally:
        server.terminate()
        server.wait(30)
        log.close()
