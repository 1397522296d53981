"""How the flow launches the trainer: no network listener on one node, one writer per work dir, and a trainer
that ends with its launcher. Real processes throughout (the trainer, a killed launcher, a second trainer)."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pipelines.finetune_config import FinetuneConfig
from pipelines.trainer_launch import run_trainer, trainer_commands
from steps.core.common import InputError
from steps.core.process import lock_path
from tests.helpers import tiny_run_args

REPO = Path(__file__).resolve().parents[1]


def trainer_section(tmp: Path, work_dir: Path, **overrides) -> dict:
    """The tiny trainer arguments of tests/helpers as a params.yaml `finetune` section."""
    argv = tiny_run_args(tmp, work_dir, **overrides)
    section: dict = {"correct_bias": True}
    flags = [a for a in argv if a.startswith("--")]
    for flag in flags[1:]:
        section[flag[2:]] = argv[argv.index(flag) + 1]
    return section


def config(tmp: Path, work_dir: Path, nproc: int, **overrides) -> FinetuneConfig:
    launch = {"torchrun": {"nproc_per_node": nproc, "nnodes": 1, "node_rank": 0}, "retries": 0, "retry_delay_seconds": 0}
    return FinetuneConfig(project_dir=tmp, params_file=tmp / "params.yaml", params={}, trainer=trainer_section(tmp, work_dir, **overrides),
                          launch=launch, tracking={}, decode={}, tracking_uri="")


def test_one_process_runs_the_trainer_without_torchrun(tmp_path):
    [(argv, env)] = trainer_commands(config(tmp_path, tmp_path / "run", nproc=1), run_id=None)
    assert argv[:3] == [sys.executable, "-m", "steps.train"]
    assert "torch.distributed.run" not in argv and "WORLD_SIZE" not in env


def listening_addresses(root: psutil.Process) -> set[str]:
    """The local addresses on which `root` or any descendant listens (TCP)."""
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            found |= {c.laddr.ip for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.slow
def test_two_processes_on_one_node_listen_on_loopback_only_and_equal_one_process(tmp_path):
    """The rendezvous is a file and the ranks talk over `lo`: nothing a remote host could connect to. The
    result is the one-process run with the same global batch (batch 4 on each of 2 ranks = batch 8)."""
    seen: set[str] = set()
    me = psutil.Process()
    done = threading.Event()

    def watch() -> None:  # every 50 ms while the two ranks train (not per output line: a loaded machine prints late)
        while not done.is_set():
            seen.update(listening_addresses(me))
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_trainer(config(tmp_path, tmp_path / "two", nproc=2, train_batch_size=4), None, lambda line: None)
    finally:
        done.set()
        watcher.join(5)
    run_trainer(config(tmp_path, tmp_path / "one", nproc=1, train_batch_size=8), None, lambda line: None)
    assert seen, "no listening socket was seen while two ranks trained (gloo listens on loopback)"
    assert all(ipaddress.ip_address(address).is_loopback for address in seen), seen
    two, one = load_file(tmp_path / "two/adapter.safetensors"), load_file(tmp_path / "one/adapter.safetensors")
    assert all(torch.allclose(two[k], one[k], atol=1e-6) for k in one)
    assert not list(tmp_path.glob(".two.rendezvous-*"))  # the rendezvous file is removed after the run


def test_a_second_trainer_on_a_locked_work_dir_fails_at_once_naming_the_holder(tmp_path):
    work_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from steps.core.process import lock_work_dir
        lock_work_dir({str(work_dir)!r})
        print("locked", flush=True)
        time.sleep(60)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "steps.train", *tiny_run_args(tmp_path / "data", work_dir)],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"another training (PID {holder.pid})" in second.stderr and second.stderr.count("\n") == 1
        assert time.monotonic() - started < 60  # at once: no training happened
        assert not (work_dir / "adapter.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock: the next trainer starts.
    assert subprocess.run([sys.executable, "-m", "steps.train", *tiny_run_args(tmp_path / "data", work_dir, max_step=1)],
                          cwd=REPO, capture_output=True, timeout=300).returncode == 0


@pytest.mark.slow
def test_killing_the_launcher_ends_its_trainer_and_frees_the_work_dir(tmp_path):
    """SIGKILL to the flow's process used to leave the trainer running (and a rerun then started a second one)."""
    work_dir = tmp_path / "run"
    tiny_run_args(tmp_path / "data", work_dir)  # writes the data
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from tests.test_launch import config
        from pipelines.trainer_launch import run_trainer
        from steps.core.process import work_dir_lock
        cfg = config(Path({str(tmp_path)!r}), Path({str(work_dir)!r}), nproc=1, max_step=100000, log_interval=1)
        with work_dir_lock(cfg.work_dir):  # as the flow holds it: the trainer shares it
            run_trainer(cfg, None, lambda line: print(line, flush=True))
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for line in launcher.stdout:  # wait until the trainer is updating
            if "| step" in line:
                break
        trainers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "steps.train" in " ".join(p.cmdline())]
        assert trainers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        _, alive = psutil.wait_procs(trainers, timeout=30)
        assert not alive, "the trainer outlived its launcher"
    finally:
        for proc in psutil.process_iter():
            if "steps.train" in " ".join(proc.cmdline()) and str(work_dir) in " ".join(proc.cmdline()):
                proc.kill()
    import fcntl

    fd = os.open(lock_path(work_dir), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again: raises BlockingIOError if anyone still holds it
    finally:
        os.close(fd)


def test_the_lock_held_in_a_with_block_is_what_the_trainer_inherits_and_is_released_after(tmp_path):
    from steps.core.process import WORK_DIR_LOCK_FD, held_lock, lock_work_dir, work_dir_lock

    cfg = config(tmp_path, tmp_path / "run", nproc=1)
    assert WORK_DIR_LOCK_FD not in trainer_commands(cfg, run_id=None)[0][1]  # nothing held: the trainer locks for itself
    with work_dir_lock(cfg.work_dir) as fd:
        assert held_lock(cfg.work_dir) == fd
        [(_, env)] = trainer_commands(cfg, run_id=None)
        assert env[WORK_DIR_LOCK_FD] == str(fd)
    assert held_lock(cfg.work_dir) is None
    os.close(lock_work_dir(cfg.work_dir))  # released: it can be taken again


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    from steps.core.process import lock_path, lock_work_dir

    work_dir = tmp_path / "run"
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    lock_path(work_dir).symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"):
        lock_work_dir(work_dir)
    assert victim.read_text() == "keep me"


def test_stopping_the_commands_ends_what_they_started_even_what_ignores_sigterm(tmp_path):
    """torchrun's workers are the trainer's processes: stopping torchrun must end them too, SIGKILL after the grace."""
    from pipelines import shell

    pid_file = tmp_path / "grandchild.pid"
    stubborn = [sys.executable, "-c", textwrap.dedent(f"""
        import signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(300)
    """)]
    failing = [sys.executable, "-c",
               f"import os, time\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.05)\ntime.sleep(0.5)\nraise SystemExit(3)"]
    started = time.monotonic()
    assert shell.stream_all([(stubborn, dict(os.environ)), (failing, dict(os.environ))], tmp_path, lambda line: None) == 3
    assert time.monotonic() - started < shell.STOP_GRACE_S + 15
    grandchild = int(pid_file.read_text())
    assert not shell.alive(grandchild), "the rank's own child outlived the stop"


def test_a_command_started_with_the_parent_death_signal_ends_with_its_launcher(tmp_path):
    """How torchrun and Prefect's API server end with the flow, even when it is killed with SIGKILL."""
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys, time
        from pipelines.shell import with_parent_death_signal
        child = subprocess.Popen(with_parent_death_signal([sys.executable, "-c", "import time; time.sleep(300)"]))
        print(child.pid, flush=True)
        time.sleep(300)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        child = psutil.Process(int(launcher.stdout.readline()))
        time.sleep(0.5)  # the guard has armed the signal and become the command
        assert "time.sleep(300)" in " ".join(child.cmdline())
        launcher.kill()
        launcher.wait()
        _, left = psutil.wait_procs([child], timeout=10)
        assert not left, "the command outlived its launcher"
    finally:
        launcher.kill()
