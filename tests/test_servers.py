"""Scheduled deployments against a real `prefect server` on 127.0.0.1 (own PREFECT_HOME, free port).

Two routes to the same deployment of pipelines.scheduled.pipeline (`dvc repro` in a project):
- `python -m pipelines.schedule`: the deployment is created with the cron from params, a run is
  triggered and completes (it reproduces a small DVC project), the schedule reads back from the API;
- prefect.yaml: `prefect deploy --all` registers the same schedule from params.yaml and a
  `prefect worker --run-once` executes a triggered run.
The MLflow server test lives in test_finetune_flow.py, next to the training run it queries.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TEST_CRON = "17 4 * * 1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{log.read_text()[-4000:]}" if log and log.exists() else ""))


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGINT (a Prefect worker/runner may need the second signal), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGINT, 10)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """A `prefect server` and the environment its clients need."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING_URI"))}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    })
    log = home / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-ui", "--analytics-off"], env=env, stdout=out, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as response:
                return response.read().strip() == b"true"
        except OSError:
            return False

    try:
        wait_until(healthy, 180, "prefect server health", server, log)
        yield env
    finally:
        stop(server)


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory) -> Path:
    """A small DVC project: one stage that writes its params into a file."""
    root = tmp_path_factory.mktemp("scheduled") / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"count": {
        "cmd": "python -c \"import yaml; n = yaml.safe_load(open('params.yaml'))['count']['n']; open('out.txt', 'w').write(str(n * 2))\"",
        "params": ["count"], "outs": ["out.txt"]}}}))
    (root / "params.yaml").write_text(yaml.safe_dump({
        "count": {"n": 21},
        "schedule": {"deployment": "test-repro", "cron": TEST_CRON, "timezone": "Europe/Paris", "targets": [], "wait_for_lock": False},
    }))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    return root


def read_deployment(env: dict[str, str], name: str):
    """The deployment as the API stores it (None while it does not exist), through Prefect's client."""
    code = (
        "import json, sys\n"
        "from prefect import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    try:\n"
        f"        d = c.read_deployment_by_name({name!r})\n"
        "    except Exception:\n"
        "        print('null'); sys.exit(0)\n"
        "    print(json.dumps({'cron': [s.schedule.cron for s in d.schedules], 'timezone': [s.schedule.timezone for s in d.schedules],\n"
        "        'active': [s.active for s in d.schedules], 'limit': d.global_concurrency_limit.limit if d.global_concurrency_limit else None,\n"
        "        'strategy': str(d.concurrency_options.collision_strategy.value) if d.concurrency_options else None,\n"
        "        'parameters': d.parameters, 'work_pool': d.work_pool_name, 'id': str(d.id)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def trigger(env: dict[str, str], name: str, parameters: dict | None = None) -> str:
    """Create a run of the deployment now (returns its id without waiting)."""
    code = (
        "from prefect.deployments import run_deployment\n"
        f"print(run_deployment({name!r}, parameters={parameters!r}, timeout=0).id)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout.strip().splitlines()[-1]


def wait_for_run(env: dict[str, str], flow_run_id: str, timeout: float = 300) -> dict:
    """The run's final state type and its log lines (as stored by the API)."""
    code = (
        "import json, time\n"
        "from prefect import get_client\n"
        "from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId\n"
        "with get_client(sync_client=True) as c:\n"
        f"    deadline = time.monotonic() + {timeout}\n"
        f"    while not (run := c.read_flow_run({flow_run_id!r})).state.is_final() and time.monotonic() < deadline:\n"
        "        time.sleep(1)\n"
        "    time.sleep(2)  # the runner ships the last log lines in batches\n"
        "    logs = [l.message for l in c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))]\n"
        "print(json.dumps({'state': run.state.type.value, 'logs': logs}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout + 60)
    assert out.returncode == 0, out.stderr[-4000:]
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def test_served_deployment_has_the_params_cron_and_runs_dvc_repro(prefect_env, dvc_project, tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "pipelines.schedule", "--params", str(dvc_project / "params.yaml"),
                                  "--project_dir", str(dvc_project)], cwd=REPO, env=prefect_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deployment = wait_until(lambda: read_deployment(prefect_env, "pipeline/test-repro"), 120, "the served deployment", serve, log)
        assert deployment["cron"] == [TEST_CRON] and deployment["timezone"] == ["Europe/Paris"] and deployment["active"] == [True]
        assert deployment["limit"] == 1 and deployment["strategy"] == "CANCEL_NEW"
        assert deployment["parameters"] == {"project_dir": str(dvc_project)}

        first = wait_for_run(prefect_env, trigger(prefect_env, "pipeline/test-repro"))
        assert first["state"] == "COMPLETED", first
        assert (dvc_project / "out.txt").read_text() == "42"
        assert any("Running stage 'count'" in line for line in first["logs"]), first["logs"]  # DVC's output streamed to the run's log
        second = wait_for_run(prefect_env, trigger(prefect_env, "pipeline/test-repro"))
        assert second["state"] == "COMPLETED"
        assert any("nothing changed" in line for line in second["logs"]), second["logs"]
    finally:
        stop(serve)


def test_prefect_yaml_deploys_the_params_schedule_and_a_worker_runs_it(prefect_env, dvc_project, tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())["schedule"]
    subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "lora-nlg", "--type", "process"], cwd=REPO,
                   env=prefect_env, check=True, capture_output=True, timeout=120)
    deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=REPO, env=prefect_env,
                            capture_output=True, text=True, timeout=180)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    name = f"pipeline/{params['deployment']}"
    deployment = read_deployment(prefect_env, name)
    assert deployment["cron"] == [params["cron"]] and deployment["timezone"] == [params["timezone"]]
    assert deployment["limit"] == 1 and deployment["work_pool"] == "lora-nlg"
    assert deployment["parameters"] == {"project_dir": str(REPO)}

    # Run it once through a worker, on the small project (never on this checkout).
    (dvc_project / "params.yaml").write_text((dvc_project / "params.yaml").read_text().replace("n: 21", "n: 50"))
    flow_run_id = trigger(prefect_env, name, {"project_dir": str(dvc_project)})
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "lora-nlg", "--run-once"], cwd=REPO,
                                  env=prefect_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        result = wait_for_run(prefect_env, flow_run_id)
    finally:
        stop(worker)
    assert result["state"] == "COMPLETED", (result, log.read_text()[-3000:])
    assert (dvc_project / "out.txt").read_text() == "100"
