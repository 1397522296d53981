"""The how-tos work as written: docs/pipeline.md's "Scheduled runs" commands, typed into separate new shells.

Each documented command runs in its own `bash -c`, with the environment a user's new shell has after
`. .venv/bin/activate` (HOME, PATH with the venv first; no PREFECT_* variables) and the documented
`export PREFECT_API_URL=...` typed first, so nothing carries over between shells; the user's Prefect profile
(`~/.prefect/profiles.toml`) is checked to be left alone. What differs from typing them by hand, and why:
- HOME is a temporary directory (the profile and the server's database are the test's own);
- the port 4200 is replaced by a free one (another server may hold 4200 on a shared machine);
- the commands run in a small DVC project whose params.yaml has the checkout's `schedule:` section, so the documented
  deployment name `pipeline/nightly-repro` is used as is, but a triggered run reproduces that small project (one
  stage), not this checkout; PYTHONPATH names this checkout so `python -m pipelines.schedule` is its code;
- DO_NOT_TRACK=true and 2-second runner/worker polls (Prefect's default is 10 s), which change no behaviour tested.

Two earlier versions of the docs failed: exporting PREFECT_API_URL in the server's shell only (`prefect deployment
run` in another shell then started a temporary server on the same database, printed "database is locked" and worked
only by accident), then `prefect config set` (every later `dvc repro`, in any shell, needed the server). The test
checks that the documented commands are the ones it types, that no shell starts a temporary server, and that the
profile holds no API URL afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_servers import free_port, wait_for_run, wait_until

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "pipeline.md"
pytestmark = pytest.mark.slow

# The commands as docs/pipeline.md writes them, one shell each (the test checks that the doc holds each line).
CONFIGURE = "export PREFECT_API_URL=http://127.0.0.1:4200/api"  # first, in every shell of the how-to
SERVER = "prefect server start --host 127.0.0.1 --port 4200 --analytics-off"
SERVE = "python -m pipelines.schedule"
WORK_POOL = "prefect work-pool create lora-nlg --type process"
DEPLOY = "prefect --no-prompt deploy --all"
WORKER = "prefect worker start --pool lora-nlg"
RUN_NOW = "prefect deployment run pipeline/nightly-repro"
LIST = "prefect deployment ls"
NO_TEMPORARY_SERVER = ("Starting temporary server", "database is locked")


def scheduled_runs_section() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("## Scheduled runs")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_the_doc_holds_the_commands_this_test_types():
    section = scheduled_runs_section()
    missing = [command for command in (CONFIGURE, SERVER, SERVE, WORK_POOL, DEPLOY, WORKER, RUN_NOW, LIST) if command not in section]
    assert not missing, f"docs/pipeline.md 'Scheduled runs' no longer says {missing}; update the doc or this test"
    # Every shell knows where the server is, and the user's Prefect profile is left alone (plain `dvc repro` elsewhere
    # must not need this server).
    assert section.index(CONFIGURE) < section.index(SERVER) and "every shell" in section.split(CONFIGURE)[0]
    assert not any(line.strip().startswith("prefect config set") for line in section.splitlines())


class Shells:
    """New shells of one user: same HOME, same activated venv, nothing exported between them."""

    def __init__(self, home: Path, project: Path, port: int):
        self.project, self.port = project, port
        venv_bin = Path(sys.executable).parent
        self.env = {
            "HOME": str(home),
            "PATH": os.pathsep.join([str(venv_bin), "/usr/local/bin", "/usr/bin", "/bin"]),
            "VIRTUAL_ENV": str(venv_bin.parent),
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "COLUMNS": "200",
            "PYTHONPATH": str(REPO),
            "DO_NOT_TRACK": "true",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }
        self.started = time.monotonic()
        self.logs = home / "logs"
        self.logs.mkdir()

    def mark(self, what: str) -> None:
        print(f"{time.monotonic() - self.started:5.1f}s since the first shell: {what}")

    def typed(self, command: str) -> str:
        """The command as typed in a new shell of the how-to: the documented export first."""
        return f"{CONFIGURE}; {command}".replace("4200", str(self.port))

    @property
    def api_env(self) -> dict[str, str]:
        return {**self.env, "PREFECT_API_URL": f"http://127.0.0.1:{self.port}/api"}

    def run(self, command: str, timeout: float = 180) -> str:
        """Type one command in a new shell and wait for it; returns its output (stdout and stderr)."""
        started = time.monotonic()
        out = subprocess.run(["bash", "-c", self.typed(command)], cwd=self.project, env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=timeout)
        assert out.returncode == 0, f"{command}: exit status {out.returncode}\n{out.stdout[-4000:]}"
        assert not any(s in out.stdout for s in NO_TEMPORARY_SERVER), f"{command} started a temporary server:\n{out.stdout[-4000:]}"
        print(f"{time.monotonic() - started:5.1f}s  $ {command}")
        return out.stdout

    def start(self, command: str, name: str) -> tuple[subprocess.Popen, Path]:
        """Type a long-running command in a new shell (it keeps running, as in a terminal left open)."""
        log = self.logs / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", self.typed(command)], cwd=self.project, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log


def ctrl_c(proc: subprocess.Popen) -> None:
    """Ctrl-C in its terminal (to the process group), a second Ctrl-C if needed (a Prefect worker may wait), then kill."""
    for _ in range(2):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(15)
            return
        except subprocess.TimeoutExpired:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def small_project(tmp_path: Path) -> Path:
    """A one-stage DVC project whose params.yaml has the checkout's schedule (so the deployment is pipeline/nightly-repro)."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"count": {
        "cmd": "python -c \"import yaml; n = yaml.safe_load(open('params.yaml'))['count']['n']; open('out.txt', 'w').write(str(n * 2))\"",
        "params": ["count"], "outs": ["out.txt"]}}}))
    schedule = yaml.safe_load((REPO / "params.yaml").read_text())["schedule"]
    (root / "params.yaml").write_text(yaml.safe_dump({"count": {"n": 21}, "schedule": schedule}))
    # The work-pool route: prefect.yaml as in the checkout; its entrypoint pipelines/scheduled.py, from the project.
    (root / "prefect.yaml").write_text((REPO / "prefect.yaml").read_text())
    (root / "pipelines").symlink_to(REPO / "pipelines")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    return root


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as response:
            return response.read().strip() == b"true"
    except OSError:
        return False


def api_get(port: int, path: str) -> dict | None:
    """GET on the server's REST API; None for any error (404 while a deployment does not exist yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api{path}", timeout=10) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def flow_run_id(output: str) -> str:
    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, output
    return match.group(1)


def test_scheduled_runs_as_documented_each_command_in_a_new_shell(tmp_path, small_project):
    schedule = yaml.safe_load((REPO / "params.yaml").read_text())["schedule"]
    name = f"pipeline/{schedule['deployment']}"  # pipeline/nightly-repro, as the doc says
    (tmp_path / "home").mkdir()
    shells = Shells(tmp_path / "home", small_project, free_port())
    server, server_log = shells.start(SERVER, "server")  # shell 1
    try:
        wait_until(lambda: healthy(shells.port), 180, "the prefect server", server, server_log)
        shells.mark("server healthy")
        serve, serve_log = shells.start(SERVE, "serve")  # shell 2
        try:
            deployment = wait_until(lambda: api_get(shells.port, f"/deployments/name/{name}"), 180, "the served deployment", serve, serve_log)
            assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in deployment["schedules"]] == [
                (schedule["cron"], schedule["timezone"], True)], deployment["schedules"]
            assert name in shells.run(LIST)
            output = shells.run(RUN_NOW)  # shell 3
            run = wait_for_run(shells.api_env, flow_run_id(output))
            shells.mark(f"served run {run['state']}")
            assert run["state"] == "COMPLETED", (run, serve_log.read_text()[-3000:])
            assert (small_project / "out.txt").read_text() == "42"
            assert any("Running stage 'count'" in line for line in run["logs"]), run["logs"]
        finally:
            ctrl_c(serve)
            shells.mark("serve stopped")
        assert not any(s in serve_log.read_text() for s in NO_TEMPORARY_SERVER), serve_log.read_text()[-3000:]

        # The work-pool route, in a new shell; then its worker in another and a run triggered from a third.
        (small_project / "params.yaml").write_text((small_project / "params.yaml").read_text().replace("n: 21", "n: 50"))
        shells.run(WORK_POOL)
        deployed = shells.run(DEPLOY)
        assert name in deployed, deployed
        assert api_get(shells.port, f"/deployments/name/{name}")["work_pool_name"] == "lora-nlg"
        worker, worker_log = shells.start(WORKER, "worker")
        try:
            output = shells.run(RUN_NOW)
            run = wait_for_run(shells.api_env, flow_run_id(output))
            shells.mark(f"worker run {run['state']}")
            assert run["state"] == "COMPLETED", (run, worker_log.read_text()[-3000:])
            assert (small_project / "out.txt").read_text() == "100"
        finally:
            ctrl_c(worker)
            shells.mark("worker stopped")
        assert not any(s in worker_log.read_text() for s in NO_TEMPORARY_SERVER), worker_log.read_text()[-3000:]
    finally:
        ctrl_c(server)
    profiles = tmp_path / "home/.prefect/profiles.toml"  # the user's profile: a plain `dvc repro` elsewhere stays offline
    assert not profiles.exists() or "PREFECT_API_URL" not in profiles.read_text(), profiles.read_text()


def peft_howto() -> tuple[str, list[str], str]:
    """docs/export.md, as written: the PEFT export command, the shell lines that make the stand-in's Hugging Face
    directory, and the Python that loads both."""
    text = (REPO / "docs" / "export.md").read_text(encoding="utf-8")

    def block(kind: str, after: str) -> str:
        start = text.index(f"```{kind}\n", text.index(after)) + len(kind) + 4
        return text[start:text.index("```", start)]

    export_line = block("bash", "## To PEFT").strip()
    return export_line, [line for line in block("bash", "needs a Hugging Face directory first").splitlines() if line.strip()], \
        block("python", "needs a Hugging Face directory first")


def test_the_peft_howto_runs_offline_as_written_outside_git_and_dvc_outputs(tmp_path):
    """Export the default run's kind of adapter (the stand-in base's) to PEFT and load it with transformers + peft,
    typing the doc's commands: offline (no hub), nothing written outside exports/, and the PEFT model's logits are
    ours."""
    pytest.importorskip("peft")
    import shutil

    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from steps.formats.checkpoints import adapter_config, base_identity, load_base_weights, save_adapter
    from steps.model.gpt2 import CARDS, GPT2
    from steps.model.lora import LoRAConfig

    project = tmp_path / "project"
    base = project / "data/base/standin.safetensors"
    base.parent.mkdir(parents=True)
    shutil.copy(REPO / "data/base/standin.safetensors", base)
    model = GPT2(CARDS["gpt2.tiny"], LoRAConfig(r=4, alpha=32, targets=("q", "v")))
    load_base_weights(model, base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as after training: B is not zero
        for block in model.h:
            block.attn.c_attn.lora_B.copy_(torch.randn(block.attn.c_attn.lora_B.shape, generator=generator) * 0.5)
    save_adapter(model, project / "models/finetune", adapter_config(model, "gpt2.tiny", base_identity(base), step=1, epoch=1))
    before = sorted(str(p.relative_to(project)) for p in project.rglob("*"))

    export_line, base_lines, python = peft_howto()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for line in [export_line, *base_lines]:
        done = subprocess.run(["bash", "-c", line], cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (line, done.stderr[-3000:])
    done = subprocess.run([sys.executable, "-c", python], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the doc's generate printed nothing"
    after = sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.relative_to(project).parts[0] != "exports")
    assert after == before  # exports/ only: nothing inside data/ or the DVC outputs

    hf_base = GPT2LMHeadModel.from_pretrained(project / "exports/standin-base", dtype=torch.float32)  # as the doc loads it
    peft_model = PeftModel.from_pretrained(hf_base, project / "exports/peft").eval()
    ids = torch.tensor([[464, 1049, 318, 257, 50256, 383]])
    with torch.no_grad():
        theirs = peft_model(ids).logits
        ours = model.eval()(ids)
        ours = ours[0] if isinstance(ours, tuple) else ours
    assert (theirs - ours).abs().max().item() < 1e-4
