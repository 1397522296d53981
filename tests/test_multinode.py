"""Two machines, played on this one: two `python -m pipelines.finetune` processes, node ranks 0 and 1, each in its own
copy of the project (machines share no filesystem), two torchrun agents meeting through a c10d rendezvous on
127.0.0.1 with one gloo process each. Real flows, real torchrun, a real MLflow store, killed processes.

Node 1 is always started first and its torchrun agent waited for, so torchrun's rendezvous (which orders nodes by
host name, then PID) gives node 1 the first ranks: rank 0 can only end up on node 0 because the trainer puts it there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipelines.trainer_launch import trainer_argv
from tests.test_finetune_flow import free_port, make_project, processes, write_params

REPO = Path(__file__).resolve().parents[1]
NODE_TIMEOUT = 240  # seconds a node's flow may take here (about 40-70 s on a loaded 2-core machine)


@pytest.fixture(scope="module")
def prefect_api_url() -> str:
    """One Prefect API for both nodes' flows, as a team would share one server (no temporary server per flow)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def machines(tmp_path_factory) -> tuple[Path, Path]:
    """Node 0's project and node 1's copy of it (what `git clone` + `dvc pull` would give the second machine)."""
    node0 = tmp_path_factory.mktemp("node0")
    make_project(node0)
    node1 = tmp_path_factory.mktemp("node1")
    shutil.copytree(node0 / "data", node1 / "data")  # the encoded data and the base (data/base)
    return node0, node1


def two_node_params(root: Path, name: str, port: int, **torchrun) -> Path:
    """The tiny flow params, for 2 nodes x 1 process of batch 4 (global batch 8), with a c10d rendezvous on loopback.
    20 updates (a checkpoint every 4): long enough to kill a worker mid-run. No Prefect retries: what recovers is
    torchrun's restart. Each scenario has its own experiment."""
    path = write_params(root, name, f"models/{name}", f"models/{name}_run.json")
    params = yaml.safe_load(path.read_text())
    # fp32 and no LoRA dropout: what makes 2 processes x 4 equal 1 x 8 (dropout masks are drawn per rank).
    params["finetune"].update({"max_step": 20, "precision": "fp32", "lora_dropout": 0.0})
    params["flow"]["retries"] = 0
    params["flow"]["torchrun"].update({"nnodes": 2, "rdzv_backend": "c10d", "rdzv_endpoint": f"127.0.0.1:{port}",
                                       "rdzv_id": name, "join_timeout": 120, **torchrun})
    params["tracking"]["experiment"] = f"multinode-{name}"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def start_node(root: Path, params: Path, node_rank: int, api_url: str, *overrides: str) -> subprocess.Popen:
    """`python -m pipelines.finetune --set flow.torchrun.node_rank=N` in that machine's project, output to a log file."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    # One thread per worker, as in the reference run: with several, MKL picks its thread count by the machine's load
    # and the last bits of two equal runs differed (1e-8, measured), which a bitwise comparison cannot allow.
    env.update({"PREFECT_API_URL": api_url, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    sets = [arg for item in (f"flow.torchrun.node_rank={node_rank}", *overrides) for arg in ("--set", item)]
    log = open(root / f"{params.stem}.node{node_rank}.log", "w")  # noqa: SIM115  (the child keeps it open)
    with log:
        return subprocess.Popen([sys.executable, "-m", "pipelines.finetune", "--params", str(params), "--project_dir", str(root),
                                 *sets], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def is_agent(cmd: str) -> bool:
    """A torchrun agent's command line (the flow runs torchrun through pipelines.loopback_torchrun on loopback)."""
    return "torch.distributed.run" in cmd or "pipelines.loopback_torchrun" in cmd


def listening_sockets(roots: tuple[Path, ...]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by a process working in one of `roots`, from /proc."""
    import ipaddress

    inodes = set()
    for pid, (_, _, cwd) in processes().items():
        if cwd in {str(root) for root in roots}:
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        target = os.readlink(fd)
                        if target.startswith("socket:["):
                            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                hex_address, hex_port = fields[1].split(":")
                raw = bytes.fromhex(hex_address)  # little-endian 32-bit words, as the kernel prints them
                packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((str(ipaddress.ip_address(packed)), int(hex_port, 16)))
    return found


def log_of(root: Path, params: Path, node_rank: int) -> str:
    return (root / f"{params.stem}.node{node_rank}.log").read_text()


def wait_for_agent(root: Path, deadline: float) -> None:
    """Until node 1's torchrun agent runs (so it has the lower PID, see the module docstring)."""
    while time.monotonic() < deadline:
        if any(is_agent(cmd) and cwd == str(root) for _, cmd, cwd in processes().values()):
            return
        time.sleep(0.2)
    raise AssertionError("node 1's torchrun agent never started")


def finish(procs: list[subprocess.Popen], timeout: float = NODE_TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [proc.wait(max(1.0, deadline - time.monotonic())) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_two_nodes(machines: tuple[Path, Path], name: str, api_url: str, during=None, **torchrun) -> dict:
    node0, node1 = machines
    port = free_port()
    params = [two_node_params(root, name, port, **torchrun) for root in machines]
    started = time.monotonic()
    second = start_node(node1, params[1], 1, api_url)
    try:
        wait_for_agent(node1, started + NODE_TIMEOUT)
    except AssertionError:
        finish([second], 1)
        raise AssertionError(log_of(node1, params[1], 1)[-3000:]) from None
    first = start_node(node0, params[0], 0, api_url)
    if during is not None:
        during()
    codes = finish([first, second])
    logs = [log_of(root, p, rank) for rank, (root, p) in enumerate(zip(machines, params, strict=True))]
    assert codes == [0, 0], f"node 0:\n{logs[0][-3000:]}\nnode 1:\n{logs[1][-3000:]}"
    return {"logs": logs, "seconds": time.monotonic() - started, "params": params}


@pytest.fixture(scope="module")
def two_nodes(machines, prefect_api_url) -> dict:
    """The two-node run, and every listening socket its torchrun agents and workers held while it ran."""
    listening: set[tuple[str, int]] = set()

    def watch_ports() -> None:
        node0, _ = machines
        deadline = time.monotonic() + NODE_TIMEOUT
        while time.monotonic() < deadline and not (node0 / "models/two/adapter.safetensors").is_file():
            listening.update(listening_sockets(machines))
            time.sleep(0.1)

    result = run_two_nodes(machines, "two", prefect_api_url, during=watch_ports)
    return {**result, "listening": listening}


def one_process_adapter(root: Path, params: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    """The reference: `python -m steps.train` alone with the same settings and the whole batch (8 = 2 nodes x 4)."""
    section = yaml.safe_load(params.read_text())["finetune"]
    section.update({"train_batch_size": 8, "work_dir": str(work_dir), "plots_dir": None, "summary_file": None, "machine_file": None})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # torchrun gives its workers 1 thread too
    done = subprocess.run([sys.executable, "-m", "steps.train", *trainer_argv(section)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=NODE_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(work_dir / "adapter.safetensors")


@pytest.mark.slow
def test_two_nodes_train_the_adapter_of_one_process_with_the_whole_batch(two_nodes, machines, tmp_path):
    node0, _ = machines
    adapter = load_file(node0 / "models/two/adapter.safetensors")
    reference = one_process_adapter(node0, two_nodes["params"][0], tmp_path / "one")
    assert adapter.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(adapter[name], reference[name], atol=1e-6), name
    assert "| step     20/20" in two_nodes["logs"][0] and "world 2" in two_nodes["logs"][0]
    assert "finetune: 20 updates" in two_nodes["logs"][0]


@pytest.mark.slow
def test_nodes_meeting_on_loopback_listen_on_loopback_alone(two_nodes):
    """torchrun alone binds its stores to every interface whatever the endpoint; run by the flow through
    pipelines.loopback_torchrun, the rendezvous store, the workers' store and gloo all listen on loopback."""
    import ipaddress

    assert two_nodes["listening"], "no listening socket seen: the watch missed the run"
    assert all(ipaddress.ip_address(address).is_loopback for address, _ in two_nodes["listening"]), two_nodes["listening"]


def test_the_loopback_store_refuses_nothing_torchrun_relies_on():
    """In a process of its own (the wrapper patches torch for the process it runs in): a hosted store listens on
    127.0.0.1 (or ::1) only, works for clients, and a second host on the same port fails with the RuntimeError that
    makes torchrun's c10d backend connect as a client instead."""
    code = """
import datetime, socket, sys
from pipelines import loopback_torchrun as w
assert w.install() >= 2
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as c10d
assert dist.TCPStore is w.LoopbackTCPStore and c10d.TCPStore is w.LoopbackTCPStore
store = dist.TCPStore("localhost", 0, is_master=True, timeout=datetime.timedelta(seconds=10))
client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=10))
client.set("k", "v"); assert store.get("k") == b"v"
try:
    dist.TCPStore("127.0.0.1", store.port, is_master=True, timeout=datetime.timedelta(seconds=2))
except RuntimeError as exc:
    assert "cannot listen on 127.0.0.1" in str(exc)
else:
    raise AssertionError("a second store hosted on the same port")
print(store.port)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    port = int(done.stdout.split()[-1])
    listeners = [line.split()[3] for line in subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout.splitlines()]
    assert not any(address.endswith(f":{port}") for address in listeners)  # gone with its process


def test_only_node_0_has_an_mlflow_run_and_outputs(two_nodes, machines):
    from mlflow import MlflowClient

    node0, node1 = machines
    client = MlflowClient(tracking_uri=f"sqlite:///{node0 / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("multinode-two")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["resolved.world_size"] == "2"
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == list(range(4, 21, 4))
    assert runs[0].data.tags["adapter_sha256"]  # what the register stage, on node 0 after evaluate, finds the run by
    for output in ("models/two/adapter.safetensors", "models/two/summary.json", "two/train_summary.json", "two/loss.png",
                   "two/train_loss.csv", "models/two_run.json"):
        assert (node0 / output).is_file(), output
    # Node 1 writes nothing at all (so it may as well share node 0's directory): no MLflow store, no run file, no DVC
    # metric or plot, no work dir, no lock; its project holds what it was given, nothing more.
    assert not (node1 / "mlflow.db").exists() and not (node1 / "mlruns").exists() and not (node1 / "two").exists()
    assert not (node1 / "models").exists()
    assert "finetune: node 1 done" in two_nodes["logs"][1]


@pytest.mark.slow
def test_a_killed_worker_on_node_1_restarts_the_group_which_resumes_and_matches(two_nodes, machines, prefect_api_url):
    """kill -9 of node 1's trainer after node 0's first checkpoint: torchrun (max_restarts 1) restarts both nodes' workers;
    node 1's new worker has no checkpoint of its own and resumes from node 0's; no Prefect retry is needed."""
    node0, node1 = machines
    killed: list[int] = []

    def kill_node1_worker() -> None:
        deadline = time.monotonic() + NODE_TIMEOUT
        while time.monotonic() < deadline and not killed:
            if (node0 / "models/elastic/resume/state.pt").is_file():
                workers = [pid for pid, (_, cmd, cwd) in processes().items()
                           if "-m steps.train" in cmd and not is_agent(cmd) and cwd == str(node1)]
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                killed.extend(workers)
            time.sleep(0.05)

    result = run_two_nodes(machines, "elastic", prefect_api_url, during=kill_node1_worker, max_restarts=1)
    assert killed, "node 1's worker was never killed"
    node0_log = result["logs"][0]
    assert "resumed from" in node0_log, node0_log[-3000:]
    assert not (node1 / "models/elastic").exists()  # node 1 resumed from node 0's state, not from a file of its own
    final = load_file(node0 / "models/elastic/adapter.safetensors")
    uninterrupted = load_file(node0 / "models/two/adapter.safetensors")
    for name in uninterrupted:
        assert torch.equal(final[name], uninterrupted[name]), name


@pytest.mark.slow
def test_a_node_that_never_arrives_ends_in_a_clear_rendezvous_timeout_without_retries(machines, prefect_api_url):
    node0, _ = machines
    params = two_node_params(node0, "alone", free_port(), join_timeout=5)
    started = time.monotonic()
    node = start_node(node0, params, 0, prefect_api_url, "flow.retries=2", "flow.retry_delay_seconds=60")
    [code] = finish([node])
    seconds = time.monotonic() - started
    log = log_of(node0, params, 0)
    assert code == 1, log[-3000:]
    assert "did not all join the rendezvous at 127.0.0.1:" in log and "within flow.torchrun.join_timeout = 5 s" in log, log[-3000:]
    assert seconds < 120, f"{seconds:.0f} s: retried or hung"  # a retry alone would add its 60 s delay plus the timeout


# ----------------------------------------------------------------------------- fast: the params and torchrun's command


def test_multi_node_params_become_torchrun_options():
    from torch.distributed.run import get_args_parser

    from pipelines.finetune_config import torchrun_argv

    argv = torchrun_argv({"nproc_per_node": 1, "nnodes": 2, "node_rank": 1, "rdzv_backend": "c10d", "rdzv_endpoint": "10.0.0.1:29400",
                          "rdzv_id": f"job-{uuid.uuid4().hex[:6]}", "max_restarts": 1, "join_timeout": 30})
    args = get_args_parser().parse_args([*argv[3:-2], "-m", "steps.train"])
    assert (args.nnodes, args.node_rank, args.rdzv_backend, args.rdzv_endpoint, args.max_restarts) == ("2", 1, "c10d", "10.0.0.1:29400", 1)
    assert args.rdzv_conf == "join_timeout=30" and not args.standalone


@pytest.mark.parametrize(("setting", "message"), [
    ("flow.torchrun.max_restarts=-1", "flow.torchrun.max_restarts = -1: expected a whole number >= 0"),
    ("flow.torchrun.join_timeout=0", "flow.torchrun.join_timeout = 0: expected a whole number >= 1"),
    ("flow.torchrun.join_timeout=soon", "flow.torchrun.join_timeout = 'soon': expected a whole number >= 1"),
    ("flow.torchrun.node_rank=2", "flow.torchrun.node_rank = 2: expected 0 to nnodes - 1 = 1"),
    ("flow.torchrun.rdzv_endpoint=''", "flow.torchrun.nnodes = 2 needs a rendezvous"),
])
def test_bad_torchrun_params_are_refused_naming_the_key(machines, setting, message):
    from pipelines.finetune_config import load_config
    from steps.core.common import InputError

    node0, _ = machines
    params = two_node_params(node0, "checked", 29400)
    load_config(params, node0)  # the valid layout passes
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        load_config(params, node0, [setting])


def test_a_trainer_under_torchrun_shares_the_lock_of_the_flow_that_names_itself(tmp_path):
    """torchrun passes no descriptors to its workers: the flow names its PID instead, and only the process that holds
    the lock, and is an ancestor of the trainer, is believed."""
    from steps.core.process import WORK_DIR_LOCK_HOLDER, lock_work_dir

    work_dir = tmp_path / "run"
    code = f"from steps.core.process import claim_outputs; claim_outputs({str(work_dir)!r}); print('claimed')"

    def claim(holder: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, WORK_DIR_LOCK_HOLDER: str(holder)},
                              capture_output=True, text=True, timeout=120)

    fd = lock_work_dir(work_dir)
    try:
        named = claim(os.getpid())  # this process holds the lock and is the child's parent: the flow's case
        assert named.returncode == 0 and "claimed" in named.stdout, named.stderr[-2000:]
        stranger = claim(os.getppid())  # an ancestor too, but not the holder
        assert stranger.returncode != 0 and f"another training (PID {os.getpid()})" in stranger.stderr
    finally:
        os.close(fd)


BROADCAST_SCRIPT = """
import sys
from pathlib import Path
import torch, torch.distributed as dist
from steps.training import distributed
distributed.BROADCAST_CHUNK = 7  # several pieces for a short file
rendezvous, global_rank, path = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
dist.init_process_group("gloo", init_method=Path(rendezvous).as_uri(), rank=global_rank, world_size=2)
env = distributed.Dist(1 - global_rank, 2, torch.device("cpu"), main_global_rank=1)  # rank 0 is torchrun's rank 1
print(repr(env.read_on_main(path)), repr(env.read_on_main(path.with_name("absent"))), flush=True)
dist.destroy_process_group()
"""


def test_rank_0s_file_reaches_every_rank_whatever_the_others_have_on_disk(tmp_path):
    """The resume state after an elastic restart: rank 0 (here torchrun's rank 1) reads its file and every rank gets
    those bytes, in pieces; the other node's own stale copy is ignored, and a file rank 0 lacks is None everywhere."""
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    (tmp_path / "node0/state.pt").write_bytes(b"stale bytes of another run")
    (tmp_path / "node1/state.pt").write_bytes(b"rank 0's state, 33 bytes long...")
    rendezvous = tmp_path / "rendezvous"
    procs = [subprocess.Popen([sys.executable, "-c", BROADCAST_SCRIPT, str(rendezvous), str(rank), str(tmp_path / f"node{rank}/state.pt")],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ['''b"rank 0's state, 33 bytes long..." None'''] * 2
