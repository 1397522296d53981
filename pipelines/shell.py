"""Run commands and hand each output line to a callback (the flow's logger).

Prefect does not capture a child process's output: an unpiped subprocess prints to the terminal only,
never to the Prefect API/UI. So flows run their commands through `stream()` / `stream_all()`.

The trainer dies with the flow: it arms a parent-death signal itself when PARENT_PID_ENV names its
launcher (steps.core.process.die_with_parent), so killing the flow, even with SIGKILL, ends the trainer
instead of leaving it writing to the work dir behind a dead flow. Commands that cannot arm it themselves
(torchrun, Prefect's API server) are started through `with_parent_death_signal`.

When the commands are stopped (one failed, or the flow is unwinding after Ctrl-C or SIGTERM), each gets
SIGTERM, then after STOP_GRACE_S SIGKILL, together with every process it started (torchrun's workers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from steps.core.process import arm_parent_death_signal, descendants, disarm_parent_death_signal

STOP_GRACE_S = 5.0  # SIGTERM -> SIGKILL; the trainer's resume state is written atomically, so a kill loses no file

# Run by `python -c` in front of a command: SIGTERM when the launcher (argv[1]) ends, then exec the command.
# The signal survives exec; it is armed in the child because a preexec hook is unsafe in a threaded flow.
_PARENT_DEATH_GUARD = ("import ctypes, os, signal, sys\n"
                       "sys.platform.startswith('linux') and ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\n"
                       "os.getppid() == int(sys.argv[1]) or sys.exit('error: the launcher is gone')\n"
                       "os.execvp(sys.argv[2], sys.argv[2:])")


def with_parent_death_signal(command: Sequence[str]) -> list[str]:
    """`command`, started so that it gets SIGTERM when this process ends, even by SIGKILL (Linux). Start it from a
    thread that lives as long as this process needs it (the signal follows the thread that forked it)."""
    return [sys.executable, "-c", _PARENT_DEATH_GUARD, str(os.getpid()), *command]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return state not in ("Z", "X")


def _signal(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signum)


def stop_pids(pids: Sequence[int], grace_s: float = STOP_GRACE_S, term: Sequence[int] | None = None) -> list[int]:
    """SIGTERM `term` (default: all of `pids`), wait up to `grace_s` for all of `pids` to end, SIGKILL the rest.
    Returns the PIDs that had to be killed."""
    _signal(pids if term is None else term, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if alive(pid)]
    _signal(left, signal.SIGKILL)
    deadline = time.monotonic() + 5.0  # SIGKILL lands asynchronously: return once they are gone, not just signalled
    while any(alive(pid) for pid in left) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def stop_children(grace_s: float = STOP_GRACE_S, keep: Sequence[int] = ()) -> list[int]:
    """End every process this one started, and theirs, but `keep` and theirs: SIGTERM, then SIGKILL after `grace_s`.
    Returns the killed."""
    spared = {pid for kept in keep for pid in (kept, *descendants(kept))}
    return stop_pids([pid for pid in descendants(os.getpid()) if pid not in spared], grace_s)


def _start(command: list[str], cwd: str | os.PathLike, env: dict[str, str], pass_fds: Sequence[int]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace", pass_fds=tuple(pass_fds))


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """Terminate what still runs, then kill what ignores it, and whatever it started (torchrun's workers)."""
    running = [proc for proc in procs if proc.poll() is None]
    tree = [pid for proc in running for pid in (proc.pid, *descendants(proc.pid))]
    if tree:
        stop_pids(tree, grace_s, term=[proc.pid for proc in running])  # torchrun passes SIGTERM on to its workers
    for proc in procs:
        proc.wait()


def stream(command: list[str], cwd: str | os.PathLike, env: dict[str, str], on_line: Callable[[str], None],
           pass_fds: Sequence[int] = ()) -> int:
    """Run `command`, call `on_line` for every non-blank output line (stdout and stderr merged); return its exit status."""
    return stream_all([(command, env)], cwd, on_line, pass_fds)


def stream_all(commands: Sequence[tuple[list[str], dict[str, str]]], cwd: str | os.PathLike,
               on_line: Callable[[str], None], pass_fds: Sequence[int] = ()) -> int:
    """Run the commands together (one per rank), lines of command i > 0 prefixed `[rank i]`; when one fails, the
    others are stopped. Returns 0, or the first non-zero exit status. Ctrl-C or an exception stops them all."""
    procs = [_start(command, cwd, env, pass_fds) for command, env in commands]
    lock = threading.Lock()

    def pump(index: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                with lock:
                    on_line(line if index == 0 else f"[rank {index}] {line}")

    readers = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for reader in readers:
        reader.start()
    try:
        return _wait_all(procs)
    finally:
        _stop(procs)
        for reader in readers:
            reader.join(timeout=5)


def _wait_all(procs: Sequence[subprocess.Popen]) -> int:
    """Wait until all exit 0, or until the first failure (then the caller stops the rest)."""
    pending = list(procs)
    while pending:
        for proc in list(pending):
            try:
                code = proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            if code != 0:
                return code
            pending.remove(proc)
    return 0


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with this interpreter's bin dir first on PATH: `python` and `dvc` in stage
    commands then mean the same virtual environment as the flow, however the flow was started."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the flow's log as they are printed
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------------ a launcher's own signals

FORCE_EXIT_S = 20.0  # after Ctrl-C or SIGTERM: the unwinding (stop the trainer, mark the run, end Prefect) gets this long


class Terminated(BaseException):
    """SIGTERM (or the parent's death) reached a launcher: it unwinds like Ctrl-C, then exits 128 + signal."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def _say(message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"{message}\n".encode(errors="replace"))


class _Signals:
    """The state behind `ends_with_parent`: which signal came first, and the deadline it set."""

    def __init__(self, force_after_s: float):
        self.force_after_s = force_after_s
        self.first: int | None = None

    def force_exit(self, signum: int, why: str) -> None:
        _say(f"error: {why}; stopping its processes now")
        stop_children(1.0)
        os._exit(128 + signum)

    def _deadline(self, signum: int) -> None:
        time.sleep(self.force_after_s)
        self.force_exit(signum, f"still running {self.force_after_s:.0f}s after {signal.Signals(signum).name}")

    def handle(self, signum: int, frame: object) -> None:
        if self.first is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: do not wait for the unwinding
                self.force_exit(self.first, "interrupted again")
            return  # a second SIGTERM (the parent's death after a kill) must not break the unwinding; the deadline holds
        self.first = signum
        threading.Thread(target=self._deadline, args=(signum,), name="force-exit", daemon=True).start()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)


def started_by_a_program() -> bool:
    """Whether this process was started by another program (dvc, a script, a scheduler) rather than as a shell
    job: a job of an interactive shell leads its own process group; a program's child shares the program's."""
    return os.getpgrp() != os.getpid() and os.getppid() != 1


@contextlib.contextmanager
def ends_with_parent(force_after_s: float = FORCE_EXIT_S) -> Iterator[None]:
    """For a launcher's main(): while inside, the process ends when the program that started it ends, even by
    SIGKILL (Linux: the parent-death signal, SIGTERM, armed only when started by a program, see
    `started_by_a_program`; when the parent is already gone, Terminated at once), and SIGTERM raises Terminated
    (Ctrl-C KeyboardInterrupt, as always) so that `finally` blocks stop the children and mark the run. Whatever
    is still running `force_after_s` after the first signal, or at a second Ctrl-C, is killed, children
    included, and the process exits 128 + signal. Main thread only; elsewhere, nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    parent = os.getppid()
    state = _Signals(force_after_s)
    previous = {signum: signal.signal(signum, state.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    armed = False
    try:
        if started_by_a_program():
            armed = True
            if not arm_parent_death_signal(parent):
                raise Terminated(signal.SIGTERM)
        yield
    finally:
        if armed:
            disarm_parent_death_signal()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
